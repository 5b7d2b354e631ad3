"""asd: unsupervised anomalous sound detection, the DCASE Task 2 systems of 2020-2026.

    python asd.py synth    --year 2020 --out data            a small synthetic data set
    python asd.py train    --year 2020 --machine valve       train one machine type's model
    python asd.py test     --year 2020 --machine valve       score its test clips (submission CSVs)
    python asd.py evaluate --year 2020                       the year's official score
    python asd.py demo                                        all of the above on synthetic data
    python asd.py list machines --year 2024                   what the year table holds
    python asd.py bench features                              our log-mel against librosa's
    python asd.py download --year 2020 --machine valve        fetch, verify, unpack from Zenodo
    python asd.py package  --year 2020                        eval CSVs as a submission folder
    python asd.py train --normal-dir my_pump --out my_model  your own machine's recordings
    python asd.py score --model my_model new/*.wav            their scores and decisions

Runs go to <out>/dcase<YEAR>/<system>/<part>/: models/<machine>/ (weights, threshold, the
arguments), results/ (the CSVs in the year's submission names), results.json (the scores).
One function per subcommand; errors in the data end the run with one line naming the file.
torch (and with it features, models and the systems' own modules) is imported only by the
commands that train or score, so `list`, `--help` and `evaluate` start at once.
"""
import argparse
import collections
import contextlib
import ctypes
import hashlib
import inspect
import json
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import data
import download
import flags
import plots
import results
import scoring
import submission
import synth
import systems

# --------------------------------------------------------------------------------------------
# Runs: where outputs go, what is written beside them


def run_dir(args):
    return Path(args.out) / f"dcase{args.year}" / args.system / args.part


def versions():
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(), "argv": sys.argv}


