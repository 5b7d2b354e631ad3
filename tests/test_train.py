"""train.py, augment.mixup and data.write_atomic on hand-checked cases: batches cover every
index once and drop a lone last one, the epochs generator resumes to the same weights, mixup
mixes inputs as its formula says, and a failed write leaves the old file untouched."""
import os

import numpy as np
import pytest
import torch

import augment
import data
import train


def test_batches_cover_every_index_once_and_drop_a_lone_last_one():
    gen = torch.Generator().manual_seed(0)
    got = list(train.batches(10, 4, gen))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(torch.cat(got).tolist()) == list(range(10))
    got = list(train.batches(9, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in got] == [4, 4]           # the ninth index alone would break BatchNorm


def run(epochs, checkpoint, stop_after=None):
    """A tiny regression trained with train.epochs; optionally 'crashes' after an epoch."""
    with train.seeded(0):
        model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(2))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    log = []
    for epoch in train.epochs(model, opt, gen, epochs, checkpoint, log.append):
        for idx in train.batches(len(x), 6, gen):
            epoch.add(train.step(opt, torch.mean((model(x[idx]) - y[idx]) ** 2)), len(idx))
        if epoch.number == stop_after:
            break                                   # leaves before this epoch is saved
    return model.weight.detach().clone(), log


def test_epochs_resume_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full, log = run(6, tmp_path / "a.pt")
    assert len(log) == 6 and log[-1].startswith("epoch 6/6  loss") and log[-1].endswith("0 s left")
    run(6, tmp_path / "b.pt", stop_after=4)          # epochs 1-3 saved, the 4th lost
    resumed, log = run(6, tmp_path / "b.pt")
    assert log[0] == f"resuming epoch 3 of 6 from {tmp_path / 'b.pt'}" and len(log) == 4
    assert torch.equal(resumed, full)


def test_seeded_gives_the_same_weights_and_restores_the_global_stream():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    with train.seeded(0):
        a = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(torch.rand(1), before)
    with train.seeded(0):
        assert torch.equal(torch.nn.Linear(4, 4).weight, a)


def test_mixup_mixes_inputs_by_its_formula():
    x = torch.arange(12.0).reshape(4, 3)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    mixed, perm, lam = augment.mixup(x, gen, rng, alpha=0.2)
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and 0 <= lam <= 1
    assert lam == np.random.default_rng(0).beta(0.2, 0.2)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])


def test_write_atomic_keeps_the_old_file_on_error_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "model.json"
    data.write_json(path, {"a": 1})
    assert oct(path.stat().st_mode & 0o777) == "0o644"

    def half_then_fail(f):
        f.write("{\"half\": ")
        raise OSError(28, "No space left on device")
    with pytest.raises(data.DataError, match="model.json: could not write it .No space left"):
        data.write_atomic(path, half_then_fail, text=True)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(path.parent) == ["model.json"]


def test_write_atomic_temporary_names_are_unique(tmp_path, monkeypatch):
    """Two writers of one path at once (two trainings) never share a temporary file."""
    seen = []
    real = data.tempfile.mkstemp

    def spy(**kw):
        fd, name = real(**kw)
        seen.append(name)
        return fd, name
    monkeypatch.setattr(data.tempfile, "mkstemp", spy)

    def nested(f):                          # a second write of the same path while the first is open
        data.write_text(tmp_path / "x.txt", "inner")
        f.write(b"outer")
    data.write_atomic(tmp_path / "x.txt", nested)
    assert len(set(seen)) == 2 and (tmp_path / "x.txt").read_text() == "outer"
