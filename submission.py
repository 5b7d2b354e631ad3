"""A year's evaluation scores as the organisers' submission package: the result CSVs under
the evaluators' exact names, and <label>.meta.yaml with the fields of the DCASE Task 2
submission template (label, name, abbreviation, authors, system description, complexity,
external data, source code, development-set results per machine type).

The label is `<Lastname>_<Institute>_task2_<n>` (n: 1-4, the submission's index); the authors'
names come from flags, or stay as placeholders the YAML marks for editing. Nothing here
trains or scores: it reads the run folders that `train`, `test` and `evaluate` wrote.

2026: the evaluator reads teams/<team>/<system>/ and accepts two names per file, the plain
`anomaly_score_<m>_section_00_test.csv` and the baseline's `anomaly_score_DCASE2026T2<m>_
section_00_test_seed<seed><tag>_Eval.csv` (the 2023-2025 evaluators read the latter too);
the package is then DEST/teams/<team>/<label>/ and holds both forms by default (NAME_FORMS).
"""
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import data
import scoring

LABEL = re.compile(r"^[A-Za-z][A-Za-z-]*_[A-Za-z0-9-]+_task2_[1-4]$")
PLACEHOLDER_LABEL = "Lastname_Institute_task2_1"
NAME_FORMS = ("plain", "baseline", "both")
# seed and tag of the baseline-form names: the defaults of the organisers' evaluator script
# (03_evaluation_eval_data.sh of dcase2023_task2_evaluator; the 2026 one could not be read here)
BASELINE_SEED, BASELINE_TAG = 13711, "_id(0_)"
PLAIN = re.compile(r"^(?P<kind>anomaly_score|decision_result)_(?P<rest>.+_section_\d\d)_test\.csv$")


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
        m = scoring.RESULT_NAME.match(path.name)
        if not m or path.name != scoring.result_filename(year, "anomaly_score", m["machine"],
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