def run_args(args):
    """The arguments as written beside outputs (the command's function and log left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "log")}


class Log:
    """Prints progress lines and keeps the last, so that an interrupted run can say where it
    stopped."""

    def __init__(self):
        self.last = None

    def __call__(self, line):
        self.last = line
        print(line, flush=True)


def start_torch(seed, threads, release_memory=False):
    """Thread count, every seed and the memory policy, before any torch work."""
    import torch
    if not release_memory:
        keep_freed_memory()
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # needed for determinism on CUDA
    # torch.use_deterministic_algorithms(True) without its first line, which imports the
    # inductor compiler's config only to set its flag: 2.1 s of every command's start in torch
    # 2.13, for a compiler nothing here uses
    torch._C._set_deterministic_algorithms(True)


# glibc's malloc settings (mallopt(3), malloc.h): M_MMAP_MAX 0 serves every block from the heap
# instead of a mapping of its own, M_TRIM_THRESHOLD -1 never hands the heap's top back
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Memory freed by one training step serves the next, on Linux with glibc; elsewhere
    nothing changes. Returns whether it took effect.

    glibc gives each block above 128 KB-32 MB a mapping of its own and unmaps it when freed, so
    a CPU training step at a paper's sizes faults its activations in afresh, 4 KB at a time:
    MobileNetV2 at 224 x 224, batch 32 plus 64 candidates without gradients, 1 thread, took
    5.2-5.5 s per step, 2.4-2.5 s of it in the kernel (1.1 M page faults per step); with this,
    3.0-3.2 s and 0.3 s (27 k faults), peak memory 3.1-3.2 -> 4.0-4.2 GB. PyTorch's tuning
    guide gets the same from jemalloc or tcmalloc; these are glibc's own settings. The cost:
    the process keeps its peak memory until it ends (--release-memory declines)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):       # no C library to ask, or not glibc's
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def pick_device(name):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    return name


def data_folder(args):
    """The folder holding <machine>/ for the chosen part: --data-dir, else the standard layout."""
    return Path(args.data_dir) if args.data_dir else data.part_dir(args.data_root, args.year,
                                                                   args.part)


def check_machine(args):
    """A machine type the year's table does not list: a typo in the standard layout (an error
    listing the valid ones), but a user's own machine in a folder given with --data-dir,
    taken with one line saying so."""
    try:
        data.get_year(args.year).sections(args.machine, args.part)
    except data.DataError:
        if not args.data_dir:
            raise
        print(f"note: {args.machine} is not one of the DCASE {args.year} {args.part} machine "
              f"types; taken as your own, from {Path(args.data_dir) / args.machine}")


def train_clips(args):
    """Training clips: --data-dir's train folder as it is, else the training data the system
    declares (its `training_data`), resolved by data.training_clips."""
    if args.data_dir:
        return data.list_clips(Path(args.data_dir), year=args.year, machine=args.machine,
                               split="train")
    return data.training_clips(args.data_root, args.year, args.machine, args.part,
                               log=getattr(args, "log", print),
                               **systems.get_system(args.system).training_data)


def shared_pool(args, kind, split="train"):
    """The clips a model shared by the year's machine types learns from (held-out clips not yet
    removed): kind "dev", the training clips of every machine type of the dev set (of the
    run's part where there is no dev folder); "part", of every machine type of the run's part,
    each as the system trains it (train_clips); "all", of every machine type of the year, dev
    and eval parts where present. With --data-dir, every machine type in that folder. Split
    "supplemental" (2025): the normal clips of that extra folder instead."""
    spec = data.get_year(args.year)
    if args.data_dir:
        folders = [Path(args.data_dir)]
    else:
        parts = {"dev": ["dev"], "part": [args.part], "all": ["dev", "eval"]}[kind]
        folders = [data.part_dir(args.data_root, args.year, p) for p in parts]
        folders = [f for f in folders if f.is_dir()] or [data_folder(args)]
    if kind == "part" and split == "train" and not args.data_dir:
        table = spec.dev if args.part == "dev" else spec.eval
        return [c for m in table if (folders[0] / m / split).is_dir()
                for c in train_clips(argparse.Namespace(**{**vars(args), "machine": m}))]
    return [c for folder in folders for m in spec.machines if (folder / m / split).is_dir()
            for c in data.list_clips(folder, year=args.year, machine=m, split=split)
            if c.label == "normal"]


def system_options(args, device):
    """The options a system is built with: the common ones and its own flags (saved with it)."""
    own = systems.own_options(systems.get_system(args.system))
    return dict(year=args.year, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, device=device,
                cache_dir=None if args.no_cache else args.cache_dir,
                **{name: getattr(args, name) for name in own})


# --------------------------------------------------------------------------------------------
# train


def cmd_train(args):
    """Train one machine type of a DCASE set (--machine), or a plain folder of your own
    machine's normal recordings (--normal-dir; the model goes to --out itself). The model is
    built in a folder beside its final place (.<name>.partial, where an interrupted run
    resumes) and swapped in only when training has succeeded."""
    if args.normal_dir:
        clips, sections = data.normal_clips(args.normal_dir, year=args.year)
        model_dir, about = Path(args.out), {"machine": clips[0].machine, "sections": sections}
        inputs = [args.normal_dir]
    elif args.machine:
        check_machine(args)
        model_dir, about = run_dir(args) / "models" / args.machine, {"machine": args.machine}
        clips = train_clips(args)
        inputs = sorted({c.path.parents[2] for c in clips})      # the folders holding <machine>/
    else:
        raise ValueError("train: give --machine (a DCASE set) or --normal-dir DIR (a folder of "
                         "your own machine's normal recordings)")
    data.check_apart(model_dir, inputs)
    # one run at a time builds a model folder: a second one says which run holds it and stops
    with data.lock(model_dir.with_name(f".{model_dir.name}.lock"), what=f"model {model_dir}",
                   wait=False, log=args.log):
        if (model_dir / "model.pt").exists() and not args.force:
            raise ValueError(f"{model_dir / 'model.pt'} exists; pass --force to train again")
        if model_dir.exists() and any(model_dir.iterdir()) and not data.owned(model_dir):
            raise ValueError(f"{model_dir}: exists and was not written by asd (no "
                             f"{data.MARKER} marker); move it away or choose another --out")
        partial = model_dir.with_name(f".{model_dir.name}.partial")
        _check_resume(partial, args)
        if not partial.exists():
            data.claim(partial, "python asd.py train")
        data.write_json(partial / "args.json", {**run_args(args), **versions(), "pid": os.getpid()})
        try:
            fit_and_save(args, clips, partial, about)
        except Exception:
            if not any(partial.glob("checkpoint*.pt")):     # nothing to resume: leave nothing
                data.remove_owned(partial)
            raise
        kept = data.swap_in(partial, model_dir)
    print(f"model -> {model_dir}" + (f"; {kept}" if kept else ""))


def fit_and_save(args, clips, model_dir, about):
    """Fit the system on the clips less a held-out share, fit the gamma threshold to the
    held-out clips' scores, and save a self-describing model folder: model.pt (system,
    options, weights), threshold.json, and model.json (what `score` needs: system, year,
    feature settings, threshold, sections)."""
    import features
    import train
    device = pick_device(args.device)
    if len(clips) < 2:
        raise data.DataError(f"{clips[0].path.parent}: 1 training clip of {about['machine']}; "
                             f"a model and its threshold need two or more normal clips (a "
                             f"useful one, hundreds): add normal recordings there")
    held_out = data.hold_out if args.normal_dir else data.split_held_out   # the same every run
    fit_clips, held = held_out(clips, args.threshold_holdout, seed=args.seed)
    print(f"train {args.system} on {len(fit_clips)} clips of {about['machine']} ({args.year} "
          f"recipe: the DCASE {args.year} systems' features and settings; --year picks "
          f"another) on {device}; {len(held)} clips held out for the threshold")
    warn_rough_threshold(args, held)
    cls = systems.get_system(args.system)
    system = cls(**system_options(args, device), log=args.log)
    features.check_clips([c.path for c in clips], min_samples=system.min_samples, training=True,
                         log=args.log, shorter_input=getattr(system, "shorter_input", None))
    t0 = time.time()
    fit_system(args, system, fit_clips, model_dir, about)
    scores, source, threshold = fit_threshold(args, system, fit_clips, held, about["machine"])
    options = {**system_options(args, "cpu"), "cache_dir": None}   # this machine's, not the model's
    train.save({"system": args.system, "options": options, "state": system.state()},
               model_dir / "model.pt")
    data.write_json(model_dir / "threshold.json", {
        "threshold": threshold, "quantile": args.threshold_quantile, "fitted_to": source,
        "scores": scores.tolist(), "clips": [str(c.path) for c in held]})
    data.write_json(model_dir / "model.json", {
        "system": args.system, "year": args.year, "options": options,
        "features": system.settings, "threshold": threshold,
        "threshold_quantile": args.threshold_quantile, "threshold_fitted_to": source,
        "n_train": len(fit_clips), "n_held_out": len(held), **about})
    for checkpoint in model_dir.glob("checkpoint*.pt"):
        checkpoint.unlink()
    print(f"trained in {time.time() - t0:.1f} s; gamma threshold {threshold:.4g} "
          f"({args.threshold_quantile:g} quantile of {len(scores)} {source} scores); "
          f"{peak_memory(device)}")


def fit_threshold(args, system, fit_clips, held, machine):
    """The gamma threshold, fitted to the held-out clips' scores (or, with none, the training
    clips' own): (scores, what they are, threshold). A collapsed model is refused, naming what
    it learnt from; scores that barely spread give a warning."""
    # The official baselines fit the gamma to the training clips' own scores; a model that has
    # fitted those clips scores them lower than any new normal clip, so that threshold flags
    # most normal test clips. Held-out normals give the scores a new normal clip gets.
    if held:
        scores, source = system.score(held), "held-out"
    else:
        scores, source = system.train_scores(), "training (in-sample)"
        print(f"warning: the threshold is fitted to the training clips' own scores "
              f"(--threshold-holdout {args.threshold_holdout}, {len(fit_clips)} clips); it "
              f"will flag more normal clips than its quantile says")
    warning = scoring.check_spread(scores, f"{args.system} on {machine}, {source} scores",
                                   advice=what_was_too_few(fit_clips))
    if warning:
        print(warning)
    threshold = scoring.gamma_threshold(scores, q=args.threshold_quantile)
    if threshold <= 0 <= scores.min():
        raise ValueError(f"{args.system} on {machine}: the gamma threshold {threshold:.4g} "
                         f"is not positive for scores that are; the {source} "
                         f"scores ({scores.min():.4g} to {scores.max():.4g}) are too close")
    return scores, source, threshold


ROUGH_BELOW = 20   # held-out clips: a gamma quantile fitted to fewer is a rough guess


def warn_rough_threshold(args, held):
    """One line when the threshold will be fitted to fewer than ROUGH_BELOW held-out clips
    (on the real samples, 6-8 clips gave a threshold flagging 26-64% of normal valve clips,
    not 10%), saying how to get a better one."""
    if held and len(held) < ROUGH_BELOW:
        print(f"warning: the threshold will be fitted to {len(held)} held-out clips, so it is "
              f"rough (it may flag far more or fewer normal clips than "
              f"{1 - args.threshold_quantile:.0%}); for a better one train on more normal clips "
              f"({ROUGH_BELOW} held out at --threshold-holdout {args.threshold_holdout:g} "
              f"needs {ROUGH_BELOW / max(args.threshold_holdout, 1e-9):.0f}) or raise "
              f"--threshold-holdout")


def what_was_too_few(clips):
    """What a collapsed model learnt from, for its refusal: the clips per section and per
    attribute string, and the smallest of these classes (a class of one clip teaches nothing)."""
    sections = collections.Counter(c.section for c in clips)
    attributes = collections.Counter(c.attributes for c in clips if c.attributes)
    listed = "; ".join(f"{what} " + ", ".join(f"{k}: {n}" for k, n in sorted(found.items()))
                       for what, found in (("section", sections), ("attributes", attributes))
                       if found)
    smallest = min([*sections.values(), *attributes.values()])
    few = (f", {smallest} in the smallest class: too few to tell apart" if smallest < 5 else "")
    return (f"it learnt from {len(clips)} clips ({listed}){few}; give more normal clips, or "
            f"train longer (--epochs)")


def peak_memory(device):
    """'peak memory N MB (...)': CUDA's allocator peak on a GPU, else the process's peak
    resident size (the figure to compare with a machine's RAM)."""
    import resource
    if str(device).startswith("cuda"):
        import torch
        return f"peak memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MB (CUDA allocator)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
    mb = rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10
    return f"peak memory {mb:.0f} MB (process resident size)"


def fit_system(args, system, fit_clips, model_dir, about):
    """system.fit, from the network the year's machine types share where the system has one
    (trained once: shared_model), else alone; about gets "trained_on" and "shared"."""
    extra = {}
    if "supplemental_clips" in inspect.signature(system.fit).parameters:   # 2025's extra folder
        extra["supplemental_clips"] = ([] if args.normal_dir else
                                       shared_pool(args, "part", "supplemental"))
        if getattr(args, "supplemental", False) and not extra["supplemental_clips"]:
            raise data.DataError(f"{data_folder(args) / about['machine'] / 'supplemental'}: "
                                 f"no supplemental normal clips there (nor for any machine type "
                                 f"beside it); --supplemental trains on the 2025 supplemental/ "
                                 f"folders: download them, or leave out --supplemental")
    about["trained_on"], about["shared"] = data.clip_groups(fit_clips), None
    if system.shared_pool and not args.normal_dir:
        pool, _ = data.split_held_out(shared_pool(args, system.shared_pool),
                                      args.threshold_holdout, seed=args.seed)
        folder, shared, made = shared_model(args, system, pool, extra)
        system.fit(fit_clips, model_dir, shared=shared)
        about["shared"] = folder.relative_to(system_dir(args)).as_posix()
        about["trained_on"] = merge_groups(made["trained_on"] + about["trained_on"])
    else:
        system.fit(fit_clips, model_dir, **extra)


def system_dir(args):
    """<out>/dcase<YEAR>/<system>: the run directory of a system's year, both parts, where its
    shared models live (shared/<name>-<key>)."""
    return Path(args.out) / f"dcase{args.year}" / args.system


def shared_key(args, system, pool):
    """What a shared model depends on: year, system, seed, every option but those the system
    names as its machine types' own (`shared_ignores`), and each clip's place, size and time."""
    options = {k: v for k, v in system_options(args, "cpu").items()
               if k not in ("device", "cache_dir", *system.shared_ignores)}
    clips = sorted(("/".join(c.path.parts[-4:]), c.path.stat().st_size, c.path.stat().st_mtime_ns)
                   for c in pool)
    return {"system": args.system, "year": args.year, "options": options, "clips": clips}


def shared_model(args, system, pool, extra):
    """The model the year's machine types share, trained once per key (shared_key) in its own
    folder under the system's run directory: built beside it (.<name>.partial, where an
    interrupted run resumes) and swapped in whole, under a lock, so that a second run started
    meanwhile waits and then reuses it. (folder, its saved state, its shared.json)."""
    import torch
    key = shared_key(args, system, [*pool, *extra.get("supplemental_clips", [])])
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:12]
    folder = system_dir(args) / "shared" / f"{system.shared_name}-{digest}"
    with data.lock(folder.with_name(f".{folder.name}.lock"), what=f"shared model {folder}",
                   wait=True, log=args.log):
        if (folder / "model.pt").exists():
            made = json.loads((folder / "shared.json").read_text())
            args.log(f"reusing the shared {system.shared_name} {folder} (trained on "
                     f"{sum(g['clips'] for g in made['trained_on'])} clips of "
                     f"{len({g['machine'] for g in made['trained_on']})} machine types)")
        else:
            _build_shared(args, system, pool, extra, folder, key)
            made = json.loads((folder / "shared.json").read_text())
        state = torch.load(folder / "model.pt", map_location=system.device, weights_only=False)
    return folder, state, made


