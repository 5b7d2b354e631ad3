"""Speed and agreement of features.log_mel against librosa, on the same clips in one process.

Four implementations take turns within each repeat (paired runs, the order rotated each repeat):
  - ours: features.log_mel on batches of equal-length clips (on CUDA too, when present, timed
    from host arrays to host arrays, copies included);
  - ours, plain: features.log_mel_reference, the dense path the fast one is tested against;
  - librosa with the filterbank built once: librosa.stft, np.abs ** power, a prebuilt
    librosa.filters.mel product, the baselines' log; the fair reference;
  - librosa.feature.melspectrogram as the DCASE baselines call it, clip by clip; it rebuilds
    the filterbank on every call.
Each timed run makes --passes passes over the clips (a run over many clips in a row).
Each figure is the min and the median over the repeats: the min is the run least disturbed by
other processes, the median what a busy machine gives. `--stages` times every step of ours and
of the plain path (pad, frame, rfft, power, mel product, log), so each optimisation in log_mel
is measured here. `--threads 1,2` measures both thread counts in one command.
librosa and threadpoolctl are imported inside the functions that use them: test and bench
dependencies only.

    python bench.py --clips /work/shared/data/dcase2023_dev_sample --threads 1,2 --stages
    python bench.py --clips 64 --batch 2,4,8,16,32,64     # 64 synthesised 10-s clips
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import features as F

SYNTH_SECONDS = 10.0  # s, length of a synthesised clip (DCASE clips last 6-12 s)
SETTLE_S = 0.3  # s of pause before each timed call: BLAS and OpenMP workers spin ~0.1 s after use
# passes over the clips per timed run: a real run extracts a machine type's ~1000 clips in a
# row; one pass over the 28 real clips lasts ~30 ms, too short to time a steady state after the
# pause (the first batches pay for cold caches and fresh memory pages, librosa's as well as ours)
DEFAULT_PASSES = 4


def synth_clips(n: int, *, seconds: float = SYNTH_SECONDS, seed: int = 0) -> list[np.ndarray]:
    """n clips of noise plus a random hum, at normal recording levels, from a seeded generator."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * F.SR)) / F.SR  # (n_samples,) s
    clips = []
    for _ in range(n):
        f0 = rng.uniform(50.0, 2000.0)  # Hz
        x = 0.05 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
        clips.append(x.astype(np.float32))  # (n_samples,)
    return clips


def baseline_db(mel: np.ndarray, settings: dict) -> np.ndarray:
    """The baselines' 20 / power * log10 with that year's floor."""
    floored = np.maximum(mel, F.EPS) if settings["floor"] == "clip" else mel + F.EPS
    return 20.0 / settings["power"] * np.log10(floored)  # (n_mels, T)


def librosa_log_mel(clip: np.ndarray, settings: dict) -> np.ndarray:
    """The baselines' features through librosa.feature.melspectrogram, for one clip: (n_mels, T) dB."""
    import librosa

    s = settings
    mel = librosa.feature.melspectrogram(y=clip, sr=s["sr"], n_fft=s["n_fft"], hop_length=s["hop"],
                                         n_mels=s["n_mels"], power=s["power"], pad_mode=s["pad_mode"],
                                         fmin=s["fmin"], fmax=s["fmax"])
    return baseline_db(mel, s)  # (n_mels, T)


def librosa_log_mel_prebuilt(settings: dict):
    """librosa's log-mel with the filterbank built once: a function of one clip -> (n_mels, T) dB."""
    import librosa

    s = settings
    fb = librosa.filters.mel(sr=s["sr"], n_fft=s["n_fft"], n_mels=s["n_mels"], fmin=s["fmin"], fmax=s["fmax"])

    def run(clip):
        spec = librosa.stft(clip, n_fft=s["n_fft"], hop_length=s["hop"], center=True, pad_mode=s["pad_mode"])
        return baseline_db(fb.dot(np.abs(spec) ** s["power"]), s)  # (n_mels, T)
    return run


