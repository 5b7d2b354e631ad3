"""Nothing a user has is lost: a failed `train --force` keeps the old model, an output folder
that is, contains or lies inside the input is refused, --force never deletes what asd did not
write, a failed train leaves nothing, Ctrl-C says in one line how to resume, and one `test`
run's result files appear all together or not at all. Also the threshold's held-out clips and
the refusal of a collapsed model."""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asd
import submission
import synth

FAST = ["--epochs", "4", "--batch-size", "64", "--device", "cpu", "--system", "ae"]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """my_valve/: 40 normal recordings under plain names; a model trained on them."""
    tmp = tmp_path_factory.mktemp("safety")
    synth.synthesize(tmp / "synth", year=2020, machines=["valve"], n_train=20, n_test=2,
                     eval_part=False)
    for i, p in enumerate(sorted((tmp / "synth/dcase2020/dev_data/valve/train").glob("*.wav"))):
        (tmp / "my_valve").mkdir(exist_ok=True)
        shutil.copy(p, tmp / "my_valve" / f"rec_{i:03d}.wav")
    assert asd.main(["train", "--normal-dir", tmp / "my_valve", "--out", tmp / "model",
                     "--cache-dir", tmp / "cache", *FAST]) == 0
    return tmp


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_failed_force_run_keeps_the_old_model_and_leaves_nothing(own, tmp_path, capsys):
    data = tmp_path / "my_valve"
    shutil.copytree(own / "my_valve", data)
    (data / "rec_005.wav").write_bytes(b"not a wav file" * 20)
    model = tmp_path / "model"
    shutil.copytree(own / "model", model)
    before = snapshot(model)
    assert asd.main(["train", "--normal-dir", data, "--out", model, "--force", *FAST]) == 2
    assert "rec_005.wav" in one_line(capsys)
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "my_valve"]   # no partial
    assert asd.main(["train", "--normal-dir", data, "--out", tmp_path / "new", *FAST]) == 2
    assert not (tmp_path / "new").exists() and not (tmp_path / ".new.partial").exists()


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_folder_overlapping_the_input_is_refused(own, tmp_path, where, capsys):
    data = tmp_path / "recordings" / "my_valve"
    shutil.copytree(own / "my_valve", data)
    before = snapshot(data)
    out = {"same": data, "inside": data / "model", "parent": tmp_path / "recordings"}[where]
    assert asd.main(["train", "--normal-dir", data, "--out", out, "--force", *FAST]) == 2
    assert "input folder" in one_line(capsys)
    assert snapshot(data) == before


def test_force_never_deletes_what_asd_did_not_write(own, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    assert asd.main(["train", "--normal-dir", own / "my_valve", "--out", out, "--force",
                     *FAST]) == 2
    assert "not written by asd" in one_line(capsys)
    assert (out / "chapter1.tex").read_text() == "years of work"
    # a user's file put into an asd model folder survives a --force retraining
    model = tmp_path / "model"
    shutil.copytree(own / "model", model)
    (model / "notes.txt").write_text("mine")
    assert asd.main(["train", "--normal-dir", own / "my_valve", "--out", model, "--force",
                     "--cache-dir", own / "cache", *FAST]) == 0
    assert not (model / "notes.txt").exists() and (model / "model.pt").exists()
    assert (tmp_path / ".model.replaced" / "notes.txt").read_text() == "mine"
    assert "kept" in capsys.readouterr().out


def test_ctrl_c_says_where_and_how_to_resume_in_one_line(own, tmp_path, monkeypatch, capsys):
    import train
    real_save, saved = train.save, []

    def interrupt(obj, path):
        real_save(obj, path)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "save", interrupt)
    argv = ["train", "--normal-dir", own / "my_valve", "--out", tmp_path / "m",
            "--cache-dir", own / "cache", *FAST]
    assert asd.main(argv) == 130
    err = one_line(capsys)
    # Ctrl-C came after epoch 2's checkpoint, before its progress line
    assert "after: epoch 1/4" in err and "resume with: python asd.py train --normal-dir" in err
    monkeypatch.setattr(train, "save", real_save)
    assert asd.main(argv) == 0
    assert "resuming epoch 2 of 4" in capsys.readouterr().out
    assert not (tmp_path / ".m.partial").exists() and (tmp_path / "m/model.pt").exists()


