"""The command line's flags: every subcommand's arguments, with a help text and a default each,
and the two-phase parsing that gives `train` and `demo` the chosen system's own flags alone
(with the paper's values as defaults). asd.py holds what each command does; this file holds
only what it accepts. Imports no torch: `list` and `--help` start at once.
"""
import argparse
import contextlib
import importlib.abc
import importlib.machinery
import sys
import types

import data
import download
import synth
import systems

DESCRIPTION = "asd: unsupervised anomalous sound detection, the DCASE Task 2 systems of 2020-2026."
# --channel's choices (features.CHANNELS, written here too: flags.py imports no torch)
CHANNELS = ("near", "far", "mean", "both")


def add_run_flags(p):
    """Flags that say which run: year, system, part and where data and outputs are."""
    p.add_argument("--year", type=int, default=2020, help="DCASE year: file layout and metric")
    p.add_argument("--system", default="auto",
                   help=f"method ({', '.join(systems.SYSTEMS)}); auto: the year's default")
    p.add_argument("--part", default="dev", choices=("dev", "eval"),
                   help="development set (labels in the names) or evaluation set")
    p.add_argument("--data-root", default=str(data.DEFAULT_DATA_ROOT),
                   help="folder holding dcase<YEAR>/{dev,eval}_data/")
    p.add_argument("--data-dir", default=None,
                   help="the folder holding <machine>/ directly (overrides --data-root)")
    p.add_argument("--out", default="runs", help="runs go to OUT/dcase<YEAR>/<system>/<part>/ "
                   "(train --normal-dir: the model folder itself)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")


def add_channel_flag(p):
    """--channel: which channel of the stereo 2026 clips a run reads."""
    p.add_argument("--channel", default=None, choices=CHANNELS,
                   help="2026 (stereo) only: near = channel 0, the near microphone (the "
                        "official baseline's; train's default), far = channel 1, mean = their "
                        "mean, both = both (only for a system that declares two channels); "
                        "test and score: the model's")


def count(text):
    """argparse type: a whole number >= 0 (0 epochs is honoured, never read as 'the default')."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return n


def add_model_flags(p, system, year, quick, help_only=False):
    """Training flags: the common ones, then the chosen system's own group. Defaults are the
    system's paper values for the year (--quick: its smoke-run values); a flag given on the
    command line always wins. Only one system's flags are in a parser, so two systems may
    share a flag name (--mixup-alpha, --ensemble), each with its own default. help_only: the
    parser only prints help (see stand_ins)."""
    p.add_argument("--epochs", type=count, default=None, help="training epochs (the paper's)")
    p.add_argument("--batch-size", type=count, default=None, help="batch size (the paper's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (the paper's)")
    p.add_argument("--threshold-quantile", type=float, default=0.9,
                   help="decision threshold: this quantile of a gamma fit to held-out scores")
    p.add_argument("--threshold-holdout", type=float, default=0.1,
                   help="share of the source-domain training clips (at least 8, at most a "
                        "quarter) kept out of training to fit the threshold to; 0: the "
                        "baselines' in-sample fit, which flags too many normal clips")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: the system's tiny settings (few epochs, small network) "
                        "that exercise every step in seconds; not for results")
    if system is not None:
        with stand_ins(HEAVY if help_only else ()):
            cls = systems.get_system(system)
            cls.add_flags(p.add_argument_group(f"{system}: {systems.description(system)}"))
            p.set_defaults(**{**cls.defaults(year), **(cls.quick if quick else {})})
    add_compute_flags(p)


# --------------------------------------------------------------------------------------------
# --help without torch: a system's flags are declared in its file, which imports torch (and,
# through features, scipy) at the top; `train --help` took 3.7 s of CPU for that (20-28 s on
# a loaded machine). For help alone, those packages are stood in for while the file is read:
# declaring flags runs none of their code, and every module read that way is dropped after.

HEAVY = ("torch", "scipy")


class _StandIn(type):
    """A class that is anything: any attribute, call, operator or subscript gives itself, so
    a module defining nn.Module subclasses, decorators and constants loads without torch."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args, **kwargs):
        return cls

    def __getitem__(cls, key):
        return cls

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = \
        __rtruediv__ = __pow__ = __neg__ = __call__


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an empty module whose every attribute is a stand-in for the packages named."""

    def __init__(self, packages):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda attr: _StandIn(attr, (), {})
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def stand_ins(packages):
    """Within this block, `packages` not yet imported are stood in for; on leaving it, every
    module imported inside is removed again, so the next import of them is the real one."""
    if not packages or all(p in sys.modules for p in packages):
        yield
        return
    before, finder = set(sys.modules), _StandInFinder(packages)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is \
                    sys.modules[name]:
                delattr(sys.modules[parent], child)
            del sys.modules[name]


def add_host_flags(p):
    """How a run uses the machine it runs on: torch's CPU threads and freed memory."""
    # 2 threads on 2 cores shared with other work busy-wait: single steps stalled 5-100x here
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the same seed gives the same scores for the same "
                        "count (1: steady on a shared machine)")
    p.add_argument("--release-memory", action="store_true",
                   help="hand freed memory back to the system at once (glibc's default): a "
                        "lower peak (shinmura2020 at the paper's sizes, bench train's 24 clips: "
                        "4.9 GB, not 6.2-7.2), CPU steps of large networks up to 2x slower "
                        "(asd.keep_freed_memory). The peak grows with the clips: a full "
                        "shinmura2020 run on real data peaked at 9.2-9.35 GB; train prints its "
                        "peak at the end")