def equal_length_batches(clips: list[np.ndarray], batch: int) -> list[list[int]]:
    """Indices of clips in groups of at most `batch` equal lengths (ToyCar clips are 12 s, fan 10 s)."""
    by_length = {}
    for i, clip in enumerate(clips):
        by_length.setdefault(len(clip), []).append(i)
    return [idx[k:k + batch] for idx in by_length.values() for k in range(0, len(idx), batch)]


def batched(fn, clips: list[np.ndarray], groups: list[list[int]], device: str = "cpu") -> list:
    """fn over the batches in `groups`, results back on the host in clip order."""
    out = [None] * len(clips)
    for idx in groups:
        x = torch.from_numpy(np.stack([clips[i] for i in idx])).to(device)  # (b, n_samples)
        mel = fn(x).cpu().numpy()  # (b, n_mels, T)
        for i, m in zip(idx, mel):
            out[i] = m
    return out


def set_threads(n: int) -> None:
    """torch's intra-op threads and numpy's BLAS threads (librosa's filterbank product) to n;
    0 leaves both at their defaults (one per core)."""
    from threadpoolctl import threadpool_limits

    if n:
        torch.set_num_threads(n)
        threadpool_limits(n)


def paired_times(fns: dict, repeats: int) -> dict:
    """Seconds of each call, `repeats` per function, after one untimed warm-up call each.

    The functions take turns within each repeat, the order rotated from one repeat to the next,
    so a burst of load from other processes slows all of them alike instead of one. Each timed
    call waits SETTLE_S first: numpy's OpenBLAS threads keep spinning after a matrix product
    and would starve the next call's threads.
    """
    for fn in fns.values():
        fn()  # warm-up: filterbank caches, FFT plans, CUDA kernels
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def stage_steps(settings: dict, *, fast: bool) -> list:
    """features.log_mel (fast) or log_mel_reference (plain) cut into its steps, each a function
    of the previous step's output, on CPU float32. bench_stages checks that the last step's
    output equals the whole function's, bit for bit, so this copy cannot drift unseen."""
    s = settings
    n_fft, hop, power, pad = s["n_fft"], s["hop"], s["power"], s["n_fft"] // 2
    window = F._hann(n_fft, dtype=torch.float32, device=torch.device("cpu"))
    mel_args = (s["sr"], n_fft, s["n_mels"], s["fmin"], s["fmax"], torch.float32, torch.device("cpu"))
    fb, blocks = F._mel_tensor(*mel_args), F._mel_blocks(*mel_args)

    def floor(mel, out=None):
        if s["floor"] == "clip":
            return torch.clamp(mel, min=F.EPS, out=out)
        return torch.add(mel, F.EPS, out=out)

    def frames_into_scratch(x):  # (b, n_samples) -> (b, T, n_fft)
        n_frames = 1 + x.shape[-1] // hop
        out = F._scratch("frames", (*x.shape[:-1], n_frames, n_fft), x.dtype, x.device)
        return F._centred_frames(x, n_fft=n_fft, hop=hop, pad_mode=s["pad_mode"], window=window, out=out)

    def power_in_place(spec):  # (b, T, n_bins) complex -> (b, T, n_bins)
        re_im = torch.view_as_real(spec).square_()
        spec_power = torch.add(re_im[..., 0], re_im[..., 1],
                               out=F._scratch("power", spec.shape, re_im.dtype, re_im.device))
        return spec_power if power == 2.0 else spec_power.pow_(power / 2)

    def log_in_place(mel):  # (b, n_mels, T) view of (n_mels, b * T) -> (b, n_mels, T)
        out = torch.empty(mel.shape)
        floor(mel, out=out)
        return out.log10_().mul_(20.0 / power)

    rfft = ("rfft", lambda frames: torch.fft.rfft(frames, dim=-1))  # (b, T, n_bins)
    if fast:  # the ends padded only (features._centred_frames), no step of its own
        return [("frame, window", frames_into_scratch),
                rfft,
                ("power", power_in_place),
                ("mel product", lambda p: F.mel_banded(p, blocks, n_mels=s["n_mels"], scratch=True)),
                ("floor, log", log_in_place)]
    return [("pad", lambda x: torch.nn.functional.pad(x[:, None], (pad, pad), mode=s["pad_mode"])[:, 0]),
            ("frame, window", lambda x: x.unfold(-1, n_fft, hop) * window),  # (b, T, n_fft)
            rfft,
            ("power", lambda spec: (spec.real.square() + spec.imag.square()) ** (power / 2)),
            ("mel product", lambda p: (p @ fb.mT).mT.contiguous()),
            ("floor, log", lambda mel: 20.0 / power * torch.log10(floor(mel)))]


