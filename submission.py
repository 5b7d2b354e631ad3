"""The files the organisers' evaluators read, and a year's evaluation scores as the organisers'
submission package.

Result files: anomaly_score_*.csv and decision_result_*.csv under each year's exact names
(result_filename; RESULT_NAME reads them back), written atomically with every float at full
precision, so that ties survive the round trip (write_csv; write_table_csv for a table with a
header), and read back with each clip's label for scoring (labelled_rows). Moved here from
scoring.py, which keeps what the scores mean: metrics, official scores, the threshold.

The package: the result CSVs under the evaluators' exact names, and <label>.meta.yaml with the
fields of the DCASE Task 2 submission template (label, name, abbreviation, authors, system
description, complexity, external data, source code, development-set results per machine
type). The label is `<Lastname>_<Institute>_task2_<n>` (n: 1-4, the submission's index); the
authors' names come from flags, or stay as placeholders the YAML marks for editing. Nothing
here trains or scores: `test` writes the result files, `evaluate` reads them back, and the
package is made from the run folders that `train`, `test` and `evaluate` wrote.

2026: the evaluator reads teams/<team>/<system>/ and accepts two names per file, the plain
`anomaly_score_<m>_section_00_test.csv` and the baseline's `anomaly_score_DCASE2026T2<m>_
section_00_test_seed<seed><tag>_Eval.csv` (the 2023-2025 evaluators read the latter too);
the package is then DEST/teams/<team>/<label>/ and holds both forms by default (NAME_FORMS).
"""
import csv
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import data
from scoring import DOMAINS, YEARS, ScoringError

RESULT_KINDS = ("anomaly_score", "decision_result")
# The file names each year's evaluator globs for; section is "00", "01", ... (2020: machine ID).
RESULT_FILE_PATTERNS = {
    2020: "{kind}_{machine}_id_{section}.csv",
    2021: "{kind}_{machine}_section_{section}_{domain}_test.csv",
    2022: "{kind}_{machine}_section_{section}_test.csv",
    2023: "{kind}_{machine}_section_{section}_test.csv",
    2024: "{kind}_{machine}_section_{section}_test.csv",
    2025: "{kind}_{machine}_section_{section}_test.csv",
    2026: "{kind}_{machine}_section_{section}_test.csv",   # the 2026 evaluator's plain form
}
LABEL = re.compile(r"^[A-Za-z][A-Za-z-]*_[A-Za-z0-9-]+_task2_[1-4]$")
PLACEHOLDER_LABEL = "Lastname_Institute_task2_1"
NAME_FORMS = ("plain", "baseline", "both")
# seed and tag of the baseline-form names: the defaults of the organisers' evaluator script
# (03_evaluation_eval_data.sh of dcase2023_task2_evaluator; the 2026 one could not be read here)
BASELINE_SEED, BASELINE_TAG = 13711, "_id(0_)"
PLAIN = re.compile(r"^(?P<kind>anomaly_score|decision_result)_(?P<rest>.+_section_\d\d)_test\.csv$")


# ---------------------------------------------------------------------------------------
# Submission files: anomaly_score_*.csv and decision_result_*.csv

RESULT_NAME = re.compile(r"^anomaly_score_(?P<machine>.+?)_(?:id|section)_(?P<section>\d\d)"
                         r"(?:_(?P<domain>source|target))?(?:_test)?\.csv$")   # result_filename's


def labelled_rows(results, *, year, truth):
    """One row per scored clip of the result CSVs in folder `results`: machine, section,
    domain, label (1 anomaly), score, decision; truth(machine, section, name) gives (label,
    domain), from the dev set's names or the eval set's ground-truth tables."""
    files = sorted(Path(results).glob("anomaly_score_*.csv"))
    if not files:
        raise ScoringError(f"{results}: no anomaly_score_*.csv; run 'python asd.py test' first")
    rows = []
    for path in files:
        m = RESULT_NAME.match(path.name)
        if not m:
            raise ScoringError(f"{path}: not a result file name of {year}")
        decisions = dict(read_csv(path.with_name(path.name.replace("anomaly_score",
                                                                   "decision_result"))))
        for name, score in read_csv(path):
            label, domain = truth(m["machine"], m["section"], name)
            rows.append({"machine": m["machine"], "section": m["section"], "domain": domain,
                         "label": int(label == "anomaly"), "score": float(score),
                         "decision": int(decisions[name])})
    return rows


