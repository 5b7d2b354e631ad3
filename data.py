"""The DCASE Task 2 data sets, 2020-2026: one table of the years, file-name parsing, clip listing
and the organisers' ground-truth tables for the anonymised evaluation clips.

`YEARS` is the single source of truth: machine types (dev and eval), their machine IDs (2020) or
sections (2021+), the test folders, the machine types whose attributes are hidden
(`noAttribute`), the Zenodo records of each part and each year's default system. Everything
else (the CLI, run_all.sh, the synthetic data) reads it.

On disk, one layout for every year, exactly as the organisers' archives unpack below it:

    <data-root>/dcase<YEAR>/dev_data/<machine>/train/...      development set
    <data-root>/dcase<YEAR>/eval_data/<machine>/train/...     additional training data
    <data-root>/dcase<YEAR>/eval_data/<machine>/test/...      evaluation set (anonymised names)
    <data-root>/dcase<YEAR>/eval_data/ground_truth_*/...      the organisers' label tables
    <data-root>/dcase2020/eval_data/eval_data_list.csv         (2020: one list)

2021 has `source_test/` and `target_test/` in place of `test/`; 2025 adds `supplemental/`.
2026 is stereo (`Year.channels`): channel 0 the near microphone, "equivalent to the previous
mono" (the baseline's README), channel 1 a far one; `supplemental/` is gone again.
`normal_clips` reads a plain folder of your own machine's normal recordings instead.
Facts follow the organisers' task pages and their baseline repositories (nttcslab).
It also holds `write_atomic`, the one writer that every output file of asd goes through, and
`lock`, which keeps two runs from building the same folder at once.
"""
import contextlib
import csv
import datetime
import fcntl
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_ROOT = Path("data")
DOMAINS = ("source", "target")
LABELS = ("normal", "anomaly", "unknown")


class DataError(ValueError):
    """A data set, folder or file name that asd cannot use; the message says which and why."""


@dataclass(frozen=True)
class Year:
    year: int
    dev: dict            # machine type -> sections (2020: machine IDs) of the development set
    eval: dict           # machine type -> sections of the evaluation set
    test_dirs: tuple     # folders below <machine>/ that hold test clips
    records: dict        # part ("dev", "train", "eval"; 2020 "truth") -> Zenodo record id
    system: str          # the year's default system: its seed paper; "ae" until that is built
    no_attribute: frozenset = field(default_factory=frozenset)  # attributes hidden in names
    extra_dirs: tuple = ()   # further clip folders (2025: supplemental/)
    channels: int = 1        # channels of every clip (2026: 2, near and far microphone)

    @property
    def machines(self):
        return sorted(set(self.dev) | set(self.eval), key=str.lower)

    def sections(self, machine, part):
        table = self.dev if part == "dev" else self.eval
        if machine not in table:
            valid = ", ".join(sorted(table, key=str.lower))
            raise DataError(f"unknown machine '{machine}' for the {self.year} {part} set; "
                            f"valid: {valid}")
        return table[machine]


def _same(machines, sections):
    return {m: tuple(sections) for m in machines}


_MIMII_2020 = {m: ("00", "02", "04", "06") for m in ("fan", "pump", "slider", "valve")}
_MIMII_2020_EVAL = {m: ("01", "03", "05") for m in ("fan", "pump", "slider", "valve")}
_DEV_2022 = ("bearing", "fan", "gearbox", "slider", "ToyCar", "ToyTrain", "valve")