def bench_stages(clips: list[np.ndarray], settings: dict, groups: list[list[int]], repeats: int) -> dict:
    """Seconds per clip of each step of the fast and the plain path, over all clips, per repeat:
    {path: {step: [seconds per clip]}}. The two paths take turns as in paired_times."""
    paths = {"ours": (stage_steps(settings, fast=True), F.log_mel),
             "ours, plain": (stage_steps(settings, fast=False), F.log_mel_reference)}
    batches = [torch.from_numpy(np.stack([clips[i] for i in idx])) for idx in groups]  # [(b, n_samples)]
    for name, (steps, whole) in paths.items():
        y = batches[0]
        for _, step in steps:
            y = step(y)
        if not torch.equal(y, whole(batches[0], **settings)):
            raise RuntimeError(f"bench.stage_steps of {name!r} no longer computes what features.py "
                               "does: update it to the new steps")
    times = {name: {step: [] for step, _ in steps} for name, (steps, _) in paths.items()}
    names = list(paths)
    for r in range(repeats + 1):  # the first round is a warm-up
        for name in names[r % 2:] + names[:r % 2]:
            steps, totals = paths[name][0], dict.fromkeys(times[name], 0.0)
            time.sleep(SETTLE_S)
            for y in batches:
                for step, fn in steps:
                    start = time.perf_counter()
                    y = fn(y)
                    totals[step] += time.perf_counter() - start
            for step, seconds in totals.items():
                if r:
                    times[name][step].append(seconds / len(clips))
    return times


def bench_features(clips: list[np.ndarray], *, repeats: int = 5, batches=None,
                   year: int = 2023, stages: bool = False, passes: int = DEFAULT_PASSES) -> dict:
    """Time our log-mel against librosa's on the same clips, at the threads set now.

    Returns the settings and one row per implementation: seconds per run of `passes` passes
    over all clips (one per repeat), and the max |dB| difference of its output from
    librosa.feature.melspectrogram's. batches: clips per log_mel call, one or several (None:
    features.clip_batch(), what clip_features uses at these threads). With `stages`, also
    bench_stages' figures at the first batch size.
    """
    import librosa

    batches = batches or [F.clip_batch()]
    settings = F.log_mel_settings(year)
    groups = {b: equal_length_batches(clips, b) for b in batches}
    prebuilt = librosa_log_mel_prebuilt(settings)
    fns = {f"ours, batch {b}": lambda b=b: batched(lambda x: F.log_mel(x, **settings), clips, groups[b])
           for b in batches}
    fns[f"ours, plain, batch {batches[0]}"] = lambda: batched(
        lambda x: F.log_mel_reference(x, **settings), clips, groups[batches[0]])
    if torch.cuda.is_available():
        fns[f"ours, batch {batches[0]}, cuda"] = lambda: batched(
            lambda x: F.log_mel(x, **settings), clips, groups[batches[0]], device="cuda")
    fns["librosa, filterbank built once"] = lambda: [prebuilt(c) for c in clips]
    fns["librosa melspectrogram (baselines)"] = lambda: [librosa_log_mel(c, settings) for c in clips]
    reference = fns["librosa melspectrogram (baselines)"]()
    rows = [dict(name=name, seconds=seconds,
                 max_abs_db_diff=float(max(np.abs(o - r).max() for o, r in zip(fns[name](), reference))))
            for name, seconds in paired_times({name: lambda fn=fn: [fn() for _ in range(passes)]
                                                for name, fn in fns.items()}, repeats).items()]
    steps = bench_stages(clips, settings, groups[batches[0]], repeats) if stages else None
    return dict(clips=len(clips), audio_s=sum(len(c) for c in clips) / F.SR, year=year, repeats=repeats,
                passes=passes,
                threads=torch.get_num_threads(), torch=torch.__version__, librosa=librosa.__version__,
                rows=rows, stages=steps)