def test_threshold_is_fitted_to_held_out_clips(own):
    about = json.loads((own / "model/model.json").read_text())
    threshold = json.loads((own / "model/threshold.json").read_text())
    assert about["n_train"] == 32 and about["n_held_out"] == 8
    assert threshold["fitted_to"] == "held-out" and len(threshold["scores"]) == 8
    assert len(set(threshold["clips"])) == 8


def test_collapsed_model_is_refused(own, tmp_path, monkeypatch, capsys):
    from systems import ae
    monkeypatch.setattr(ae.AE, "score", lambda self, clips: np.full(len(clips), 3.0))
    assert asd.main(["train", "--normal-dir", own / "my_valve", "--out", tmp_path / "m",
                     "--cache-dir", own / "cache", *FAST]) == 2
    assert "collapsed" in one_line(capsys)
    assert not (tmp_path / "m").exists()


def test_one_test_run_writes_all_its_results_or_none(tmp_path, monkeypatch, capsys):
    synth.synthesize(tmp_path / "data", year=2020, machines=["valve"], n_train=12, n_test=2)
    run = ["--year", 2020, "--system", "ae", "--machine", "valve", "--data-root",
           tmp_path / "data", "--out", tmp_path / "runs", "--cache-dir", tmp_path / "cache"]
    assert asd.main(["train", *run, "--epochs", 2, "--device", "cpu"]) == 0
    real, written = submission.write_csv, []

    def disk_full_at_the_third(path, rows):
        if len(written) == 2:
            raise asd.data.DataError(f"{path}: could not write it ({errno.errorcode[28]})")
        written.append(path)
        real(path, rows)
    monkeypatch.setattr(submission, "write_csv", disk_full_at_the_third)
    assert asd.main(["test", *run]) == 2
    assert "anomaly_score_valve_id_02.csv" in one_line(capsys)      # the file it could not write
    results = tmp_path / "runs/dcase2020/ae/dev/results"
    assert list(results.iterdir()) == []                            # not section 00 alone
    monkeypatch.setattr(submission, "write_csv", real)
    assert asd.main(["test", *run]) == 0                            # and no --force needed
    assert len(list(results.iterdir())) == 4


def test_silent_training_clip_is_refused_by_name(own, tmp_path, capsys):
    data = tmp_path / "my_valve"
    shutil.copytree(own / "my_valve", data)
    sf.write(data / "rec_007.wav", np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    assert asd.main(["train", "--normal-dir", data, "--out", tmp_path / "m", *FAST]) == 2
    err = one_line(capsys)
    assert "rec_007.wav: silent" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.partial").exists()


def test_score_reports_short_and_badly_named_files_and_scores_the_rest(own, tmp_path, capsys):
    good = sorted((own / "my_valve").glob("*.wav"))
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(good[0], folder / "a_good.wav")
    sf.write(folder / "b_short.wav", np.full(800, 0.1, np.float32), 16000, subtype="PCM_16")
    shutil.copy(good[1], os.fsencode(folder) + b"/c_\xff\xfe.wav")        # not UTF-8
    shutil.copy(good[2], folder / "d_good.wav")
    assert asd.main(["score", "--model", own / "model", folder, "--csv", tmp_path / "s.csv",
                     "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "b_short.wav: 0.050 s long, shorter than the 0.128 s" in lines[0]
    assert "c_\\xff\\xfe.wav: the file name is not valid UTF-8" in lines[1]
    assert lines[2] == "scored 2 of 4 files (2 skipped)" and lines[3].startswith("threshold ")
    assert "2 of 4 files could not be scored" in lines[4] and len(lines) == 5
    scored = [row.split(",")[0] for row in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    assert [Path(p).name for p in scored] == ["a_good.wav", "d_good.wav"]