YEARS = {
    2020: Year(2020,
               dev={**_MIMII_2020, "ToyCar": ("01", "02", "03", "04"),
                    "ToyConveyor": ("01", "02", "03")},
               eval={**_MIMII_2020_EVAL, "ToyCar": ("05", "06", "07"),
                     "ToyConveyor": ("04", "05", "06")},
               test_dirs=("test",),
               records={"dev": 3678171, "train": 3727685, "eval": 3841772,
                        "truth": 3951620},      # eval_data_list.csv, the eval labels
               system="shinmura2020"),
    2021: Year(2021,
               dev=_same(("fan", "gearbox", "pump", "slider", "ToyCar", "ToyTrain", "valve"),
                         ("00", "01", "02")),
               eval=_same(("fan", "gearbox", "pump", "slider", "ToyCar", "ToyTrain", "valve"),
                          ("03", "04", "05")),
               test_dirs=("source_test", "target_test"),
               records={"dev": 4562016, "train": 4660992, "eval": 4884786},
               system="ae"),
    2022: Year(2022, dev=_same(_DEV_2022, ("00", "01", "02")),
               eval=_same(_DEV_2022, ("03", "04", "05")), test_dirs=("test",),
               records={"dev": 6355122, "train": 6462969, "eval": 6586456},
               system="ae"),
    2023: Year(2023, dev=_same(_DEV_2022, ("00",)),
               eval=_same(("bandsaw", "grinder", "shaker", "ToyDrone", "ToyNscale", "ToyTank",
                           "Vacuum"), ("00",)),
               test_dirs=("test",),
               records={"dev": 7882613, "train": 7830345, "eval": 7860847},
               system="ae"),
    2024: Year(2024, dev=_same(_DEV_2022, ("00",)),
               eval=_same(("3DPrinter", "AirCompressor", "BrushlessMotor", "HairDryer",
                           "HoveringDrone", "RoboticArm", "Scanner", "ToothBrush",
                           "ToyCircuit"), ("00",)),
               test_dirs=("test",),
               records={"dev": 10902294, "train": 11259435, "eval": 11363076},
               system="ae",
               no_attribute=frozenset({"gearbox", "slider", "ToyTrain", "AirCompressor",
                                       "BrushlessMotor", "HoveringDrone", "ToothBrush"})),
    2025: Year(2025, dev=_same(_DEV_2022, ("00",)),
               eval=_same(("AutoTrash", "BandSealer", "CoffeeGrinder", "HomeCamera",
                           "Polisher", "ScrewFeeder", "ToyPet", "ToyRCCar"), ("00",)),
               test_dirs=("test",),
               records={"dev": 15097779, "train": 15392814, "eval": 15519362},
               system="ae",
               no_attribute=frozenset({"bearing", "slider", "ToyTrain", "AutoTrash",
                                       "Polisher", "ScrewFeeder", "ToyPet"}),
               extra_dirs=("supplemental",)),
    # 2026 (nttcslab/dcase2023_task2_baseline_ae, branch 2026t2/v5.x.x: README.md,
    # datasets/download_path_2026.yaml, machine_type_2026_{dev,eval}.yaml): dev record 19336329
    # (dev_ToyCar_r2.zip replaced dev_ToyCar.zip on 2026-04-09; download takes the latest
    # revision), additional training data 20151556 (eval_data_<m>_train.zip). The branch
    # names no record for the evaluation test clips; 20437238 is Zenodo's page "DCASE 2026
    # Challenge Task 2 Evaluation Dataset" (Hitachi, NTT, ...; read through a search, not from
    # the organisers' repository), whose archives participants fetch as eval_data_<m>_test.zip.
    # No MD5 is written here: download checks each archive against the record's own list.
    # Which machine types hide their attributes (noAttribute) is not in these files: none here.
    2026: Year(2026,
               dev=_same(("ToyCar", "ToyCarEmu", "bearingEmu", "fan", "gearboxEmu",
                          "sliderEmu", "valveEmu"), ("00",)),
               eval=_same(("ToyDrone", "ToothBrush", "SewingMachine", "BlowerDustCollector",
                           "Sander"), ("00",)),
               test_dirs=("test",),
               records={"dev": 19336329, "train": 20151556, "eval": 20437238},
               system="ae", channels=2),
}


def get_year(year):
    if year not in YEARS:
        raise DataError(f"unknown year {year}; valid: {', '.join(map(str, YEARS))}")
    return YEARS[year]