def _build_shared(args, system, pool, extra, folder, key):
    """Train the shared model into .<name>.partial (resuming what is there) and swap it in."""
    import train
    partial = folder.with_name(f".{folder.name}.partial")
    if not partial.exists():
        data.claim(partial, "python asd.py train (a model shared by the year's machine types)")
    args.log(f"training the shared {system.shared_name} on {len(pool)} clips of "
             f"{len({c.machine for c in pool})} machine types -> {folder}")
    state, used, info = system.fit_shared(pool, partial, **extra)
    train.save(state, partial / "model.pt")
    for checkpoint in partial.glob("checkpoint*"):
        checkpoint.unlink()
    data.write_json(partial / "shared.json", {
        **{k: v for k, v in key.items() if k != "clips"}, "n_clips": len(key["clips"]),
        "trained_on": data.clip_groups(used), **info, **versions()})
    data.swap_in(partial, folder)


def merge_groups(groups):
    """trained_on groups of the shared and the own network as one list: a (machine, part,
    section) both saw counted once, with the larger count (the same folder less the same
    held-out clips)."""
    merged = {}
    for g in groups:
        key = (g["machine"], g["part"], g["section"])
        merged[key] = max(merged.get(key, 0), g["clips"])
    return [{"machine": m, "part": p, "section": s, "clips": n}
            for (m, p, s), n in sorted(merged.items())]