def add_compute_flags(p):
    add_host_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every random generator")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available")
    p.add_argument("--cache-dir", default="cache", help="where log-mel features are cached")
    p.add_argument("--no-cache", action="store_true", help="do not cache features on disk")


def build_parser(system=None, year=2020, quick=False, help_only=False):
    """The whole parser; train and demo hold the flags of `system` alone (see `phase_one`)."""
    parser = argparse.ArgumentParser(prog="asd.py", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train", help="train one machine type's model, or your own machine's",
                       formatter_class=fmt)
    add_run_flags(p), add_model_flags(p, system, year, quick, help_only), add_channel_flag(p)
    p.add_argument("--machine", default=None, help="machine type, e.g. valve")
    p.add_argument("--normal-dir", default=None,
                   help="instead of --machine: a folder of your own machine's normal recordings "
                        "(*.wav; sub-folders become sections); the model goes to --out")
    p = sub.add_parser("score", help="score any recordings with a trained model",
                       formatter_class=fmt)
    p.add_argument("paths", nargs="+", help="wav files, and folders searched for *.wav")
    p.add_argument("--model", required=True, help="a model folder written by train")
    p.add_argument("--csv", default=None, help="also write file,score,decision to this CSV")
    p.add_argument("--plot", default=None, metavar="SVG",
                   help="also draw the histogram of the scores against the threshold and the "
                        "held-out normal clips' scores it was fitted to, into this SVG file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --csv or --plot file")
    add_host_flags(p), add_channel_flag(p)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available")
    p = sub.add_parser("test", help="score the test clips; write the submission CSVs",
                       formatter_class=fmt)
    add_run_flags(p), add_compute_flags(p), add_channel_flag(p)
    p.add_argument("--machine", required=True, help="machine type, e.g. valve")
    p = sub.add_parser("evaluate", help="official score from the result CSVs and the labels",
                       formatter_class=fmt)
    add_run_flags(p)
    p.add_argument("--ground-truth", default=None,
                   help="eval part: folder holding ground_truth_data/ (default: the data dir)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="also write results.html (the table and the pictures, for a browser) "
                        "and plots/<machine>.svg: ROC curves per section and domain with the "
                        "pAUC region shaded, test score histograms with the threshold")
    add_download_parsers(sub, fmt)
    add_data_parsers(sub, fmt, system, year, quick, help_only)
    return parser


def add_download_parsers(sub, fmt):
    p = sub.add_parser("download", help="fetch, verify and unpack a year's data from Zenodo",
                       formatter_class=fmt)
    p.add_argument("--year", type=int, default=2020, help="DCASE year")
    p.add_argument("--machine", default=None,
                   help="one machine type; when not given, every one the part lists")
    p.add_argument("--part", default="all", choices=("dev", "train", "eval", "truth", "all"),
                   help="development set, additional training data, evaluation set, 2020 "
                        "ground truth, or all")
    p.add_argument("--data-root", default=str(data.DEFAULT_DATA_ROOT),
                   help="unpacks into DATA_ROOT/dcase<YEAR>/{dev,eval}_data/")
    p.add_argument("--zenodo-url", default=None,
                   help=f"Zenodo's address; when not given, ${download.ZENODO_URL_ENV}, "
                        f"else {download.ZENODO_URL}")
    p.add_argument("--keep-archives", action="store_true",
                   help="keep the zip files (in .downloads/) after unpacking")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--weights", default=None, choices=list(download.WEIGHTS),
                   help="instead of data: a pre-trained encoder's weights (mn04: EfficientAT "
                        "mn04_as for encoder_knn) into DATA_ROOT/weights/, sha256-checked")
    p.add_argument("--weights-url", default=None,
                   help=f"a folder address holding the weights file; when not given, "
                        f"${download.WEIGHTS_URL_ENV}, else the release")
    p = sub.add_parser("package", help="the eval result CSVs as a submission folder",
                       formatter_class=fmt)
    p.add_argument("--year", type=int, default=2020, help="DCASE year")
    p.add_argument("--system", default="auto", help="method; auto: the year's default")
    p.add_argument("--out", default="runs", help="where the runs are (as for test)")
    p.add_argument("--dest", default="submissions",
                   help="writes DEST/dcase<YEAR>/<system>/<label>/")
    p.add_argument("--data-root", default=str(data.DEFAULT_DATA_ROOT),
                   help="where the eval set's ground truth may be (checked for 2023+)")
    p.add_argument("--label", default="Lastname_Institute_task2_1",
                   help="<Lastname>_<Institute>_task2_<1-4>, the corresponding author's")
    p.add_argument("--name", default=None, help="submission name (default: the system's)")
    p.add_argument("--abbreviation", default=None, help="at most 10 characters")
    p.add_argument("--authors", nargs="+", default=["Lastname, Firstname"],
                   help="'Lastname, Firstname' of each author, the corresponding one first")
    p.add_argument("--source-code", default="asd (python asd.py train/test)",
                   help="where the code is published")
    p.add_argument("--team", default=None, help="2026: the team folder of the evaluator's "
                   "teams/<team>/<label>/ layout (default: the label less _task2_<n>)")
    p.add_argument("--name-form", default=None, choices=("plain", "baseline", "both"),
                   help="result file names: plain (anomaly_score_<m>_section_00_test.csv), the "
                        "baseline's (..._DCASE<Y>T2<m>_section_00_test_seed13711_id(0_)_Eval.csv"
                        ", 2023+) or both; default: both for 2026, else plain")