# File names. Each pattern is one year family's official naming; `describe` is what an error
# shows when a name matches none of them.
NAME_PATTERNS = {
    2020: [re.compile(r"^(?P<label>normal|anomaly)_id_(?P<section>\d\d)_(?P<index>\d{8})\.wav$"),
           re.compile(r"^id_(?P<section>\d\d)_(?P<index>\d{8})\.wav$")],  # eval, anonymised
    2021: [re.compile(r"^section_(?P<section>\d\d)_(?P<domain>source|target)_"
                      r"(?P<split>train|test)_(?P<label>normal|anomaly)_(?P<index>\d{4})"
                      r"(?:_(?P<attributes>.+))?\.wav$"),
           re.compile(r"^section_(?P<section>\d\d)_(?:(?P<domain>source|target)_test_)?"
                      r"(?P<index>\d{4})\.wav$")],  # eval, anonymised
    2025: [re.compile(r"^section_(?P<section>\d\d)_(?P<domain>source|target)_supplemental_"
                      r"(?P<kind>[A-Za-z]+)_(?P<index>\d{4})(?:_(?P<attributes>.+))?\.wav$")],
    # 2026: the baseline's README lists development clips with an empty attribute string,
    # 'section_00_source_train_normal_0000_.wav'; the 2021 pattern with the trailing '_' kept
    2026: [re.compile(r"^section_(?P<section>\d\d)_(?P<domain>source|target)_"
                      r"(?P<split>train|test)_(?P<label>normal|anomaly)_(?P<index>\d{4})"
                      r"_(?P<attributes>)\.wav$")],
}
DESCRIBE = {
    2020: "normal_id_00_00000000.wav, anomaly_id_00_00000000.wav or (eval) id_05_00000000.wav",
    2021: "section_00_source_train_normal_0000_<attributes>.wav or (eval) section_03_0000.wav",
}


@dataclass(frozen=True)
class Clip:
    path: Path
    year: int
    machine: str
    section: str          # "00"; the 2020 machine ID goes here
    domain: str | None    # "source", "target"; None where the name and folder do not say
    split: str            # "train", "test" or "supplemental"
    label: str            # "normal", "anomaly" or "unknown" (anonymised evaluation clips)
    attributes: str = ""  # e.g. "car_C2_spd_34V_mic_1", "noAttribute"; "" where none
    index: str = ""

    @property
    def name(self):
        return self.path.name


def parse_name(path, *, year, machine=None, split=None):
    """Parse one clip's path into a `Clip`. The machine type defaults to the folder above the
    split folder and the split to the folder holding the file, as in the organisers' archives."""
    path = Path(path)
    machine = machine or path.parent.parent.name
    folder = split or path.parent.name
    patterns = NAME_PATTERNS[2020] if year == 2020 else NAME_PATTERNS[2021] + NAME_PATTERNS[2025]
    patterns = patterns + (NAME_PATTERNS[2026] if year >= 2026 else [])
    for pattern in patterns:
        match = pattern.match(path.name)
        if match:
            return _clip_from_match(path, match.groupdict(), year, machine, folder)
    expected = DESCRIBE[2020 if year == 2020 else 2021]
    raise DataError(f"{path}: not a DCASE {year} clip name; expected {expected}")


def _clip_from_match(path, g, year, machine, folder):
    domain = g.get("domain")
    if domain is None and folder in ("source_test", "target_test"):
        domain = folder.split("_")[0]       # 2021 keeps the domain in the folder name
    split = g.get("split") or ("supplemental" if "kind" in g else
                               "train" if folder == "train" else "test")
    label = g.get("label") or "unknown"
    if split == "supplemental":
        label = "normal" if g["kind"] == "normal" else "unknown"
    return Clip(path=path, year=year, machine=machine, section=g["section"],
                domain=None if year == 2020 else domain, split=split, label=label,
                attributes=g.get("attributes") or "", index=g["index"])


def part_dir(data_root, year, part):
    """The folder that holds one part's machine folders: <root>/dcase<YEAR>/<part>_data."""
    if part not in ("dev", "eval"):
        raise DataError(f"unknown part '{part}'; valid: dev, eval")
    return Path(data_root) / f"dcase{year}" / f"{part}_data"


