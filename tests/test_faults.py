"""Faults after the input checks: a damaged model folder or checkpoint, a full disk, a file
name that is not UTF-8, a file that cannot be read, two runs building one model. Each ends in
one line naming the file and what to do, with no traceback, and loses nothing the user had."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import asd
import synth

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "2", "--batch-size", "64", "--device", "cpu", "--system", "ae"]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """my_valve/: 20 normal recordings under plain names; a model trained on them; test/:
    8 recordings to score."""
    tmp = tmp_path_factory.mktemp("faults")
    synth.synthesize(tmp / "synth", year=2020, machines=["valve"], n_train=20, n_test=2,
                     n_sections=1, eval_part=False)
    dev = tmp / "synth/dcase2020/dev_data/valve"
    (tmp / "my_valve").mkdir()
    for i, p in enumerate(sorted((dev / "train").glob("*.wav"))):
        shutil.copy(p, tmp / "my_valve" / f"rec_{i:03d}.wav")
    shutil.copytree(dev / "test", tmp / "test")
    assert asd.main(["train", "--normal-dir", tmp / "my_valve", "--out", tmp / "model",
                     "--cache-dir", tmp / "cache", *FAST]) == 0
    return tmp


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def one_line(capsys):
    """The run's stderr, which must be one line (no traceback)."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def damage(model, how):
    """Damage one file of a model folder as a bad copy or another program would."""
    if how == "model.pt truncated":
        data = (model / "model.pt").read_bytes()
        (model / "model.pt").write_bytes(data[:len(data) // 2])
    elif how == "model.pt random bytes":
        (model / "model.pt").write_bytes(os.urandom(5000))
    elif how == "threshold.json not JSON":
        (model / "threshold.json").write_text('{"thres')
    elif how == "threshold.json without its key":
        (model / "threshold.json").write_text("{}")
    elif how == "model.json garbage":
        (model / "model.json").write_bytes(b"\x00garbage\xff")
    return how.split()[0]


@pytest.mark.parametrize("how", ["model.pt truncated", "model.pt random bytes",
                                 "threshold.json not JSON", "threshold.json without its key",
                                 "model.json garbage"])
def test_damaged_model_folder_is_one_line_naming_the_file(own, tmp_path, how, capsys):
    model = tmp_path / "model"
    shutil.copytree(own / "model", model)
    name = damage(model, how)
    before = snapshot(model)
    assert asd.main(["score", "--model", model, own / "test", "--device", "cpu"]) == 2
    err = one_line(capsys)
    assert f"{model / name}:" in err and "train it again with --force" in err, err
    assert "weights_only" not in err
    assert snapshot(model) == before                                  # nothing touched
    assert asd.main(["train", "--normal-dir", own / "my_valve", "--out", model, "--force",
                     "--cache-dir", own / "cache", *FAST]) == 0          # the advice works
    assert asd.main(["score", "--model", model, own / "test", "--device", "cpu"]) == 0


def test_truncated_checkpoint_on_resume_says_to_delete_it(own, tmp_path, monkeypatch, capsys):
    import train
    real_save = train.save

    def interrupt_after_the_first_epoch(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save", interrupt_after_the_first_epoch)
    argv = ["train", "--normal-dir", own / "my_valve", "--out", tmp_path / "m",
            "--cache-dir", own / "cache", *FAST]
    assert asd.main(argv) == 130
    monkeypatch.setattr(train, "save", real_save)
    checkpoint = tmp_path / ".m.partial" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    capsys.readouterr()
    assert asd.main(argv) == 2
    err = one_line(capsys)
    assert f"{checkpoint}: a truncated or damaged checkpoint" in err and "delete it" in err
    assert checkpoint.exists()                                       # the user decides
    checkpoint.unlink()
    assert asd.main(argv) == 0 and (tmp_path / "m" / "model.pt").exists()


class FullDisk:
    """A binary file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def test_full_disk_during_train_is_one_line_and_keeps_the_old_model(own, tmp_path,
                                                                    monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(own / "model", model)
    before = snapshot(model)
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: (
        FullDisk(real_fdopen(fd, mode, *a, **k), 4096) if "b" in mode
        else real_fdopen(fd, mode, *a, **k)))
    assert asd.main(["train", "--normal-dir", own / "my_valve", "--out", model, "--force",
                     "--cache-dir", own / "cache", *FAST]) == 2
    err = one_line(capsys)
    assert "checkpoint.pt: could not write it (No space left on device)" in err, err
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]     # no partial, no temp


def non_utf8(path, bad):
    """Rename `path` so that its name holds the byte `bad` (not UTF-8); returns the bytes path."""
    new = os.fsencode(path).replace(b"_A.wav", b"_" + bad + b".wav")
    os.rename(os.fsencode(path), new)
    return new


@pytest.mark.parametrize("split", ["train", "test"])
def test_non_utf8_name_in_a_dcase_folder_is_named(tmp_path, split, capsys):
    synth.synthesize(tmp_path / "data", year=2022, machines=["fan"], n_train=10, n_test=1,
                     n_sections=1, eval_part=False)
    run = ["--year", 2022, "--machine", "fan", "--data-root", tmp_path / "data",
           "--out", tmp_path / "runs", "--cache-dir", tmp_path / "cache"]
    if split == "test":
        assert asd.main(["train", *run, *FAST]) == 0
        capsys.readouterr()
    folder = tmp_path / "data/dcase2022/dev_data/fan" / split
    non_utf8(sorted(folder.glob("*_A.wav"))[0], b"\xff")
    assert asd.main([split, *run, *(FAST if split == "train" else [])]) == 2
    err = one_line(capsys)
    assert f"{folder}/" in err and "_\\xff.wav: the file name is not valid UTF-8" in err, err
    assert not (tmp_path / "runs/dcase2022/ae/dev/results").exists() or not any(
        (tmp_path / "runs/dcase2022/ae/dev/results").iterdir())


def test_unreadable_file_is_reported_and_the_others_are_scored(own, tmp_path, monkeypatch,
                                                               capsys):
    """Permission denied (chmod 000; tests run as root, who may read it anyway, so the error is
    raised where the file is opened)."""
    import builtins
    files = sorted((own / "test").glob("*.wav"))
    locked = files[1]
    real_open = builtins.open

    def denying_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(builtins, "open", denying_open)
    csv = tmp_path / "scores.csv"
    assert asd.main(["score", "--model", own / "model", own / "test", "--csv", csv,
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"error: {locked}: cannot be read (Permission denied); check the file's "
                      f"permissions (chmod a+r) or copy it again"), err
    assert err[1] == "scored 7 of 8 files (1 skipped)" and err[2].startswith("threshold ")
    assert "1 of 8 files could not be scored" in err[3] and len(err) == 4
    scored = [line.split(",")[0] for line in csv.read_text().splitlines()[1:]]
    assert scored == [str(p) for p in files if p != locked]          # the clips after it too


def test_score_csv_is_not_overwritten_without_force(own, tmp_path, capsys):
    csv = tmp_path / "scores.csv"
    csv.write_text("last week's scores\n")
    clip = sorted((own / "test").glob("*.wav"))[0]
    assert asd.main(["score", "--model", own / "model", clip, "--csv", csv]) == 2
    assert f"{csv} exists; pass --force" in one_line(capsys)
    assert csv.read_text() == "last week's scores\n"
    assert asd.main(["score", "--model", own / "model", clip, "--csv", csv, "--force"]) == 0
    assert csv.read_text().splitlines()[1].startswith(str(clip))


SLOW_AFTER_FIRST_EPOCH = """
import sys, time
sys.path.insert(0, sys.argv[1])
import asd, train
real_save = train.save
def save_then_hang(obj, path):        # a long epoch 2: the run holds the model folder
    real_save(obj, path)
    time.sleep(600)
train.save = save_then_hang
asd.main(sys.argv[2:])
"""


def test_two_runs_into_one_model_folder(own, tmp_path, capsys):
    """A second `train` while a first one (another process) builds the same model says which
    run holds it and stops, touching nothing; after the first has died (killed), the next run
    resumes its partial folder and says so; no folder is lost or left behind."""
    model = tmp_path / "model"
    argv = ["train", "--normal-dir", own / "my_valve", "--out", model,
            "--cache-dir", own / "cache", *FAST]
    first = subprocess.Popen([sys.executable, "-c", SLOW_AFTER_FIRST_EPOCH, str(ROOT),
                              *map(str, argv)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        checkpoint = tmp_path / ".model.partial" / "checkpoint.pt"
        for _ in range(600):                                 # up to a minute to get there
            if checkpoint.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert checkpoint.exists() and first.poll() is None
        before = snapshot(tmp_path / ".model.partial")
        assert asd.main(argv) == 2
        err = one_line(capsys)
        assert f"another run (pid {first.pid}, started " in err and f"building model {model}" in err
        assert snapshot(tmp_path / ".model.partial") == before and not model.exists()
    finally:
        first.kill()
        first.wait()
    assert asd.main(argv) == 0
    out = capsys.readouterr().out
    assert f"resuming the run that stopped in {tmp_path / '.model.partial'} (pid {first.pid}, " \
           f"same arguments)" in out and "resuming epoch 1 of 2" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (model / "model.pt").exists()


# --------------------------------------------------------------------------------------------
# What a user is told: too few clips, a collapsed model, the threshold and its decisions

def test_train_says_what_it_did_and_what_the_threshold_rests_on(own, tmp_path, capsys):
    """The fixture's run: the recipe explained, a warning for a threshold fitted to fewer
    than 20 held-out clips, the peak memory; no cache path of this machine in the model."""
    import torch
    assert asd.main(["train", "--normal-dir", own / "my_valve", "--out", tmp_path / "m",
                     "--cache-dir", own / "cache", *FAST]) == 0
    out = capsys.readouterr().out
    assert "(2020 recipe: the DCASE 2020 systems' features and settings; --year picks another)" \
        in out
    assert "warning: the threshold will be fitted to 5 held-out clips, so it is rough" in out
    assert "--threshold-holdout" in out and re.search(r"; peak memory \d+ MB \(process", out)
    saved = torch.load(tmp_path / "m/model.pt", weights_only=False)
    assert saved["options"]["cache_dir"] is None
    assert str(own / "cache") not in (tmp_path / "m/model.json").read_text()


def test_score_and_test_print_the_threshold_its_fit_and_what_it_flags(own, tmp_path, capsys):
    assert asd.main(["score", "--model", own / "model", own / "test", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out, err = captured.out.splitlines(), captured.err.splitlines()   # the table; the summary
    flagged = sum(line.endswith("\tanomalous") for line in out)
    threshold = json.loads((own / "model/threshold.json").read_text())["threshold"]
    assert err[-2] == "scored 8 of 8 files (0 skipped)"
    assert err[-1] == (f"threshold {threshold:.4g}: the 0.9 quantile of a gamma fitted to the "
                       f"scores of 5 held-out clips; rough: fewer than 20; it flags {flagged} "
                       f"of 8 clips here as anomalous ({flagged / 8:.0%})")
    synth.synthesize(tmp_path / "data", year=2020, machines=["valve"], n_train=10, n_test=1,
                     n_sections=1, eval_part=False)
    run = ["--year", 2020, "--machine", "valve", "--data-root", tmp_path / "data",
           "--out", tmp_path / "runs", "--cache-dir", tmp_path / "cache"]
    assert asd.main(["train", *run, *FAST]) == 0
    capsys.readouterr()
    assert asd.main(["test", *run, "--system", "ae", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scoring 4 test clips of valve with ae\n")     # before the work
    assert re.search(r"^threshold [\d.e+]+: the 0.9 quantile of a gamma fitted to the scores of "
                     r"2 held-out clips; rough: fewer than 20; it flags \d of 4 clips here",
                     out, flags=re.M)


@pytest.mark.parametrize("system", ["cai2021", "midea2024"])
def test_one_training_clip_is_refused_as_too_few(own, tmp_path, system, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(own / "my_valve/rec_000.wav", folder)
    assert asd.main(["train", "--normal-dir", folder, "--out", tmp_path / "m", "--system",
                     system, "--quick", "--device", "cpu"]) == 2
    err = one_line(capsys)
    assert f"{folder}: 1 training clip of one; a model and its threshold need two or more" in err
    assert "collapsed" not in err and not (tmp_path / "m").exists()


def test_collapse_names_what_was_too_few_and_a_near_collapse_warns(own, tmp_path, monkeypatch,
                                                                   capsys):
    from systems import ae
    monkeypatch.setattr(ae.AE, "score", lambda self, clips: np.full(len(clips), 3.0))
    argv = ["train", "--normal-dir", own / "my_valve", "--out", tmp_path / "m",
            "--cache-dir", own / "cache", *FAST]
    assert asd.main(argv) == 2
    err = one_line(capsys)
    assert "the model has collapsed and ranks nothing; it learnt from 15 clips (section 00: " \
           "15); give more normal clips, or train longer (--epochs)" in err, err
    # 5 held-out scores 40 float32 steps apart at 3.0: kept, with a warning
    step = np.finfo(np.float32).eps * 3.0
    monkeypatch.setattr(ae.AE, "score", lambda self, clips: 3.0 + 10 * step * np.arange(len(clips)))
    assert asd.main(argv) == 0
    out = capsys.readouterr().out
    assert "warning: ae on my_valve, held-out scores span 1.43e-05, only 40 float32 steps" in out


def test_random_bytes_as_pretrained_weights_are_no_checkpoint(tmp_path):
    """Never the advice to load with weights_only=False (it runs the file's code)."""
    import encoders
    path = tmp_path / "ResNet38_mAP=0.434.pth"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ValueError) as e:
        encoders.load_panns_checkpoint(encoders.ResNet38(), path)
    assert str(e.value).startswith(f"{path}: not a PyTorch checkpoint of tensors (")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_two_second_clips_name_the_flag_that_shortens_the_input(tmp_path):
    """cai2021's 64 frames need 2.016 s: the refusal names --frames 63. jless2022 checks the
    input of the recipe it runs: fan's STFT patches take a 2-s clip (the check had used the
    log-mel patch's 2.016 s), valve's log-mel patches name --mel-frames 48 (MobileFaceNet:
    a multiple of 16)."""
    import features
    from systems import cai2021, jless2022
    clip = synth.machine_sound(np.random.default_rng(0), kind="clicks", f0=100.0, seconds=2.0)
    synth.write_clip(tmp_path / "two.wav", clip)
    cai = cai2021.Cai2021(year=2023)
    with pytest.raises(features.AudioError, match=r"two.wav: 2.000 s long, shorter than the "
                       r"2.016 s .*; remove it or record a longer clip, or shorten the system's "
                       r"input: --frames 63$"):
        features.check_clip(tmp_path / "two.wav", min_samples=cai.min_samples, training=True,
                            shorter_input=cai.shorter_input)
    assert cai2021.Cai2021(year=2023, frames=63).min_samples <= len(clip)
    jless = jless2022.Jless2022(year=2023, log=lambda line: None)
    features.check_clip(tmp_path / "two.wav", min_samples=jless.min_samples, training=True)
    two = asd.data.plain_clip(tmp_path / "two.wav", year=2023, machine="fan")
    jless.mean, jless.std, jless.recipe = 0.0, 1.0, jless.resolve("fan")
    assert jless.patches([two])[0].shape[-1] == 32                   # one STFT patch
    jless.recipe = jless.resolve("valve")
    with pytest.raises(features.AudioError, match=r"two.wav: 63 frames, fewer than the 64 of "
                       r"one logmel patch .*: --mel-frames 48$"):
        jless.patches([two])


def test_supplemental_without_its_folder_names_the_folder(tmp_path, capsys):
    synth.synthesize(tmp_path / "data", year=2025, machines=["fan"], n_train=10, n_test=1,
                     n_sections=1, eval_part=False)
    assert asd.main(["train", "--year", 2025, "--machine", "fan", "--system", "midea2024",
                     "--supplemental", "--quick", "--data-root", tmp_path / "data", "--out",
                     tmp_path / "runs", "--no-cache", "--device", "cpu"]) == 2
    folder = tmp_path / "data/dcase2025/dev_data/fan/supplemental"
    assert f"{folder}: no supplemental normal clips there" in one_line(capsys)


def test_own_machine_type_in_the_dcase_layout_is_taken_with_data_dir(tmp_path, capsys):
    synth.synthesize(tmp_path / "data", year=2022, machines=["fan"], n_train=10, n_test=1,
                     n_sections=1, eval_part=False)
    folder = tmp_path / "data/dcase2022/dev_data"
    (folder / "fan").rename(folder / "bldc")
    run = ["--year", 2022, "--machine", "bldc", "--data-dir", folder, "--out", tmp_path / "runs",
           "--cache-dir", tmp_path / "cache"]
    assert asd.main(["train", *run, *FAST]) == 0
    assert asd.main(["test", *run, "--system", "ae"]) == 0
    note = ("note: bldc is not one of the DCASE 2022 dev machine types; taken as your own, "
            f"from {folder / 'bldc'}")
    assert capsys.readouterr().out.count(note) == 2
    assert asd.main(["train", *run[:2], "--machine", "bldc", "--data-root", tmp_path / "data",
                     "--out", tmp_path / "runs"]) == 2                 # the standard layout
    assert "unknown machine 'bldc' for the 2022 dev set" in one_line(capsys)


def test_a_long_feature_pass_says_what_it_does_when_it_starts(own, tmp_path):
    import features
    paths = sorted((own / "my_valve").glob("*.wav")) * 2                 # 40 clips
    lines = []
    settings = features.log_mel_settings(2020)
    features.clip_features(paths[:30], "log_mel", settings, log=lines.append)
    assert lines == []                                                   # short: silent
    features.clip_features(paths, "log_mel", settings, cache_dir=tmp_path, log=lines.append)
    assert lines[0] == f"log_mel: computing the features of 40 clips, cached in {tmp_path}"


HELP_IN_A_FRESH_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
import asd
try:
    asd.main(["train", "--system", sys.argv[2], "--year", "2023", "--help"])
except SystemExit:
    pass
print("loaded:", sorted(m for m in ("torch", "scipy") if m in sys.modules))
"""


@pytest.mark.parametrize("system", sorted(asd.systems.SYSTEMS))
def test_train_help_lists_a_systems_flags_without_importing_torch(system, capsys):
    """The same help as with torch loaded (as it is in this process), in a fresh process that
    never loads torch or scipy (3.7 s of CPU before, 0.5 s after; see the report)."""
    done = subprocess.run([sys.executable, "-c", HELP_IN_A_FRESH_PROCESS, str(ROOT), system],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.endswith("loaded: []\n"), done.stdout[-300:] + done.stderr
    with pytest.raises(SystemExit):
        asd.main(["train", "--system", system, "--year", "2023", "--help"])
    assert done.stdout == capsys.readouterr().out + "loaded: []\n"


def test_partial_folder_of_a_run_that_ended_before_a_checkpoint_is_replaced(own, tmp_path,
                                                                           monkeypatch, capsys):
    def stopped(*args):
        raise KeyboardInterrupt                                   # killed before epoch 1
    argv = ["train", "--normal-dir", own / "my_valve", "--out", tmp_path / "m",
            "--cache-dir", own / "cache", *FAST]
    monkeypatch.setattr(asd, "fit_and_save", stopped)
    assert asd.main(argv) == 130
    monkeypatch.undo()
    partial = tmp_path / ".m.partial"
    assert (partial / "args.json").exists() and not any(partial.glob("checkpoint*"))
    assert asd.main(argv) == 0
    assert (f"replacing {partial}, left by a run that has ended (pid {os.getpid()}, no "
            f"checkpoint to resume)") in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
