"""Speed and agreement of features.log_mel against librosa, on the same clips in one process.

librosa (melspectrogram, then the baseline's 20 / power * log10) runs clip by clip, as the DCASE
baselines run it; ours runs on batches of equal-length clips, on the CPU and, when present, on
CUDA (timed from host arrays to host arrays, copies included). Clips/s come from the best of
`repeats` timed runs after one warm-up run, the run least disturbed by other processes;
the implementations take turns within each repeat.
librosa is imported inside the functions that use it: it is a test and bench dependency only.

    python bench.py --clips /work/shared/data/dcase2023_dev_sample   # real wav files
    python bench.py --clips 64                                       # 64 synthesised 10-s clips
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import features as F

SYNTH_SECONDS = 10.0  # s, length of a synthesised clip (DCASE clips last 6-12 s)
DEFAULT_BATCH = 4  # clips per log_mel call: frames and spectra of 4 x 10 s (10 MB) stay in L3 cache
SETTLE_S = 0.3  # s of pause before each timed call: BLAS and OpenMP workers spin ~0.1 s after use
RESULT_KEYS = {  # device -> keys of (clips/s, speed ratio ours / librosa, max |dB| difference)
    "cpu": ("ours_clips_per_s", "speed_ratio", "max_abs_db_diff"),
    "cuda": ("cuda_clips_per_s", "cuda_speed_ratio", "cuda_max_abs_db_diff"),
}


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


def librosa_log_mel(clip: np.ndarray, settings: dict) -> np.ndarray:
    """The baselines' features through librosa, for one clip: (n_mels, T) in dB."""
    import librosa

    s = settings
    mel = librosa.feature.melspectrogram(y=clip, sr=s["sr"], n_fft=s["n_fft"], hop_length=s["hop"],
                                         n_mels=s["n_mels"], power=s["power"], pad_mode=s["pad_mode"],
                                         fmin=s["fmin"], fmax=s["fmax"])
    floored = np.maximum(mel, F.EPS) if s["floor"] == "clip" else mel + F.EPS
    return 20.0 / s["power"] * np.log10(floored)  # (n_mels, T)


def equal_length_batches(clips: list[np.ndarray], batch: int) -> list[list[int]]:
    """Indices of clips in groups of at most `batch` equal lengths (ToyCar clips are 12 s, fan 10 s)."""
    by_length = {}
    for i, clip in enumerate(clips):
        by_length.setdefault(len(clip), []).append(i)
    return [idx[k:k + batch] for idx in by_length.values() for k in range(0, len(idx), batch)]


def ours_log_mel(clips: list[np.ndarray], settings: dict, groups: list[list[int]], device: str) -> list:
    """features.log_mel over the batches in `groups`, results back on the host in clip order."""
    out = [None] * len(clips)
    for idx in groups:
        x = torch.from_numpy(np.stack([clips[i] for i in idx])).to(device)  # (b, n_samples)
        mel = F.log_mel(x, **settings).cpu().numpy()  # (b, n_mels, T)
        for i, m in zip(idx, mel):
            out[i] = m
    return out