def list_clips(folder, *, year, machine, split):
    """Every clip of one machine type and split below `folder` (a part folder), sorted, parsed.
    split: "train", "test" (2021: both domain folders, or the one there is: a test set of one
    domain, whose other domain's figures evaluate reports as undefined) or "supplemental"."""
    subdirs = get_year(year).test_dirs if split == "test" else (split,)
    present = tuple(sub for sub in subdirs if (Path(folder) / machine / sub).is_dir())
    subdirs = present if len(subdirs) > 1 and present else subdirs
    clips = []
    for sub in subdirs:
        where = Path(folder) / machine / sub
        if not where.is_dir():
            raise DataError(f"{where}: folder not found; download the {year} data "
                            f"(python asd.py download --year {year}) or point --data-root/"
                            f"--data-dir at the folder that holds {machine}/")
        found = sorted(where.glob("*.wav"))
        if not found:
            raise DataError(f"{where}: no *.wav files; the folder is empty or incomplete")
        clips += [parse_name(check_name(p), year=year, machine=machine, split=sub)
                  for p in found]
    return clips


# Ground truth of the anonymised evaluation clips, in each year's evaluator format:
#   2020   eval_data_list.csv (Zenodo record 3951620, y-kawagu/dcase2020_task2_evaluator): a line
#          holding a machine type, then one row per clip of it, 'id_01_00000000.wav,
#          normal_id_01_00000000.wav,0' (the last column: 1 = anomaly); a clip's machine ID is
#          found in its name, as the evaluator does
#   2021   ground_truth_data/ground_truth_<m>_section_<XX>_<source|target>_test.csv   file,label
#          (y-kawagu/dcase2021_task2_evaluator: one table per domain, the domain in its name)
#   2022+  ground_truth_data/ground_truth_<m>_section_<XX>_test.csv        file,label (1 = anomaly)
#          ground_truth_domain/ground_truth_<m>_section_<XX>_test.csv      file,domain (1 = target)
#          ground_truth_attributes/ground_truth_<m>_section_<XX>_test.csv  file,full name (optional)
# Left out: the 2024+ attribute correspondence tables (attributes_00_test_correspondence.csv),
# which restore hidden attribute strings; no official score depends on attributes.
EVAL_DATA_LIST = "eval_data_list.csv"   # the 2020 ground truth's file name


def _read_table(path):
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except FileNotFoundError:
        raise DataError(f"{path}: ground-truth table not found; give --ground-truth DIR, the "
                        f"folder holding ground_truth_data/ (the organisers' evaluator tables)")
    for i, row in enumerate(rows, 1):
        if len(row) < 2:
            raise DataError(f"{path}:{i}: expected 'file,value', got {row!r}")
    return {r[0]: r[1] for r in rows}


def read_ground_truth(gt_dir, *, machine, section, year=2022):
    """Labels and domains of one section's anonymised test clips, read from the organisers'
    tables of `year`: {file: (label, domain, attributes)}; domain is None in 2020.
    gt_dir: the folder holding ground_truth_data/ (2021+) or eval_data_list.csv (2020; the
    file itself will do too)."""
    if year == 2020:
        return _truth_2020(gt_dir, machine, section)
    if year == 2021:
        return _truth_2021(gt_dir, machine, section)
    stem = f"ground_truth_{machine}_section_{section}_test.csv"
    labels = _read_table(Path(gt_dir) / "ground_truth_data" / stem)
    domains = _read_table(Path(gt_dir) / "ground_truth_domain" / stem)
    attr_path = Path(gt_dir) / "ground_truth_attributes" / stem
    attrs = _read_table(attr_path) if attr_path.exists() else {}
    truth = {}
    for name, label in labels.items():
        if name not in domains:
            raise DataError(f"{Path(gt_dir) / 'ground_truth_domain' / stem}: no row for {name}")
        if label not in ("0", "1") or domains[name] not in ("0", "1"):
            raise DataError(f"{Path(gt_dir) / 'ground_truth_data' / stem}: {name} has label "
                            f"{label!r} / domain {domains[name]!r}; expected 0 or 1")
        full = attrs.get(name, "")
        truth[name] = ("anomaly" if label == "1" else "normal",
                       "target" if domains[name] == "1" else "source",
                       _attributes_of(full))
    return truth


