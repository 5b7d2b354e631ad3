"""Your own machine: `train --normal-dir` on a plain folder of normal recordings (no DCASE
names; sub-folders become sections) writes a self-describing model folder, and `score` flags
the anomalous files (AUC bar), gives the same scores twice, works from a copied model folder,
and reports a broken file on one line, goes on with the others and exits non-zero."""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import asd
import scoring
import synth

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "20", "--batch-size", "64", "--device", "cpu"]
AUC_BAR = 0.9


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """my_valve/unit_a, my_valve/unit_b: normal recordings under plain names (from a synthetic
    2020 set), new/unit_*: unseen recordings, labels known only to the test; a trained model."""
    tmp = tmp_path_factory.mktemp("own")
    synth.synthesize(tmp / "synth", year=2020, machines=["valve"], n_train=20, n_test=6,
                     eval_part=False)
    dev = tmp / "synth/dcase2020/dev_data/valve"
    labels = {}
    for split, target in (("train", tmp / "my_valve"), ("test", tmp / "new")):
        for i, p in enumerate(sorted((dev / split).glob("*.wav"))):
            unit = "unit_a" if "_id_00_" in p.name else "unit_b"
            dest = target / unit / f"recording_{i:03d}.wav"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
            labels[dest] = int(p.name.startswith("anomaly"))
    model = tmp / "model"
    assert asd.main(["train", "--normal-dir", tmp / "my_valve", "--out", model, "--year", 2020,
                     "--system", "ae", "--cache-dir", tmp / "cache", *FAST]) == 0
    return tmp, model, labels


def score_csv(model, paths, csv):
    assert asd.main(["score", "--model", model, *paths, "--csv", csv, "--device", "cpu"]) == 0
    with open(csv) as f:
        rows = [line.rstrip("\n").split(",") for line in f][1:]
    return {Path(name): (float(score), decision) for name, score, decision in rows}


def test_model_folder_describes_itself(own):
    _, model, _ = own
    about = json.loads((model / "model.json").read_text())
    assert about["system"] == "ae" and about["year"] == 2020 and about["machine"] == "my_valve"
    assert about["sections"] == {"unit_a": "00", "unit_b": "01"} and about["n_train"] == 32
    assert about["n_held_out"] == 8 and about["threshold_fitted_to"] == "held-out"
    assert about["features"]["n_mels"] == 128 and about["threshold"] > 0
    assert (model / "model.pt").exists() and (model / "threshold.json").exists()
    assert json.loads((model / "args.json").read_text())["normal_dir"].endswith("my_valve")


def test_score_flags_the_anomalous_files_and_repeats_itself(own):
    tmp, model, labels = own
    first = score_csv(model, [tmp / "new"], tmp / "first.csv")
    second = score_csv(model, [tmp / "new" / "unit_a", tmp / "new" / "unit_b"], tmp / "2nd.csv")
    assert first == second and len(first) == 48                   # same scores, every file
    y = [labels[p] for p in first]
    auc = scoring.roc_auc(y, [first[p][0] for p in first])
    assert auc >= AUC_BAR, auc
    flagged = {lab: sum(d == "anomalous" for p, (_, d) in first.items() if labels[p] == lab)
               for lab in (0, 1)}
    assert flagged[1] > flagged[0], flagged


def test_a_copied_model_folder_scores_the_same(own):
    tmp, model, _ = own
    moved = tmp / "elsewhere" / "model"
    shutil.copytree(model, moved)
    clip = sorted((tmp / "new" / "unit_b").glob("*.wav"))[:3]
    assert score_csv(moved, clip, tmp / "moved.csv") == score_csv(model, clip, tmp / "orig.csv")


def test_broken_file_is_reported_and_the_others_are_scored(own, tmp_path):
    tmp, model, _ = own
    good = sorted((tmp / "new" / "unit_a").glob("*.wav"))[:4]
    for p in good:
        shutil.copy(p, tmp_path / p.name)
    broken = tmp_path / "recording_002b.wav"
    broken.write_bytes(b"RIFF....WAVEfmt not really a wav file")
    done = subprocess.run([sys.executable, str(ROOT / "asd.py"), "score", "--model", str(model),
                           str(tmp_path), "--csv", str(tmp_path / "out.csv"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 4 and str(broken) in errors[0] and "1 of 5 files" in errors[3]
    assert errors[1] == "scored 4 of 5 files (1 skipped)" and errors[2].startswith("threshold ")
    assert sorted(line.split("\t")[0] for line in done.stdout.splitlines()) == sorted(
        str(tmp_path / p.name) for p in good)
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 4
    assert "Traceback" not in done.stderr


def test_plain_folder_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "mixed" / "sub").mkdir(parents=True)
    for p in (tmp_path / "mixed" / "a.wav", tmp_path / "mixed" / "sub" / "b.wav"):
        p.write_bytes(b"")
    assert asd.main(["train", "--normal-dir", tmp_path / "mixed", "--out", tmp_path / "m"]) == 2
    assert "mixed: holds both *.wav and sub-folders" in capsys.readouterr().err
    assert asd.main(["train", "--out", tmp_path / "m"]) == 2
    assert "give --machine" in capsys.readouterr().err
    assert asd.main(["score", "--model", tmp_path / "nothing", tmp_path / "mixed"]) == 2
    assert "model.json: not found" in capsys.readouterr().err


def readme_commands(prefix):
    """The README's command line that starts with `prefix`, as an argv list (comment dropped)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.split("#")[0])
    raise AssertionError(f"README.md has no line starting with {prefix!r}")


def test_the_readmes_own_machine_commands_work_as_written(own):
    """Exactly the two README lines, in a folder holding my_pump/, new/ and other.wav: the
    default system for a single folder of normals is the AE, and it says so."""
    tmp, _, labels = own
    work = tmp / "readme"
    shutil.copytree(tmp / "my_valve" / "unit_a", work / "my_pump")
    shutil.copytree(tmp / "new" / "unit_a", work / "new")
    shutil.copy(next(iter(labels)), work / "other.wav")
    for prefix in ("python asd.py train --normal-dir", "python asd.py score --model"):
        argv = readme_commands(prefix)
        assert argv[:2] == ["python", "asd.py"]
        done = subprocess.run([sys.executable, str(ROOT / "asd.py"), *argv[2:]], cwd=work,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        if "train" in argv:
            assert "train ae on" in done.stdout
    rows = (work / "scores.csv").read_text().splitlines()
    assert rows[0] == "file,score,decision" and len(rows) == 1 + len(list((work / "new").iterdir())) + 1