def add_data_parsers(sub, fmt, system, year, quick, help_only=False):
    p = sub.add_parser("synth", help="write a small synthetic data set", formatter_class=fmt)
    p.add_argument("--year", type=int, default=2020, help="file layout of this DCASE year")
    p.add_argument("--out", default=str(data.DEFAULT_DATA_ROOT), help="data root to write")
    p.add_argument("--machines", nargs="*", default=None, help="machine types (default: 3)")
    p.add_argument("--n-train", type=int, default=20, help="training clips per section")
    p.add_argument("--n-test", type=int, default=10, help="test clips per section/domain/label")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--sections", type=int, default=2,
                   help="sections (machine IDs) per machine type and part, the first ones")
    p.add_argument("--anomalies", default=",".join(synth.ANOMALIES),
                   help="comma-separated kinds an anomalous clip draws from: "
                        f"{', '.join(synth.ANOMALIES)}")
    p = sub.add_parser("demo", help="synthesise, train, test, evaluate (minutes, CPU)",
                       formatter_class=fmt)
    p.add_argument("--year", type=int, default=2022, help="DCASE year of the layout and metric")
    p.add_argument("--system", default="auto", help="method; auto: the year's default")
    p.add_argument("--out", default="demo", help="folder for the data, runs and cache")
    p.add_argument("--force", action="store_true", help="overwrite an earlier demo's results")
    p.add_argument("--n-train", type=int, default=20, help="training clips per section")
    p.add_argument("--n-test", type=int, default=10, help="test clips per section/domain/label")
    add_model_flags(p, system, year, quick, help_only), add_channel_flag(p)
    p.set_defaults(epochs=30, batch_size=64)   # small data: more steps
    p = sub.add_parser("list", help="years, systems, or a year's machines and sections",
                       formatter_class=fmt)
    p.add_argument("what", choices=("years", "systems", "default-system", "machines", "sections"),
                   help="default-system: the system --system auto picks for --year")
    p.add_argument("--year", type=int, default=2020, help="DCASE year")
    p.add_argument("--part", default="dev", choices=("dev", "eval"), help="dev or eval set")
    p = sub.add_parser("bench", help="benchmarks: 'features' (log-mel against librosa), "
                       "'train' (a system's seconds per epoch and peak memory)",
                       formatter_class=fmt)
    p.add_argument("what", choices=("features", "train"), help="what to measure")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of bench.py")


def phase_one(argv):
    """--system, --year and --quick of a train or demo command, read before the full parser is
    built, since that parser holds only this system's flags: (system, year, quick). --system
    auto is the year's default system, or the AE for --normal-dir (the default systems of
    2020+ pre-train across machine types, and your own folder holds one). The other commands
    need no system's flags: (None, 2020, False)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in ("train", "demo"):
        return None, 2020, False
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--system", default="auto")
    pre.add_argument("--year", type=int, default=2022 if command == "demo" else 2020)
    pre.add_argument("--quick", action="store_true")
    pre.add_argument("--normal-dir", default=None)
    known, _ = pre.parse_known_args(argv)
    system = known.system
    if system == "auto":     # your own machine: one folder of normals (no cross-type pool)
        system = own_machine_system() if known.normal_dir else data.get_year(known.year).system
    systems.description(system)                     # an unknown name: error listing the valid
    return system, known.year, known.quick


def own_machine_system():
    """--normal-dir's default: encoder_knn when the mn04 weights are where `download --weights
    mn04` puts them (on the real BLDC-motor sample it ranks every fault first, AUC and pAUC 1.0
    on both motors, where the AE scores 0.995/0.973 and 1.0/1.0; on RoboticArm 0.561 against
    the AE's 0.496; README), else the AE, saying in one line how to get them."""
    weights = data.DEFAULT_DATA_ROOT / "weights" / download.WEIGHTS["mn04"]["file"]
    if weights.exists():
        return "encoder_knn"
    print(f"--normal-dir: training the AE; for encoder_knn, the better detector of your own "
          f"machine, get its weights: python asd.py download --weights mn04 (into {weights})")
    return "ae"