def _truth_2021(gt_dir, machine, section):
    """2021: one file,label table per domain; the domain is the table's."""
    truth = {}
    for domain in DOMAINS:
        path = Path(gt_dir) / "ground_truth_data" / (
            f"ground_truth_{machine}_section_{section}_{domain}_test.csv")
        for name, label in _read_table(path).items():
            if label not in ("0", "1"):
                raise DataError(f"{path}: {name} has label {label!r}; expected 0 or 1")
            truth[name] = ("anomaly" if label == "1" else "normal", domain, "")
    return truth


def read_eval_data_list(path):
    """The 2020 eval_data_list.csv: {machine type: {file: "normal"|"anomaly"}}."""
    blocks, machine = {}, None
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(r)]
    except FileNotFoundError:
        raise DataError(f"{path}: 2020 ground truth not found; give --ground-truth, the "
                        f"organisers' {EVAL_DATA_LIST} (Zenodo record 3951620) or its folder")
    for i, row in enumerate(rows, 1):
        if len(row) == 1:                       # a machine type opens its block
            machine = row[0].strip()
            blocks.setdefault(machine, {})
        elif machine is None or row[-1] not in ("0", "1"):
            raise DataError(f"{path}:{i}: expected a machine type line, then rows "
                            f"'id_XX_NNNNNNNN.wav,<name>,<0|1>'; got {row!r}")
        else:
            blocks[machine][row[0]] = "anomaly" if row[-1] == "1" else "normal"
    return blocks


def _truth_2020(gt, machine, section):
    path = Path(gt) / EVAL_DATA_LIST if Path(gt).is_dir() else Path(gt)
    blocks = read_eval_data_list(path)
    if machine not in blocks:
        raise DataError(f"{path}: no block for machine type '{machine}'; "
                        f"found: {', '.join(blocks) or 'none'}")
    rows = {name: (label, None, "") for name, label in blocks[machine].items()
            if f"id_{section}_" in name}
    if not rows:
        raise DataError(f"{path}: no rows of {machine} id_{section}")
    return rows


def _attributes_of(full_name):
    """The attribute string of an attribute-table name such as
    'section_00_source_normal_0035_weight15_BckgF' (no split word there) -> 'weight15_BckgF'."""
    match = re.match(r"^section_\d\d_(?:source|target)_(?:test_)?(?:normal|anomaly)_\d{4}_?(.*?)"
                     r"(?:\.wav)?$", full_name)
    return match.group(1) if match else ""


def label_eval_clips(clips, gt_dir):
    """Fill in label, domain and attributes of anonymised test clips from the ground truth;
    a clip with no row there is an error naming it (it would otherwise vanish from the score)."""
    tables, labelled = {}, []
    for clip in clips:
        key = (clip.machine, clip.section)
        if key not in tables:
            tables[key] = read_ground_truth(gt_dir, machine=clip.machine, section=clip.section,
                                            year=clip.year)
        if clip.name not in tables[key]:
            raise DataError(f"{clip.path}: no row in the ground truth of {clip.machine} "
                            f"section {clip.section} under {gt_dir}")
        label, domain, attrs = tables[key][clip.name]
        labelled.append(Clip(clip.path, clip.year, clip.machine, clip.section, domain,
                             clip.split, label, attrs, clip.index))
    return labelled


# A plain folder of one machine's normal recordings (your own machine): no DCASE names needed.

def plain_clip(path, *, year, machine, section="00", split="train"):
    """A clip known only by its path: source domain, label normal (training) or unknown."""
    return Clip(path=Path(path), year=year, machine=machine, section=section, domain="source",
                split=split, label="normal" if split == "train" else "unknown")