def _check_resume(partial, args):
    """A partial folder left by an earlier run (under the lock, its process has ended): resumed
    when its arguments are these and a checkpoint is there, else replaced (with other
    arguments only under --force), with a line saying which."""
    if not partial.exists():
        return
    if not data.owned(partial):
        raise ValueError(f"{partial}: an unfinished model folder without asd's {data.MARKER} "
                         f"marker (an older asd's); delete it and train again")
    old = data.read_json(partial / "args.json", fix=f"delete {partial} and train again"
                         ) if (partial / "args.json").exists() else {}
    keys = ("system", "epochs", "batch_size", "lr", "seed", "year", "part", "quick",
            "threshold_holdout", "channel", *systems.own_options(systems.get_system(args.system)))
    changed = [k for k in keys if old and old.get(k) != getattr(args, k)]
    if changed and not args.force:
        raise ValueError(f"{partial}: an interrupted run with other {', '.join(changed)} is "
                         f"there; pass --force to start again")
    ended = f"pid {old['pid']}, " if "pid" in old else ""
    if not changed and any(partial.glob("checkpoint*.pt")):
        print(f"resuming the run that stopped in {partial} ({ended}same arguments)")
        return
    why = f"other {', '.join(changed)}" if changed else "no checkpoint to resume"
    print(f"replacing {partial}, left by a run that has ended ({ended}{why})")
    data.remove_owned(partial)


# --------------------------------------------------------------------------------------------
# test


RETRAIN = "the model folder is damaged; train it again with --force"


def load_model(model_dir, device, cache_dir):
    """The system saved in model_dir/model.pt, and the threshold of threshold.json. A file
    there that is truncated, not asd's, or lacks what asd wrote is one line naming it."""
    import torch
    path = Path(model_dir) / "model.pt"
    if not path.exists():
        raise ValueError(f"{path}: no trained model; run 'python asd.py train' first")
    try:
        saved = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:       # torch.load raises several types; the path and reason matter
        raise data.DataError(f"{path}: not a model file asd wrote, or truncated "
                             f"({short_reason(e)}); {RETRAIN}") from None
    if not (isinstance(saved, dict) and {"system", "options", "state"} <= set(saved)):
        raise data.DataError(f"{path}: not a model file asd wrote (no system, options and "
                             f"state); {RETRAIN}")
    options = {**saved["options"], "device": device, "cache_dir": cache_dir}
    system = systems.get_system(saved["system"])(**options)
    system.load_state(saved["state"])
    threshold = data.read_json(Path(model_dir) / "threshold.json", fix=RETRAIN,
                               keys=("threshold",))["threshold"]
    return system, threshold


