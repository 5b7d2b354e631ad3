"""The reproduced systems, one file per paper; this file is only their registry.

SYSTEMS maps each CLI name to the module and class that implement it and the one line that
`list systems` and `--help` show. The classes are imported on first use (`get_system`), so
commands that train nothing (`list`, `--help`, `evaluate`) start without importing torch.

The contract every system keeps:

    class <Paper>:
        name                         # the CLI name (the key below)
        defaults(year) -> dict(epochs=…, batch_size=…, lr=…)   # the paper's values; a
                                     # function of the year because the AE's batch size is
        quick = dict(…)              # smoke-run settings (train --quick); explicit flags win
        meta = dict(…)               # the submission template's description: acoustic
                                     # features, augmentation, method, anomaly score, external
                                     # data, pre-trained models
        settings: dict               # the input settings model.json records (declared in
                                     # __init__, not looked up with getattr)
        min_samples: int             # the shortest clip it can score (a shorter one is an
                                     # error naming the file, not a crash)
        add_flags(group)             # only this system's own flags, one per own keyword
        __init__(self, *, year, epochs, batch_size, lr, seed, device, cache_dir, log,
                 <own options>)      # own options: the keyword-only parameters after `log`;
                                     # the CLI derives them from this signature (`own_options`)
        training_data = dict(additional=…, paper=…)   # what its paper trained on, resolved
                                     # by data.training_clips: additional=True adds the
                                     # additional training sections (2020-2022) to dev runs;
                                     # paper: said when they are missing
        shared_pool                  # None, or the pool ("dev", "part", "all": asd.shared_pool)
                                     # of a network shared by the year's machine types; then
                                     # also shared_name, shared_ignores (options the shared
                                     # network does not depend on) and
                                     # fit_shared(pool, workdir) -> (state, clips it saw,
                                     # dict to record), which the CLI calls once per key
        fit(self, clips, workdir)    # trains on exactly these clips; reads nothing else from
                                     # disk; the shared network arrives as a keyword argument:
                                     # fit(clips, workdir, *, shared=None), None meaning "train
                                     # it here on the clips"; writes only inside workdir or
                                     # through features' keyed cache
        score(self, clips) -> (n_clips,) float64 array
        train_scores(self) -> (n_train,)  # scores of the clips fit() saw; leave-one-out where
                                     # a training clip would otherwise score 0 (used for the
                                     # threshold only when no clip can be held out)
        n_parameters() -> int        # of what score() uses (the submission's complexity)
        state() / load_state(state)  # everything score() needs, as tensors and plain values

The decision threshold is not the system's: asd.py holds a share of the normal training clips
out of `fit`, scores them with `score`, and fits a gamma to those scores, the same for every
system; it also refuses a model whose scores have collapsed to one value.
"""
import ast
import importlib
import inspect
from pathlib import Path

# CLI name -> (module under systems/, class, one line for `list systems` and --help)
SYSTEMS = {
    "ae": ("ae", "AE",
           "official DCASE autoencoder baseline (dense AE on 5 log-mel frames)"),
    "shinmura2020": ("shinmura2020", "Shinmura2020",
                     "Shinmura 2020: self-supervised MobileNetV2 + ArcFace, generated anomalies"),
    "cai2021": ("cai2021", "Cai2021",
                "Cai 2021: AE + MobileNetV2 section classifier trained jointly with a contrastive loss"),
    "narita2021": ("narita2021", "Narita2021",
                   "Narita 2021: CNN block features (PANNs ResNet38 or own MobileNetV2) + "
                   "Center-Loss VAE"),
    "jless2022": ("jless2022", "Jless2022",
                  "JLESS 2022: batch mixing, MobileFaceNet/DPT on section IDs, LOF/cosine/log-softmax"),
    "midea2024": ("midea2024", "Midea2024",
                  "Midea 2024: dual-branch spectrum/spectrogram CNN + CBAM, sub-cluster AdaCos"),
    "encoder_knn": ("encoder_knn", "EncoderKNN",
                    "frozen AudioSet encoder (EfficientAT mn04, BEATs, PANNs ResNet38) + "
                    "nearest-neighbour memory bank per section (GenRep); nothing trained"),
}

# keyword-only parameters every system's __init__ takes; the others are its own options
COMMON = ("year", "epochs", "batch_size", "lr", "seed", "device", "cache_dir", "log")


def _entry(name):
    if name not in SYSTEMS:
        raise ValueError(f"unknown system '{name}'; valid: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]


def get_system(name):
    """The class of a system, imported on first use."""
    module, cls, _ = _entry(name)
    return getattr(importlib.import_module(f"systems.{module}"), cls)


def description(name):
    """The system's one line, without importing it."""
    return _entry(name)[2]


def own_options(cls):
    """The system's own options: the keyword-only parameters of its __init__ that are not in
    COMMON, in signature order, with their defaults."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in COMMON}


def paper_figures(name):
    """The system's PAPER_DEV, the paper's development-set figures (a plain constant near the
    top of its file, see results.paper_entry), read from the source without importing the
    module (evaluate starts without torch); None where the file has none."""
    path = Path(__file__).with_name(f"{_entry(name)[0]}.py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PAPER_DEV"]:
            return ast.literal_eval(node.value)
    return None