def check_name(path):
    """Refuse a file name that is not valid UTF-8 (the bytes Linux allows, which no CSV, JSON
    or terminal of asd's can carry): one line naming it, with the bad bytes escaped."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise DataError(f"{shown}: the file name is not valid UTF-8; rename the file") from None
    return path


def normal_clips(folder, *, year):
    """The normal recordings of a plain folder: machine = the folder's name; every sub-folder
    holding *.wav is one section ("00", "01", ... in name order), else the folder's own *.wav
    are section "00". Returns (clips, {sub-folder name: section})."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; give --normal-dir, a folder of normal "
                        f"recordings (*.wav, or sub-folders of them)")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.wav")))
    own = sorted(folder.glob("*.wav"))
    if subdirs and own:
        raise DataError(f"{folder}: holds both *.wav and sub-folders of *.wav; put every file "
                        f"in a sub-folder (one per section) or none")
    sections = {d.name: f"{i:02d}" for i, d in enumerate(subdirs)} or {folder.name: "00"}
    groups = [(sorted(d.glob("*.wav")), sections[d.name]) for d in subdirs] or [(own, "00")]
    clips = [plain_clip(check_name(p), year=year, machine=folder.name, section=section)
             for paths, section in groups for p in paths]
    if not clips:
        raise DataError(f"{folder}: no *.wav files here or in its sub-folders")
    return clips, sections


# --------------------------------------------------------------------------------------------
# Files to score, and the labels of scored clips

def wav_paths(items):
    """The files given, and every *.wav below the folders given (sorted), in order."""
    paths = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(item.rglob("*.wav"))
            if not found:
                raise DataError(f"{item}: no *.wav files in this folder or below it")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


def truth_from_names(*, year):
    """(machine, section, file name) -> (label, domain), read from a dev set's file names."""
    def truth(machine, section, name):
        clip = parse_name(Path(name), year=year, machine=machine, split="test")
        return clip.label, clip.domain
    return truth


def truth_from_tables(gt, *, year):
    """(machine, section, file name) -> (label, domain), from the organisers' ground-truth
    tables of `year` in folder gt (for the anonymised eval set); each table read once."""
    tables = {}

    def truth(machine, section, name):
        if (machine, section) not in tables:
            tables[machine, section] = read_ground_truth(gt, machine=machine, section=section,
                                                         year=year)
        table = tables[machine, section]
        if name not in table:
            raise DataError(f"{gt}: the ground truth of {machine} section {section} has no row "
                            f"for {name}; is it the {year} ground truth?")
        return table[name][:2]
    return truth


# --------------------------------------------------------------------------------------------
# What a system trains on: its declaration resolved into clips

def training_clips(data_root, year, machine, part, *, additional=False, paper="", log=print):
    """The training clips of one machine type, as a system declares them (its
    `training_data`): the part's train folder; for --part eval of a type that is also in the
    dev set (2020-2022), the dev set's training clips first, as the baselines trained for
    evaluation; with `additional`, dev runs also take the additional training sections
    (eval_data/<machine>/train, 2020-2022), as JLESS and Narita did. Where those are not on
    disk, training goes on with what is there and one line names the missing sections, what
    the paper used (`paper`) and the command that fetches them."""
    spec = get_year(year)
    clips = list_clips(part_dir(data_root, year, part), year=year, machine=machine, split="train")
    if part == "eval" and machine in spec.dev:
        dev = part_dir(data_root, year, "dev")
        return list_clips(dev, year=year, machine=machine, split="train") + clips
    if part == "dev" and additional and machine in spec.eval:
        extra = part_dir(data_root, year, "eval")
        if (extra / machine / "train").is_dir():
            return clips + list_clips(extra, year=year, machine=machine, split="train")
        log(f"{machine}: the additional training sections {', '.join(spec.eval[machine])} "
            f"({extra / machine / 'train'}) are not there, so this trains on sections "
            f"{', '.join(sorted({c.section for c in clips}))} only; the paper used {paper}; "
            f"fetch them: python asd.py download --year {year} --machine {machine} --part "
            f"train --data-root {data_root}")
    return clips


def clip_groups(clips):
    """What a network saw, for model.json's "trained_on": one {"machine", "part", "section",
    "clips"} per group, sorted; the part is the clip's part folder (dev_data -> dev), or the
    folder's own name outside the standard layout."""
    counts = {}
    for c in clips:
        part = c.path.parents[2].name if len(c.path.parents) > 2 else ""
        key = (c.machine, part.removesuffix("_data"), c.section)
        counts[key] = counts.get(key, 0) + 1
    return [{"machine": m, "part": p, "section": s, "clips": n}
            for (m, p, s), n in sorted(counts.items())]