def best_times(fns: dict, repeats: int) -> dict:
    """Seconds of the fastest of `repeats` calls of each function, after one untimed warm-up call.

    The functions take turns within each repeat, so a burst of load from other processes
    slows all of them alike instead of one. Each timed call waits SETTLE_S first: numpy's
    OpenBLAS threads keep spinning after librosa's matrix product and would starve torch's.
    """
    for fn in fns.values():
        fn()  # warm-up: filterbank cache, FFT plans, CUDA kernels
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def bench_features(paths_or_clips, *, repeats: int = 5, batch: int = DEFAULT_BATCH, year: int = 2023) -> dict:
    """Time our log-mel against librosa's on the same clips (wav paths or 1-D float32 arrays).

    Returns clips/s of both, speed ratio ours / librosa, and the max |dB| difference between them;
    cuda_* entries are None when no GPU is present.
    """
    import librosa

    clips = [c if isinstance(c, np.ndarray) else F.load_wav(c) for c in paths_or_clips]
    if not clips:
        raise ValueError("no clips to time: pass wav paths or arrays")
    settings = F.log_mel_settings(year)
    groups = equal_length_batches(clips, batch)
    reference = [librosa_log_mel(c, settings) for c in clips]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fns = {"librosa": lambda: [librosa_log_mel(c, settings) for c in clips]}
    for device in devices:
        fns[device] = lambda device=device: ours_log_mel(clips, settings, groups, device)
    seconds = best_times(fns, repeats)
    n = len(clips)
    result = dict(clips=n, audio_s=sum(len(c) for c in clips) / F.SR, year=year, batch=batch,
                  repeats=repeats, threads=torch.get_num_threads(), torch=torch.__version__,
                  librosa=librosa.__version__, librosa_clips_per_s=n / seconds["librosa"],
                  **{key: None for device in RESULT_KEYS for key in RESULT_KEYS[device]})
    for device in devices:
        rate_key, ratio_key, diff_key = RESULT_KEYS[device]
        ours = ours_log_mel(clips, settings, groups, device)
        result[rate_key] = n / seconds[device]
        result[ratio_key] = seconds["librosa"] / seconds[device]
        result[diff_key] = float(max(np.abs(o - r).max() for o, r in zip(ours, reference)))
    return result


def print_table(result: dict) -> None:
    """The bench result as a small table, one row per implementation and device."""
    rows = [(f"librosa {result['librosa']}, clip by clip", "cpu", result["librosa_clips_per_s"], 1.0, None),
            (f"asd features, batch {result['batch']}", "cpu", result["ours_clips_per_s"],
             result["speed_ratio"], result["max_abs_db_diff"])]
    if result["cuda_clips_per_s"] is not None:
        rows.append((f"asd features, batch {result['batch']}", "cuda", result["cuda_clips_per_s"],
                     result["cuda_speed_ratio"], result["cuda_max_abs_db_diff"]))
    print(f"{'implementation':32s} {'device':6s} {'clips/s':>9s} {'x librosa':>9s} {'max |dB diff|':>13s}")
    for name, device, rate, ratio, diff in rows:
        diff_text = "-" if diff is None else f"{diff:.1e}"
        print(f"{name:32s} {device:6s} {rate:9.1f} {ratio:9.1f} {diff_text:>13s}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Time features.log_mel against librosa on the same clips.")
    parser.add_argument("--clips", default="32",
                        help="a folder of wav files (searched recursively) or a number N of synthesised "
                             f"{SYNTH_SECONDS:g}-s clips (default: 32)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per implementation; the best counts (default: 5)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"clips per log_mel call (default: {DEFAULT_BATCH})")
    parser.add_argument("--year", type=int, default=2023, choices=sorted(F.LOG_MEL_BY_YEAR),
                        help="whose baseline log-mel settings to use (default: 2023)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesised clips (default: 0)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads; 0 keeps torch's default of one per core. On a "
                             "machine busy with other work, 1 avoids stalls; librosa's BLAS threads "
                             "follow OPENBLAS_NUM_THREADS (default: 0)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.clips)
    if folder.is_dir():
        clips = sorted(folder.rglob("*.wav"))
        if not clips:
            parser.error(f"{folder}: no files match **/*.wav")
    elif args.clips.isdigit() and int(args.clips) > 0:
        clips = synth_clips(int(args.clips), seed=args.seed)
    else:
        parser.error(f"--clips {args.clips!r} is neither a folder nor a positive number of clips")
    result = bench_features(clips, repeats=args.repeats, batch=args.batch, year=args.year)
    print(f"args: {vars(args)}")
    print(f"{result['clips']} clips, {result['audio_s']:.0f} s of audio; torch {result['torch']}, "
          f"{result['threads']} threads, log-mel settings of {result['year']}")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