def threshold_line(model_dir, threshold, scores):
    """The decision threshold, what it was fitted to, and how many of these scores it flags:
    a threshold fitted to a few clips, or under other conditions, may flag far more normal
    clips than its quantile says, and the user should see that."""
    fit = data.read_json(Path(model_dir) / "threshold.json", fix=RETRAIN, keys=("threshold",))
    n_fit, flagged = len(fit.get("scores", [])), int(np.sum(np.asarray(scores) > threshold))
    rough = f"; rough: fewer than {ROUGH_BELOW}" if n_fit < ROUGH_BELOW else ""
    return (f"threshold {threshold:.4g}: the {fit.get('quantile', 0.9):g} quantile of a gamma "
            f"fitted to the scores of {n_fit} {fit.get('fitted_to', 'held-out')} clips{rough}; "
            f"it flags {flagged} of {len(scores)} clips here as anomalous "
            f"({flagged / max(len(scores), 1):.0%})")


def short_reason(error):
    """The first line of an exception's message, for a one-line error (at most 100 characters)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 100 else text[:97] + "..."


def cmd_test(args):
    import features
    check_machine(args)
    clips = data.list_clips(data_folder(args), year=args.year, machine=args.machine,
                            split="test")
    domains = {c.domain for c in clips}
    if args.year >= 2021 and len(domains) == 1:
        print(f"note: every test clip of {args.machine} is in the {domains.pop()} domain: "
              f"evaluate will give the figures that are defined, but no official score")
    groups = {}
    for i, c in enumerate(clips):
        domain = c.domain if args.year == 2021 else None
        groups.setdefault((c.section, domain), []).append(i)
    results = run_dir(args) / "results"
    names = {key: [submission.result_filename(args.year, kind, args.machine, key[0], key[1])
                   for kind in ("anomaly_score", "decision_result")] for key in groups}
    existing = [n for pair in names.values() for n in pair if (results / n).exists()]
    if existing and not args.force:
        raise ValueError(f"{results / existing[0]} exists; pass --force to overwrite")
    device = pick_device(args.device)
    system, threshold = load_model(run_dir(args) / "models" / args.machine, device,
                                   None if args.no_cache else args.cache_dir)
    features.check_clips([c.path for c in clips], min_samples=system.min_samples, training=False,
                         log=args.log, shorter_input=getattr(system, "shorter_input", None))
    print(f"scoring {len(clips)} test clips of {args.machine} with {args.system}", flush=True)
    scores = system.score(clips)            # every clip scored before anything is written
    print(threshold_line(run_dir(args) / "models" / args.machine, threshold, scores))
    # every file of this run is written into a folder of its own first, then renamed into
    # results/: a full disk stops the run before any result appears, never half-way
    results.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=results, prefix=f".{args.machine}."))
    try:
        for key, idx in sorted(groups.items()):
            score_name, decision_name = names[key]
            submission.write_csv(staging / score_name, [(clips[i].name, scores[i]) for i in idx])
            submission.write_csv(staging / decision_name,
                              [(clips[i].name, int(scores[i] > threshold)) for i in idx])
        for pair in names.values():
            for name in pair:
                os.replace(staging / name, results / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data.write_json(run_dir(args) / "logs" / f"test_{args.machine}.json",
                    {**run_args(args), **versions()})
    print(f"scored {len(clips)} clips of {args.machine} -> {results}")


# --------------------------------------------------------------------------------------------
# score: any recordings, with a self-describing model folder


def cmd_score(args):
    """Print every file's anomaly score and decision (the model's gamma threshold); a file
    that cannot be scored is reported on one line and skipped, and the run ends non-zero."""
    about_path = Path(args.model) / "model.json"
    if not about_path.exists():
        raise ValueError(f"{about_path}: not found; --model must be a folder written by "
                         f"'python asd.py train' (model.pt, threshold.json, model.json)")
    about = data.read_json(about_path, fix=RETRAIN, keys=("year", "machine"))
    if args.csv and Path(args.csv).exists() and not args.force:
        raise ValueError(f"{args.csv} exists; pass --force to overwrite it, or choose another "
                         f"--csv")
    if args.plot and Path(args.plot).exists() and not args.force:
        raise ValueError(f"{args.plot} exists; pass --force to overwrite it, or choose another "
                         f"--plot")
    import features
    system, threshold = load_model(args.model, pick_device(args.device), None)
    sections = about.get("sections", {})
    rows, failed = [], []
    paths = data.wav_paths(args.paths)
    for path in paths:
        clip = data.plain_clip(path, year=about["year"], machine=about["machine"],
                               section=sections.get(path.parent.name, "00"), split="test")
        try:
            data.check_name(path)
            features.check_clip(path, min_samples=system.min_samples, training=False,
                                shorter_input=getattr(system, "shorter_input", None))
            score = float(system.score([clip])[0])
            if not np.isfinite(score):
                raise features.AudioError(f"{path}: the model gave a non-finite score ({score})")
        except (features.AudioError, data.DataError) as e:  # the message starts with the path
            failed.append(str(e))
            print(f"error: {e}", file=sys.stderr)
            continue
        decision = "anomalous" if score > threshold else "normal"
        rows.append((str(path), score, decision))
        print(f"{path}\t{score:.6g}\t{decision}")
    if args.csv:
        submission.write_table_csv(args.csv, ["file", "score", "decision"], rows)
    # stdout stays the per-file table (file, score, decision) for pipes; the rest to stderr
    print(f"scored {len(rows)} of {len(paths)} files ({len(paths) - len(rows)} skipped)",
          file=sys.stderr)
    print(threshold_line(args.model, threshold, [score for _, score, _ in rows]), file=sys.stderr)
    if args.plot and rows:
        fit = data.read_json(Path(args.model) / "threshold.json", fix=RETRAIN)   # load_model read it
        title = f"{len(rows)} files scored with {Path(args.model).name} ({about['system']})"
        data.write_text(args.plot, plots.score_svg(
            [r[1] for r in rows], threshold, fit.get("scores", []), title=title,
            held_name=f"{fit.get('fitted_to', 'held-out')} normal"))
        print(f"histogram -> {args.plot}", file=sys.stderr)
    if failed:
        raise ValueError(f"{len(failed)} of {len(paths)} files could not be scored (each named "
                         f"above); they have no score")


# --------------------------------------------------------------------------------------------
# evaluate

def cmd_evaluate(args, synthetic=False):
    """The official score, and the results table beside the baseline's published figures:
    results.json, results.txt (every metric), results.csv and results.md (the comparison);
    with --plots (the default) results.html and plots/<machine>.svg (plots.py). A test set of
    one domain gives every figure that is defined and one line naming the undefined ones."""
    out = run_dir(args) / "results.json"
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to overwrite")
    if args.part == "eval":      # anonymised names: the organisers' ground-truth tables
        truth = data.truth_from_tables(Path(args.ground_truth) if args.ground_truth
                                       else data_folder(args), year=args.year)
    else:                        # labels and domains are in the dev set's file names
        truth = data.truth_from_names(year=args.year)
    labelled = submission.labelled_rows(run_dir(args) / "results", year=args.year, truth=truth)
    result = scoring.official_score(args.year, labelled)
    paper = systems.paper_figures(args.system)         # the paper's dev-set figures, its year
    paper = paper if paper and paper["year"] == args.year and args.part == "dev" else None
    header, rows = results.comparison_rows(result, with_baseline=args.part == "dev", paper=paper)
    notes, extractors = run_notes(args, paper)
    markdown = ("\n\n".join([results.format_markdown(header, rows), *notes])
                + results.published_note(args.year, args.part))
    undefined = scoring.undefined_line(result)
    text = scoring.format_table(result) + (f"\n{undefined}" if undefined else "")
    data.write_json(out, {**result, **({"paper": results.paper_entry(result, paper)} if paper
                                       else {}),
                          **({"extractors": extractors} if extractors else {}), "notes": notes,
                          "args": {**run_args(args), **versions()}})
    data.write_text(run_dir(args) / "results.txt", text + "\n")
    submission.write_table_csv(run_dir(args) / "results.csv", header, rows)
    data.write_text(run_dir(args) / "results.md", markdown + "\n")
    written = ["results.txt", "results.csv", "results.md"]
    pictures = getattr(args, "plots", True)   # demo's arguments carry no --plots
    if pictures:
        written += [str(p.relative_to(run_dir(args))) for p in
                    write_pictures(args, result, labelled, (header, rows),
                                   [n for n in (undefined, *notes) if n])]
    print(text)
    if synthetic:
        print("\nThese figures are on synthetic sound. results.md sets them beside the official "
              "AE baseline's published figures, which are on the real DCASE recordings: the two "
              "are not comparable, the baseline column is there to show the table's form.")
    else:
        print(f"\nbeside the official baseline's published {args.part} figures"
              f"{' and the paper' + chr(39) + 's' if paper else ''} (empty: not published):"
              f"\n{markdown}")
    print(f"\nresults -> {out}; beside it: {', '.join(written)}"
          + (" (results.html: the table and the pictures, for a browser)" if pictures else ""))
    return result


def write_pictures(args, result, labelled, table, notes):
    """plots/<machine>.svg for every machine type (ROC curves per section and domain, score
    histograms per domain with its model's threshold) and results.html (the table, the notes
    and the pictures, one page). Returns the paths written."""
    folder, svgs, paths = run_dir(args), {}, []
    for machine in result["machines"]:
        threshold = model_threshold(folder / "models" / machine)
        svgs[machine] = plots.machine_svg(
            result, [r for r in labelled if r["machine"] == machine], machine, threshold)
        paths.append(data.write_text(folder / "plots" / f"{machine}.svg", svgs[machine]))
    score = result["official_score"]
    notes = [f"official score: {'undefined' if score is None else f'{score:.4f}'}", *notes]
    title = f"DCASE {args.year} Task 2: {args.system}, {args.part} set"
    return [data.write_text(folder / "results.html",
                            plots.results_html(title, *table, notes, svgs)), *paths]


def model_threshold(model_dir):
    """The decision threshold of a machine type's model (its threshold.json), or None with a
    warning line where there is none to read: the pictures then draw no threshold."""
    path = Path(model_dir) / "threshold.json"
    if not path.exists():
        print(f"note: {path} not found: the pictures of {Path(model_dir).name} draw no threshold")
        return None
    try:
        return float(json.loads(path.read_text())["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"warning: {path}: unreadable ({type(e).__name__}: {e}); the pictures of "
              f"{Path(model_dir).name} draw no threshold")
        return None


def run_notes(args, paper):
    """Lines for under the results table: which feature extractor each machine type's model
    used, where its model names one (model.json), and where the run's setting differs from
    the paper's (PAPER_DEV's "setting"; an option left at its default is the paper's).
    Returns (lines, {machine: extractor})."""
    lines, extractors = {}, {}
    for path in sorted((run_dir(args) / "models").glob("*/model.json")):
        about = json.loads(path.read_text())
        machine, options = about.get("machine", path.parent.name), about.get("options", {})
        extractor = about.get("features", {}).get("extractor")
        if extractor:
            extractors[machine] = extractor
            told = f" (the paper: {paper['extractor']})" if paper and "extractor" in paper else ""
            lines.setdefault(f"features from {extractor}{told}", []).append(machine)
        differ = [f"{k} {options[k]} (paper: {v})" for k, v in (paper or {}).get("setting", {}).items()
                  if options.get(k) is not None and options[k] != v]
        if differ:
            lines.setdefault("this run differs from the paper's setting: " + ", ".join(differ),
                             []).append(machine)
    notes = [f"{', '.join(machines)}: {line}" for line, machines in lines.items()]
    if paper:
        notes.append(f"paper: {paper['source']}, on the DCASE {args.year} development set")
    if args.data_dir and args.part == "dev":
        notes.append(f"these clips come from {args.data_dir}, not the DCASE {args.year} "
                     f"development set, whose figures the baseline and paper columns are")
    return notes, extractors


# --------------------------------------------------------------------------------------------
# download, package


def cmd_download(args):
    if args.weights:
        path, status = download.download_weights(args.weights,
                                                 dest_dir=Path(args.data_root) / "weights",
                                                 base_url=args.weights_url, show=not args.quiet)
        print(f"{args.weights}: {'verified earlier' if status == 'done' else 'downloaded, verified'}"
              f" -> {path}")
        return
    report = download.download(args.year, data_root=args.data_root, part=args.part,
                               machines=[args.machine] if args.machine else None,
                               base_url=args.zenodo_url, keep=args.keep_archives,
                               show=not args.quiet)
    fetched = sum(v == "fetched" for v in report.values())
    print(f"{args.year} {args.part}: {len(report)} files verified, {fetched} downloaded now")


def cmd_package(args):
    """The eval set's result CSVs and a <label>.meta.yaml (the organisers' template fields) in
    DEST/dcase<YEAR>/<system>/<label>/, the folder to submit."""
    if args.label == submission.PLACEHOLDER_LABEL:
        print(f"warning: the label is the placeholder {args.label}; pass --label "
              f"<Lastname>_<Institute>_task2_<1-4> (the corresponding author's)")
    elif not submission.LABEL.match(args.label):
        raise ValueError(f"--label {args.label}: not <Lastname>_<Institute>_task2_<1-4>")
    run = Path(args.out) / f"dcase{args.year}" / args.system
    _, machines = submission.result_files(run / "eval" / "results", args.year)
    sizes, threshold, extractors = [], None, {}
    for machine in machines:
        system, _ = load_model(run / "eval" / "models" / machine, "cpu", None)
        sizes.append(system.n_parameters())
        about = json.loads((run / "eval" / "models" / machine / "model.json").read_text())
        threshold = (f"{about['threshold_quantile']:g} quantile of a gamma (location fixed) "
                     f"fitted to {about.get('threshold_fitted_to', 'training')} scores")
        if about.get("features", {}).get("extractor"):     # narita2021: two different methods
            extractors.setdefault(about["features"]["extractor"], []).append(machine)
    dev = run / "dev" / "results.json"
    cls = systems.get_system(args.system)
    _, channel = _model_about(run / "eval" / "models" / machines[0])
    about = dict(cls.meta)
    if extractors:
        about["feature_extractor"] = "; ".join(f"{e} ({', '.join(m)})" for e, m in extractors.items())
    meta = submission.meta_yaml(
        label=args.label, name=args.name or systems.description(args.system),
        abbreviation=args.abbreviation or args.system[:10], authors=args.authors,
        about=about, threshold=threshold, n_parameters=max(sizes),
        machines=machines, missing=[m for m in data.get_year(args.year).eval if m not in machines],
        dev_results=json.loads(dev.read_text()) if dev.exists() else None,
        source_code=args.source_code, channel=channel)
    dest = Path(args.dest) / f"dcase{args.year}" / args.system
    if args.year >= 2026:                # the 2026 evaluator's layout: teams/<team>/<system>/
        dest = dest / "teams" / (args.team or submission.team_of(args.label))
    folder, n = submission.package(run / "eval" / "results", dest, year=args.year,
                                   label=args.label, meta_yaml=meta, name_form=args.name_form
                                   or ("both" if args.year >= 2026 else "plain"))
    warning = submission.truth_warning(args.year, data.part_dir(args.data_root, args.year, "eval"))
    if warning:
        print(warning)
    print(f"packaged {n} files of {len(machines)} machine types -> {folder}")


# --------------------------------------------------------------------------------------------
# synth, demo, list, bench


def cmd_synth(args):
    n = synth.synthesize(args.out, year=args.year, machines=args.machines or None,
                         n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                         n_sections=args.sections,
                         anomalies=[k for k in args.anomalies.split(",") if k])
    print(f"wrote {n} clips of {args.year} below {Path(args.out) / f'dcase{args.year}'}")


def cmd_demo(args):
    """Synthesise a data set, then train, test and evaluate every machine type of it."""
    root = Path(args.out)
    machines = [m for m in synth.default_machines(args.year) if m in data.get_year(args.year).dev]
    print(f"demo: writes a small synthetic data set in the DCASE {args.year} layout "
          f"({len(machines)} machine types: {', '.join(machines)}; machine hum with "
          f"generated faults), trains {args.system} on each type's normal clips "
          f"({args.epochs} epochs), scores its test clips and prints the {args.year} official "
          f"score. About a minute per machine type on a laptop CPU for ae; every step prints "
          f"its progress. Files: {root}/data, {root}/runs, {root}/cache.\n", flush=True)
    synth.synthesize(root / "data", year=args.year, n_train=args.n_train, n_test=args.n_test,
                     seed=args.seed)
    base = dict(vars(args), data_root=str(root / "data"), out=str(root / "runs"), part="dev",
                data_dir=None, cache_dir=str(root / "cache"), normal_dir=None)
    for machine in machines:
        print(f"\n== {machine}", flush=True)
        step = argparse.Namespace(**base, machine=machine)
        cmd_train(step)
        cmd_test(step)
    print()
    result = cmd_evaluate(argparse.Namespace(**base, ground_truth=None), synthetic=True)
    print(f"\nmodels, scores and tables: {run_dir(argparse.Namespace(**base))}")
    return result


def cmd_list(args):
    if args.what == "years":
        print("\n".join(map(str, data.YEARS)))
    elif args.what == "systems":
        for name, (_, _, about) in systems.SYSTEMS.items():
            print(f"{name:12s} {about}")
    elif args.what == "default-system":
        print(data.get_year(args.year).system)
    else:
        spec = data.get_year(args.year)
        table = spec.dev if args.part == "dev" else spec.eval
        for machine, sections in table.items():
            print(machine if args.what == "machines" else f"{machine} {' '.join(sections)}")


def cmd_bench(args):
    """bench features: bench.py's log-mel benchmark; bench train --system S [its train flags]
    [--n-train N]: seconds per epoch and peak memory of S on a synthetic machine type."""
    import bench
    if args.what == "features":
        return bench.main(args.bench_args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--n-train", type=int, default=20, help="training clips per section")
    known, rest = pre.parse_known_args(args.bench_args)
    system, year, quick = flags.phase_one(["train", *rest])
    train_args = flags.build_parser(system, year, quick).parse_args(["train", *rest])
    train_args.system = system
    start_torch(train_args.seed, train_args.threads, train_args.release_memory)
    device = pick_device(train_args.device)
    return bench.report_train(system, year, device, train_args.threads, bench.bench_train(
        systems.get_system(system), system_options(train_args, device), year=year,
        n_train=known.n_train))


# --------------------------------------------------------------------------------------------
# Channels: the stereo year (2026)


def _model_about(model_dir):
    """(model.json, the channel its training read) of a model folder; ({}, None) if absent."""
    about, saved = Path(model_dir) / "model.json", Path(model_dir) / "args.json"
    return (data.read_json(about, fix=RETRAIN) if about.exists() else {},
            data.read_json(saved, fix=RETRAIN).get("channel") if saved.exists() else None)


def read_channels(args):
    """(channels per clip, channel read) for a train, test, score or demo run, and args.channel
    set to it (so args.json records it): the year's channel count; train and demo read
    --channel (2026 default: near, as the baseline); test and score read what the model was
    trained on, and refuse another --channel. A --channel in a mono year is refused, as is
    `both` for a system that does not declare two channels (class attribute channels = 2)."""
    if args.command in ("test", "score"):
        model = Path(args.model) if args.command == "score" else (
            run_dir(args) / "models" / args.machine)
        about, saved = _model_about(model)
        year, system = about.get("year", getattr(args, "year", 2020)), about.get("system")
    else:
        year, system, saved = args.year, args.system, None
    channels = data.get_year(year).channels
    if channels == 1:
        if args.channel:
            raise ValueError(f"--channel {args.channel}: the DCASE {year} clips are mono; "
                             f"--channel chooses a channel of the stereo 2026 clips")
        return 1, None
    if saved and args.channel and args.channel != saved:
        raise ValueError(f"--channel {args.channel}: the model was trained on the {saved} "
                         f"channel; give --channel {saved}, or train again on {args.channel}")
    args.channel = args.channel or saved or "near"
    if args.channel == "both" and system and getattr(systems.get_system(system),
                                                     "channels", 1) < 2:
        able = [n for n in systems.SYSTEMS if getattr(systems.get_system(n), "channels", 1) > 1]
        raise ValueError(f"--channel both: {system} reads one channel; systems that declare "
                         f"two: {', '.join(able) or 'none yet'}; choose near, far or mean")
    return channels, args.channel


COMMANDS = {"train": cmd_train, "score": cmd_score, "test": cmd_test, "evaluate": cmd_evaluate,
            "download": cmd_download, "package": cmd_package, "synth": cmd_synth, "demo": cmd_demo,
            "list": cmd_list, "bench": cmd_bench}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug, log = "--debug" in argv, Log()
    try:
        system, year, quick = flags.phase_one(argv)
        help_only = "-h" in argv or "--help" in argv    # no torch needed to list the flags
        args = flags.build_parser(system, year, quick, help_only).parse_args(argv)
        args.log = log
        if system:
            args.system = system
        elif getattr(args, "system", None) == "auto":
            args.system = data.get_year(args.year).system
        reading = contextlib.nullcontext()
        if args.command in ("train", "test", "score", "demo"):
            start_torch(getattr(args, "seed", 0), args.threads, args.release_memory)
            import features
            channels, channel = read_channels(args)
            reading = features.reading(channels=channels, channel=channel)
        with reading:
            COMMANDS[args.command](args)
    except (ValueError, OSError, data.Busy) as e:   # bad data or audio, a busy model: one line
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        where = f" after: {log.last}" if log.last else ""
        print(f"interrupted{where}; resume with: python asd.py {shlex.join(argv)}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
