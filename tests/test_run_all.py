"""run_all.sh --quick end to end on synthetic data: 2020, 2021 and 2026 (the three naming and
metric families; 2022 shares 2021's names less the domain folders, 2023-2025 share 2026's
names and rule, which adds stereo clips and the evaluator's teams/<team>/<label>/ layout with
both name forms; three years keep the test's cost) trained, tested on the dev and eval sets,
evaluated, and packaged into submission folders holding exactly the files the organisers'
evaluators read; a second run skips what is done
and an interrupted one resumes where it stopped. Without --years it runs every year that
`asd.py list years` gives (test_years_come_from_the_cli)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import submission

ROOT = Path(__file__).resolve().parents[1]
YEARS = (2020, 2021, 2026)
LABEL = "Lastname_Institute_task2_1"     # package's placeholder label: run_all passes none
RUN_ALL_TIMEOUT = 2400  # seconds; about 1 minute on 2 idle CPU cores, far more under load


def run_all(out, *args):
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--quick", "--out", str(out),
                           "--device", "cpu", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=RUN_ALL_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all")
    return out, run_all(out, "--years", " ".join(map(str, YEARS)))


def expected_submission(out, year):
    """The submission names for the eval clips synthesised: each section (2021: and domain)
    of the year's first eval machine type, scores and decisions, and the description."""
    machine = list(data.get_year(year).eval)[0]
    clips = data.list_clips(data.part_dir(out / "data", year, "eval"), year=year,
                            machine=machine, split="test")
    keys = {(c.section, c.domain if year == 2021 else None) for c in clips}
    names = {submission.result_filename(year, kind, machine, s, d)
             for s, d in keys for kind in submission.RESULT_KINDS}
    if year >= 2026:                                    # and the baseline's form of each
        names |= {submission.baseline_name(year, n) for n in names}
    return names | {f"{LABEL}.meta.yaml"}, clips


def submission_folder(out, year, system):
    """Where run_all puts a year's package (2026: the evaluator's teams/<team>/<label>/)."""
    team = f"teams/{submission.team_of(LABEL)}/" if year >= 2026 else ""
    return out / f"submissions/dcase{year}/{system}/{team}{LABEL}"


def test_every_year_gets_its_submission_folder(quick):
    out, log = quick
    for year in YEARS:
        system = data.get_year(year).system                 # --systems auto: the default
        folder = submission_folder(out, year, system)
        names, clips = expected_submission(out, year)
        assert {p.name for p in folder.iterdir()} == names, year
        rows = [r for n in names if n.startswith("anomaly_score") and "_Eval" not in n
                for r in submission.read_csv(folder / n)]
        assert sorted(r[0] for r in rows) == sorted(c.name for c in clips)   # every clip once
        for name in names:
            if name.startswith("decision_result"):
                assert {v for _, v in submission.read_csv(folder / name)} <= {"0", "1"}
        meta = (folder / f"{LABEL}.meta.yaml").read_text()
        for field in ("label:", "abbreviation:", "authors:", "acoustic_features:",
                      "machine_learning_method:", "anomaly_score:", "threshold:",
                      "total_parameters:", "external_data_usage:", "source_code:",
                      "development_dataset:", "official_score:"):
            assert field in meta, (year, field)
    assert "warning: the label is the placeholder" in log


def test_names_are_the_evaluators(quick):
    out, _ = quick
    folder = str(out / "submissions/dcase{}/{}") + "/" + LABEL
    assert {p.name for p in Path(folder.format(2020, "shinmura2020")).iterdir()} >= {
        "anomaly_score_fan_id_01.csv", "decision_result_fan_id_03.csv"}
    assert {p.name for p in Path(folder.format(2021, "ae")).iterdir()} >= {
        "anomaly_score_fan_section_03_source_test.csv",
        "decision_result_fan_section_04_target_test.csv"}
    system = data.get_year(2026).system
    assert {p.name for p in submission_folder(out, 2026, system).iterdir()} >= {
        "anomaly_score_ToyDrone_section_00_test.csv",
        "anomaly_score_DCASE2026T2ToyDrone_section_00_test_seed13711_id(0_)_Eval.csv"}


def test_dev_and_eval_sets_are_evaluated_with_the_official_rules(quick):
    out, _ = quick
    for year in YEARS:
        for part in ("dev", "eval"):
            run = out / f"runs/dcase{year}/{data.get_year(year).system}/{part}"
            with open(run / "results.csv") as f:
                last = list(csv.DictReader(f))[-1]
            assert last["machine"] == "official score" and 0 <= float(last["score"]) <= 1
            assert (run / "results.md").exists() and (run / "results.json").exists()


def test_second_run_skips_and_an_interrupted_run_resumes(quick):
    out, _ = quick
    model = out / "runs/dcase2021/ae/eval/models/fan/model.pt"
    trained = model.stat().st_mtime_ns
    (out / "runs/dcase2021/ae/eval/logs/test_fan.json").unlink()     # as if test had crashed
    log = run_all(out, "--years", "2021")
    steps = [line.split("] ", 1)[1] for line in log.splitlines() if line.startswith("== [")]
    assert steps == ["dcase2021: dev fan; eval fan", "test 2021 ae eval fan",
                     "evaluate 2021 ae eval", f"done: {out}/submissions"], log
    assert model.stat().st_mtime_ns == trained                    # finished steps: skipped
    assert "packaged 8 files" in log                              # newer results: repackaged


def test_years_come_from_the_cli(tmp_path):
    """No --years: every year of `asd.py list years` (a machine filter that matches nothing
    keeps it to the listing: no data, no training)."""
    log = run_all(tmp_path, "--machines", "no-such-machine")
    years = [line.split("] ", 1)[1].split(":")[0] for line in log.splitlines()
             if line.startswith("== [") and ": dev " in line]
    assert years == [f"dcase{y}" for y in data.YEARS], log


def test_each_shared_model_is_trained_once_a_year(quick):
    """2020's shinmura2020 pre-training is trained by the dev run and reused by the eval run."""
    out, log = quick
    assert len(list((out / "runs/dcase2020/shinmura2020/shared").iterdir())) == 1
    assert log.count("training the shared pretraining") == 1
    assert log.count("reusing the shared pretraining") == 1