def print_table(result: dict) -> None:
    """One row per implementation: clips/s from the min and the median run time, and its speed
    relative to each librosa row (x = its clips/s over librosa's, min / median)."""
    rows = {row["name"]: row for row in result["rows"]}
    librosa_rows = ("librosa melspectrogram (baselines)", "librosa, filterbank built once")
    lib = {name: (min(rows[name]["seconds"]), np.median(rows[name]["seconds"])) for name in librosa_rows}
    print(f"{result['clips']} clips, {result['audio_s']:.0f} s of audio; torch {result['torch']}, "
          f"librosa {result['librosa']}, {result['threads']} threads, log-mel settings of "
          f"{result['year']}, {result['repeats']} paired repeats of {result['passes']} passes")
    print(f"{'implementation':36s} {'clips/s min-time':>16s} {'median':>7s} {'x melspectrogram':>17s} "
          f"{'x librosa once':>15s} {'max |dB diff|':>13s}")
    for name, row in rows.items():
        best, median = min(row["seconds"]), np.median(row["seconds"])
        ratios = [f"{lib[r][0] / best:.2f} / {lib[r][1] / median:.2f}" for r in librosa_rows]
        clips = result["clips"] * result["passes"]  # extracted per timed run
        print(f"{name:36s} {clips / best:16.1f} {clips / median:7.1f} "
              f"{ratios[0]:>17s} {ratios[1]:>15s} {row['max_abs_db_diff']:13.1e}")
    if result["stages"]:
        print("ms per clip of each step, min / median over the repeats:")
        paths = list(result["stages"])
        print(f"  {'step':16s}" + "".join(f"{path:>16s}" for path in paths))
        for step in result["stages"]["ours, plain"]:  # every step; ours has no pad step
            cells = [f"{1e3 * min(times[step]):.3f} / {1e3 * np.median(times[step]):.3f}"
                     if step in times else "-" for times in result["stages"].values()]
            print(f"  {step:16s}" + "".join(f"{cell:>16s}" for cell in cells))


# --------------------------------------------------------------------------------------------
# bench train: seconds per epoch and peak memory of one system's training

def bench_train(cls, options: dict, *, year: int = 2020, n_train: int = 20,
                seconds: float = SYNTH_SECONDS) -> dict:
    """Train cls(**options) once on a synthetic machine type made here (the first of `year`,
    n_train training clips per section, each `seconds` long: real DCASE lengths by default, as
    the paper's windows and patches need them) and time each epoch from its progress lines (from the
    line before: the first epoch of a model includes its set-up). Returns seconds per epoch of
    pre-training and of training (min and median), training clips per second, and the peak
    memory: CUDA's allocator peak on a GPU, else the process's peak resident size."""
    import resource
    import tempfile

    import data
    import synth

    times, last = {}, [time.perf_counter()]

    def timed(line):                  # the system's log; an epoch line closes an epoch
        now = time.perf_counter()
        if line.startswith("pre-training epoch"):
            times.setdefault("pre-training", []).append(now - last[0])
        elif " epoch " in f" {line}" and not line.startswith("resuming"):
            times.setdefault("training", []).append(now - last[0])
        last[0] = now
        print(f"  {line}")
    cuda = str(options["device"]).startswith("cuda")
    machine = synth.default_machines(year)[0]
    with tempfile.TemporaryDirectory() as tmp:
        synth.synthesize(f"{tmp}/data", year=year, machines=[machine], n_train=n_train,
                         n_test=1, eval_part=False, seconds=seconds)
        clips = data.list_clips(data.part_dir(f"{tmp}/data", year, "dev"), year=year,
                                machine=machine, split="train")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        system = cls(**{**options, "log": timed, "cache_dir": f"{tmp}/cache"})
        start = last[0] = time.perf_counter()
        system.fit(clips, Path(tmp))
        total = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)   # bytes (Linux: KiB)
    result = {"clips": len(clips), "machine": machine, "total_s": total,
              "peak_memory_mb": peak / 2 ** 20, "peak_memory_of": "CUDA allocator" if cuda
              else "process resident size", "threads": torch.get_num_threads()}
    for name, t in times.items():
        result[name] = {"epochs": len(t), "s_per_epoch_min": min(t),
                        "s_per_epoch_median": float(np.median(t)), "clips_per_s": len(clips) / min(t)}
    result["fit_clips_per_s"] = len(clips) / total     # a system that trains nothing: its fit
    return result