def result_filename(year, kind, machine, section, domain=None):
    """File name the `year` evaluator reads; kind in RESULT_KINDS, section like "00" (the
    machine ID in 2020), domain ("source"/"target") needed in 2021 only, ignored otherwise."""
    if year not in RESULT_FILE_PATTERNS:
        raise ValueError(f"unknown year {year!r}; valid years: {', '.join(map(str, YEARS))}")
    if kind not in RESULT_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(RESULT_KINDS)}")
    if not (isinstance(section, str) and len(section) == 2 and section.isdigit()):
        # the evaluators find sections with the regex [0-9][0-9]
        raise ValueError(f"section must be two digits such as '00', got {section!r}")
    if year == 2021 and domain not in DOMAINS:
        raise ValueError(f"2021 file names need domain in {DOMAINS}, got {domain!r}")
    return RESULT_FILE_PATTERNS[year].format(kind=kind, machine=machine, section=section,
                                             domain=domain)


def _format_field(value):
    """One CSV field: floats at full repr precision (so ties survive the round trip)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ScoringError(f"refusing to write non-finite value {value!r}")
        return repr(float(value))
    raise ScoringError(f"cannot write a value of type {type(value).__name__}: {value!r}")


def write_csv(path, rows):
    """Write rows of (file_name, value) with no header, atomically (data.write_atomic): on any
    error, a bad row included, the target is untouched."""
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        for i, row in enumerate(rows):
            if len(row) != 2:
                raise ScoringError(f"{path}: row {i} has {len(row)} fields, "
                                   f"expected 2 (file_name, value): {row!r}")
            writer.writerow([_format_field(v) for v in row])
    data.write_atomic(path, write, text=True)


def read_csv(path):
    """Rows of a result or ground-truth CSV as [(file_name, value), ...], both strings."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for row in reader:
                if len(row) != 2 or not row[0]:
                    raise ScoringError(f"{path}, line {reader.line_num}: expected "
                                       f"'file_name,value', got {row!r}")
                rows.append((row[0], row[1]))
    except (csv.Error, UnicodeDecodeError) as e:
        raise ScoringError(f"{path}: unreadable CSV ({e})") from e
    if not rows:
        raise ScoringError(f"{path}: no rows")
    return rows


def write_table_csv(path, header, rows):
    """Write a CSV with a header row atomically (data.write_atomic); rows are sequences as long
    as the header; None is written as an empty cell."""
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            if len(row) != len(header):
                raise ScoringError(f"{path}: row of {len(row)} fields under a header of "
                                   f"{len(header)}: {row!r}")
            writer.writerow(["" if v is None else _format_field(v) for v in row])
    data.write_atomic(path, write, text=True)


# ---------------------------------------------------------------------------------------
# The submission package: the eval run's result files under the evaluators' names and
# <label>.meta.yaml

def baseline_name(year, plain):
    """The baseline's form of a plain 2023+ result name: anomaly_score_fan_section_00_test.csv
    -> anomaly_score_DCASE2026T2fan_section_00_test_seed13711_id(0_)_Eval.csv."""
    m = PLAIN.match(plain)
    if year < 2023 or not m:
        raise data.DataError(f"{plain}: no baseline-form name for {year} (2023 on, "
                             f"anomaly_score_<m>_section_<XX>_test.csv)")
    return (f"{m['kind']}_DCASE{year}T2{m['rest']}_test_seed{BASELINE_SEED}{BASELINE_TAG}"
            f"_Eval.csv")


def team_of(label):
    """The team folder of the 2026 evaluator's layout: the label less its _task2_<n>."""
    return label.rsplit("_task2_", 1)[0]


def result_files(results, year):
    """The eval run's (anomaly score, decision) file names and their machine types, checked
    against the evaluators' names."""
    files = sorted(Path(results).glob("anomaly_score_*.csv"))
    if not files:
        raise data.DataError(f"{results}: no anomaly_score_*.csv; run 'python asd.py test "
                             f"--part eval' first")
    names, machines = [], set()
    for path in files:
        m = RESULT_NAME.match(path.name)
        if not m or path.name != result_filename(year, "anomaly_score", m["machine"],
                                                 m["section"], m["domain"]):
            raise data.DataError(f"{path}: not a {year} submission name")
        decision = path.with_name(path.name.replace("anomaly_score", "decision_result", 1))
        if not decision.exists():
            raise data.DataError(f"{decision}: missing; run 'python asd.py test --part eval' "
                                 f"again")
        names += [path.name, decision.name]
        machines.add(m["machine"])
    return names, sorted(machines, key=str.lower)