# --------------------------------------------------------------------------------------------
# Held-out normals for the decision threshold

MIN_HELD_OUT = 8   # clips: a gamma fitted to fewer scores is a guess


def hold_out(clips, share, *, seed):
    """Split training clips into (fit, held_out): a seeded random `share` of the source-domain
    clips (at least MIN_HELD_OUT, at most a quarter of them) is kept out of training, so that
    the decision threshold is fitted to scores of normal clips the model has never seen.
    Target-domain clips (a handful per section from 2022 on) all stay in training. share 0,
    or too few clips to hold out two: (clips, [])."""
    source = [i for i, c in enumerate(clips) if (c.domain or "source") == "source"]
    n = max(round(share * len(source)), min(MIN_HELD_OUT, len(source) // 4)) if share > 0 else 0
    if n < 2:
        return list(clips), []
    held = set(random.Random(seed).sample(source, n))
    return ([c for i, c in enumerate(clips) if i not in held],
            [c for i, c in enumerate(clips) if i in held])


def split_held_out(clips, share, *, seed):
    """hold_out applied to each training folder (<part>_data/<machine>/train) of `clips` on its
    own, seeded by the seed and the folder's name: every run of a year, whatever machine type
    or system it trains, holds out the same clips of a folder. So a model shared by several
    machine types never trains on a clip that one of them fits its threshold to. (fit, held)."""
    folders = {}
    for c in clips:
        folders.setdefault(c.path.parent, []).append(c)
    fit, held = [], []
    for folder, group in folders.items():
        name = "/".join(folder.parts[-3:])                  # e.g. dev_data/fan/train
        f, h = hold_out(group, share, seed=f"{seed}/{name}")
        fit, held = fit + f, held + h
    return fit, held


# --------------------------------------------------------------------------------------------
# The one atomic writer: every output file of asd goes through it

def write_atomic(path, write, *, text=False):
    """Write a file whole or not at all: write(f) fills a temporary file made in the same
    folder with a unique name (two runs at once never share one), which is flushed, fsynced,
    made readable by all (0644, as a plain file would be) and renamed over `path`. On any
    error, a full disk or Ctrl-C included, `path` is untouched and the temporary file removed;
    an OSError comes back as a DataError naming `path`.
    f is opened in binary mode, or as UTF-8 text with newline="" (for csv) when text=True."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise DataError(f"{path}: could not write it ({e.strerror or e}); check the folder's "
                        f"permissions and free space") from e
    try:
        with (os.fdopen(fd, "w", newline="", encoding="utf-8") if text else
              os.fdopen(fd, "wb")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)              # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise DataError(f"{path}: could not write it ({e.strerror or e}); nothing was "
                            f"changed there; free some space or choose another folder") from e
        raise
    return path


def write_text(path, text):
    """write_atomic for a string (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text), text=True)


def write_json(path, obj):
    """write_atomic for JSON, indented; what json cannot hold (paths) is written as str."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path, *, fix, keys=()):
    """A JSON file asd wrote (a model's model.json, threshold.json, ...), as a dict holding
    `keys`; unreadable, not JSON, or without one of them: a DataError naming the file, the
    reason and `fix` (what to do, e.g. "train the model again with --force")."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise DataError(f"{path}: not readable JSON ({reason}); {fix}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DataError(f"{path}: has no '{missing[0]}'; {fix}")
    return obj


# --------------------------------------------------------------------------------------------
# One builder at a time: an exclusive lock on a file beside what is built

class Busy(RuntimeError):
    """Another live process holds the lock (its pid, start time and what it builds are named)."""


def _open_locked(path, blocking):
    """Open `path` (created if needed) and flock it; (fd, None) once held, or (None, holder)
    when busy and not blocking. Retries when the file was removed by its previous holder
    between our open and our lock (then the lock would be on a file no one else sees)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 4096)
            os.close(fd)
            return None, holder
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)


def _holder(raw):
    """'pid N, started T' from a lock file's JSON (or what can be said when it is not yet written)."""
    try:
        h = json.loads(raw)
        return f"pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown, just started"


@contextlib.contextmanager
def lock(path: Path, *, what: str, wait: bool, log=print):
    """Hold an exclusive lock on PATH (a file, e.g. <folder>.lock beside the folder built)
    while WHAT (e.g. "model runs/.../models/fan") is built. fcntl.flock, so the kernel
    frees it when the process dies (no stale lock). The holder writes
    {"pid", "started" (ISO time), "what"} into the file. Busy and wait=False: raise
    data.Busy (a RuntimeError) whose message is one line "another run (pid N, started T)
    is building WHAT; wait for it or stop it". Busy and wait=True: log one line saying it
    waits for pid N, then block. The file is removed on release."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, holder = _open_locked(path, blocking=False)
    if fd is None:
        if not wait:
            raise Busy(f"another run ({_holder(holder)}) is building {what}; "
                       f"wait for it or stop it")
        log(f"waiting for another run ({_holder(holder)}) building {what} ({path})")
        fd, _ = _open_locked(path, blocking=True)
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": started, "what": what}).encode())
        os.fsync(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()                 # before unlocking: a waiter then re-opens a new file
        os.close(fd)                      # frees the lock


# --------------------------------------------------------------------------------------------
# Model folders: built beside the old one, swapped in whole, and removed only as far as
# asd's own marker says asd wrote them. (A test run stages its result files in a folder of
# its own; a submission folder holds no marker, so the organisers receive only their files.)

MARKER = ".asd"   # JSON in every folder asd builds: {"written_by": ..., "files": [...]}


def check_apart(out, inputs):
    """Refuse an output folder that is, contains or lies inside one of the input folders: a
    --force there could delete the recordings, and new files would mix with them."""
    o = Path(out).resolve()
    for folder in inputs:
        i = Path(folder).resolve()
        how = ("is" if o == i else "contains" if i.is_relative_to(o) else
               "lies inside" if o.is_relative_to(i) else None)
        if how:
            raise DataError(f"{out}: this output folder {how} the input folder {folder}; "
                            f"choose an --out outside it")


def owned(folder):
    """True when asd built this folder (its marker is there)."""
    return (Path(folder) / MARKER).is_file()


def claim(folder, by):
    """Create `folder` (if needed) and mark it as built by asd."""
    write_json(Path(folder) / MARKER, {"written_by": by, "files": []})


def remove_owned(folder):
    """Delete what asd wrote in `folder`: every file its marker lists, or, while asd is still
    building it (the marker lists none yet), every file in it; then the folder itself if that
    leaves it empty. Returns the names left behind (files asd did not write)."""
    folder = Path(folder)
    if not owned(folder):
        raise DataError(f"{folder}: not written by asd (no {MARKER} marker); left as it is")
    listed = json.loads((folder / MARKER).read_text())["files"]
    for p in list(folder.iterdir()):
        if p.is_file() and (not listed or p.name in listed) and p.name != MARKER:
            p.unlink()
    (folder / MARKER).unlink()
    left = sorted(p.name for p in folder.iterdir())
    if not left:
        folder.rmdir()
    return left


def swap_in(partial, final):
    """Put the finished folder `partial` at `final` in one rename. An old `final` must be asd's
    own: it is renamed aside first and then removed as far as asd wrote it; anything else in
    it is kept there and named in the returned message."""
    partial, final = Path(partial), Path(final)
    marker = json.loads((partial / MARKER).read_text())
    files = sorted(p.name for p in partial.iterdir() if p.name != MARKER)
    write_json(partial / MARKER, {**marker, "files": files})
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        return None
    if not owned(final):
        raise DataError(f"{final}: exists and was not written by asd (no {MARKER} marker); "
                        f"move it away or choose another --out")
    old = final.with_name(f".{final.name}.replaced")
    os.replace(final, old)
    os.replace(partial, final)
    left = remove_owned(old)
    return f"kept {old}: it holds files asd did not write ({', '.join(left)})" if left else None