def report_train(system: str, year: int, device: str, threads: int, result: dict) -> dict:
    """Print bench_train's result: a line per kind of epoch, then the clips, time and memory."""
    print(f"bench train {system} ({year} recipe) on {device}, {threads} thread(s)")
    for name in ("pre-training", "training"):
        if name in result:
            r = result[name]
            print(f"{name:13s} {r['epochs']} epochs: {r['s_per_epoch_min']:.2f} s/epoch min, "
                  f"{r['s_per_epoch_median']:.2f} median; {r['clips_per_s']:.1f} clips/s")
    if not any(name in result for name in ("pre-training", "training")):   # no epochs
        print(f"fit (no epochs: embedding and memory banks): {result['fit_clips_per_s']:.1f} "
              f"clips/s")
    print(f"{result['clips']} clips of {result['machine']}; {result['total_s']:.1f} s in all; "
          f"peak memory {result['peak_memory_mb']:.0f} MB ({result['peak_memory_of']})")
    return result


def comma_ints(text: str) -> list[int]:
    """'1,2' -> [1, 2], for the flags that take one or more numbers."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: negative numbers are not allowed")
    return values


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Time features.log_mel against librosa on the same clips.")
    parser.add_argument("--clips", default="32",
                        help="a folder of wav files (searched recursively) or a number N of synthesised "
                             f"{SYNTH_SECONDS:g}-s clips (default: 32)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per implementation, taking turns; min and median reported "
                             "(default: 7)")
    parser.add_argument("--batch", type=comma_ints, default=None,
                        help="clips per log_mel call, or several (4,16,64) to time ours at each; the first "
                             "also serves the plain, CUDA and --stages runs (default: what clip_features "
                             f"uses, {F.CLIPS_PER_THREAD} per torch thread)")
    parser.add_argument("--year", type=int, default=2023, choices=sorted(F.LOG_MEL_BY_YEAR),
                        help="whose baseline log-mel settings to use (default: 2023)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesised clips (default: 0)")
    parser.add_argument("--threads", type=comma_ints, default=[0],
                        help="torch intra-op and numpy BLAS threads, or several (1,2) to measure each in "
                             "turn; 0 keeps the defaults of one per core (default: 0)")
    parser.add_argument("--passes", type=int, default=DEFAULT_PASSES,
                        help="passes over the clips per timed run, as a run over many clips does; 1 "
                             f"times one cold pass (default: {DEFAULT_PASSES})")
    parser.add_argument("--stages", action="store_true",
                        help="also time each step of ours and of the plain path (default: off)")
    args = parser.parse_args(argv)
    if 0 in (args.batch or []) or args.repeats < 1 or args.passes < 1:
        parser.error("--batch sizes, --repeats and --passes must be positive")
    folder = Path(args.clips)
    if folder.is_dir():
        paths = sorted(folder.rglob("*.wav"))
        if not paths:
            parser.error(f"{folder}: no files match **/*.wav")
        clips = F.load_batch(paths)
    elif args.clips.isdigit() and int(args.clips) > 0:
        clips = synth_clips(int(args.clips), seed=args.seed)
    else:
        parser.error(f"--clips {args.clips!r} is neither a folder nor a positive number of clips")
    print(f"args: {vars(args)}")
    results = []
    for threads in args.threads:
        set_threads(threads)
        results.append(bench_features(clips, repeats=args.repeats, batches=args.batch, year=args.year,
                                      stages=args.stages, passes=args.passes))
        print_table(results[-1])
    return results


if __name__ == "__main__":
    main()