def package(results, dest, *, year, label, meta_yaml, name_form="plain"):
    """Copy the result files into dest/<label>/ with <label>.meta.yaml, under their plain
    names, the baseline's (baseline_name) or both (name_form); the folder appears whole or not
    at all. Returns (folder, number of result files)."""
    if name_form not in NAME_FORMS:
        raise ValueError(f"unknown name form '{name_form}'; valid: {', '.join(NAME_FORMS)}")
    plain, _ = result_files(results, year)
    copies = [(n, n) for n in plain] if name_form != "baseline" else []
    copies += [(n, baseline_name(year, n)) for n in plain] if name_form != "plain" else []
    folder = Path(dest) / label
    if folder.exists():        # replaced only when it holds nothing but what package writes
        foreign = [p.name for p in folder.iterdir() if not (
            p.name.endswith(".meta.yaml") or re.match(r"(anomaly_score|decision_result)_.*\.csv$",
                                                      p.name))]
        if foreign:
            raise data.DataError(f"{folder}: holds files asd did not write ({', '.join(foreign)}); "
                                 f"move them away or choose another --dest")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{label}."))
    try:
        for name, as_name in copies:
            shutil.copy2(Path(results) / name, tmp / as_name)
        data.write_text(tmp / f"{label}.meta.yaml", meta_yaml)
        old = folder.with_name(f".{label}.replaced")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, len(copies)


def q(value):
    """A YAML scalar: JSON's quoting is valid YAML; None is null."""
    return "null" if value is None else json.dumps(value)


def meta_yaml(*, label, name, abbreviation, authors, about, threshold, n_parameters,
              machines, missing, dev_results, source_code, channel=None):
    """The submission template's fields. about: the system's own description (its `meta`);
    dev_results: results.json of the development run, or None; channel: the channel the
    models read (2026), written as input_channel (our field: the template asks no such thing
    in the files read here)."""
    lines = ["# Written by 'python asd.py package' from the runs it read; check every field.",
             "submission:", f"  label: {q(label)}", f"  name: {q(name)}",
             f"  abbreviation: {q(abbreviation)}", "  authors:"]
    for i, author in enumerate(authors):
        last, _, first = author.partition(",")
        lines += [f"    - lastname: {q(last.strip())}", f"      firstname: {q(first.strip())}",
                  f"      email: {q(None)}", f"      corresponding: {q(i == 0)}",
                  "      affiliation:", f"        institute: {q(None)}"]
    lines += ["system:", "  description:", f"    input_sampling_rate: {q('16kHz')}"]
    lines += [f"    input_channel: {q(channel)}   # 2026: near = 0, far = 1"] if channel else []
    lines += [f"    {key}: {q(value)}" for key, value in about.items()]
    lines += [f"    threshold: {q(threshold)}",
              "  complexity:",
              f"    total_parameters: {q(n_parameters)}   # of one machine type's model",
              f"  source_code: {q(source_code)}",
              f"  machine_types: {q(machines)}", f"  machine_types_missing: {q(missing)}",
              "results:", "  development_dataset:"]
    if dev_results is None:
        lines.append("    # no development run found: python asd.py evaluate --part dev")
    else:
        lines.append(f"    official_score: {q(dev_results['official_score'])}")
        for machine, m in dev_results["machines"].items():
            lines.append(f"    {machine}:")
            for key in ("auc", "auc_source", "auc_target", "pauc"):
                if key in m:           # None: undefined (a domain absent from the test set)
                    value = None if m[key] is None else round(m[key] * 100, 2)
                    lines.append(f"      {key}: {q(value)}")
    lines.append(f"written: {q(time.strftime('%Y-%m-%d %H:%M:%S'))}")
    return "\n".join(lines) + "\n"


def truth_warning(year, eval_dir):
    """From 2023 on, the organisers' evaluators need ground_truth_attributes/ beside the other
    tables: without it they score nothing and still exit 0."""
    if year >= 2023 and Path(eval_dir, "ground_truth_data").is_dir() and \
            not Path(eval_dir, "ground_truth_attributes").is_dir():
        return (f"warning: {eval_dir} has no ground_truth_attributes/: the organisers' {year} "
                f"evaluator would then score nothing and still exit 0")
    return None
