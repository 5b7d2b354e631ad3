"""Cai 2021: the contrastive loss against eq. 4 on a hand-checked case, the median filter
against scipy and on a constant and a spiked spectrogram, time masking and frame shifting doing
what they say, GAMP, the eq. 3 score on a hand case, the StepLR schedule resuming from a
checkpoint, and the whole system on synthetic 2021 data reaching an AUC bar."""
import json
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import torch

import asd
import augment
import data
import features
import losses
import models
import scoring
import synth
import train
from systems import cai2021


def test_contrastive_loss_equals_eq4_on_a_hand_checked_case():
    # two examples on the unit circle: u_1 = p_1 = (1, 0), u_2 = (0, 1), p_2 = (0.6, 0.8);
    # inner products <u_i, p_j>: <u1,p1> = 1, <u1,p2> = 0.6, <u2,p1> = 0, <u2,p2> = 0.8
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.6, 0.8]])        # lengths do not matter: unit vectors
    rho = 0.5
    # eq. 4: -log(exp(1/rho) / exp(0.6/rho)) - log(exp(0.8/rho) / exp(0/rho))
    #       = (0.6 - 1)/rho + (0 - 0.8)/rho = -0.8 - 1.6 = -2.4
    expected = (0.6 - 1.0) / rho + (0.0 - 0.8) / rho
    assert losses.contrastive_loss(u, p, temperature=rho, reduction="sum").item() == \
        pytest.approx(expected, abs=1e-6)
    assert losses.contrastive_loss(u, p, temperature=rho).item() == pytest.approx(expected / 2, abs=1e-6)
    # three examples: the denominator sums over the two others
    u3, p3 = torch.eye(3), torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    rho = 0.1
    # i=1: <u1,p1> = 1, others 0, 0 -> -(1/rho) + log(2); i=2: own 0, others 0 (p1) and 1 (p3)
    # -> -0 + log(1 + e^(1/rho)); i=3: own 0, others 0 (p1) and 1 (p2) -> log(1 + e^(1/rho))
    expected = -1 / rho + math.log(2) + 2 * math.log(1 + math.exp(1 / rho))
    assert losses.contrastive_loss(u3, p3, temperature=rho, reduction="sum").item() == \
        pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="valid: mean, sum"):
        losses.contrastive_loss(u, p, reduction="max")


def test_contrastive_projection_shares_its_mlp():
    proj = models.ContrastiveProjection(ae_dim=8, cnn_dim=16, dim=4)
    v_ae, v_cnn = torch.randn(3, 8), torch.randn(3, 16)
    p, u = proj(v_ae, v_cnn)
    assert torch.allclose(p, proj.shared(proj.ae_linear(v_ae)))
    assert torch.allclose(u, proj.shared(proj.cnn_linear(v_cnn)))


@pytest.mark.parametrize("axis", [-1, -2])
def test_median_filter_equals_scipy_along_its_axis(axis):
    x = torch.randn(2, 40, 50, generator=torch.Generator().manual_seed(0))
    size = [1, 1, 1]
    size[axis] = 31
    ours = augment.median_filter(x, window=31, axis=axis).numpy()
    assert np.array_equal(ours, scipy.ndimage.median_filter(x.numpy(), size=size, mode="mirror"))
    # away from the edges, scipy.signal.medfilt's zero padding does not reach: the same values
    ref = scipy.signal.medfilt(x.numpy(), kernel_size=size)
    inner = [slice(None)] * 3
    inner[axis] = slice(15, -15)
    assert np.array_equal(ours[tuple(inner)], ref[tuple(inner)])


def test_median_filter_keeps_a_constant_and_removes_a_spike():
    flat = torch.full((128, 64), -42.5)
    assert torch.equal(augment.median_filter(flat, window=31), flat)
    spiked = flat.clone()
    spiked[30, 20] = 40.0                              # one loud click in one band
    assert torch.equal(augment.median_filter(spiked, window=31), flat)
    assert torch.equal(augment.median_filter(spiked, window=31, axis=-2), flat)
    with pytest.raises(ValueError, match="odd"):
        augment.median_filter(flat, window=30)


def test_time_mask_and_frame_shift():
    x = torch.arange(20.0).expand(64, 3, 20).clone()
    gen = torch.Generator().manual_seed(0)
    masked = augment.time_mask(x + 1, gen, max_width=5)
    widths = (masked[:, 0] == 0).sum(dim=1)
    assert widths.max() <= 5 and widths.max() > 0 and (widths == 0).any()
    runs = [(row == 0).nonzero().flatten() for row in masked[:, 0]]
    assert all(len(r) == 0 or r[-1] - r[0] + 1 == len(r) for r in runs)   # one contiguous run
    assert (masked[:, 1] == masked[:, 0]).all()                           # every band alike
    shifted = augment.frame_shift(x, gen, max_shift=3)
    rolls = set()
    for row in shifted[:, 0]:
        s = int(-row[0]) % 20                          # frame 0 now holds frame -s: rolled by s
        assert torch.equal(row, torch.roll(x[0, 0], s))
        rolls.add(s if s <= 10 else s - 20)
    assert rolls == set(range(-3, 4))                  # every shift up to 3 frames, no more
    assert (shifted[:, 1] == shifted[:, 0]).all()


def test_gamp_is_average_plus_max_pooling():
    torch.manual_seed(0)
    net = models.MobileNetV2(width=0.25, pool="avg+max").eval()
    x = torch.randn(2, 1, 64, 32)
    maps = net.features(x)
    expected = maps.mean(dim=(-2, -1)) + maps.amax(dim=(-2, -1))
    assert torch.allclose(net(x), expected)
    net.pool = "avg"
    assert torch.allclose(net(x), maps.mean(dim=(-2, -1)))
    with pytest.raises(ValueError, match="valid: avg, avg\\+max"):
        models.MobileNetV2(pool="max")


def test_eq3_score_on_a_hand_case():
    # softmax of (log 3, 0, 0) = (0.6, 0.2, 0.2): log((1 - 0.6) / 0.6) = log(2/3);
    # for class 1, p = 0.2: log(0.8 / 0.2) = log 4
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert cai2021.eq3_scores(logits, 0).tolist() == pytest.approx([math.log(2 / 3), math.log(2)])
    assert cai2021.eq3_scores(logits, 1).tolist() == pytest.approx([math.log(4), math.log(2)])
    # the direct formula, where it can still be computed
    p = torch.softmax(logits, dim=1)[:, 2]
    assert torch.allclose(cai2021.eq3_scores(logits, 2), torch.log((1 - p) / p))
    # unknown class (-1): the clip's likeliest class, here 0
    assert torch.equal(cai2021.eq3_scores(logits, -1), cai2021.eq3_scores(logits, 0))
    # p = 1 - 1e-9 in float32: the direct formula gives -inf, eq3_scores log(1e-9)
    sure = torch.tensor([[0.0, -math.log(1e9)]])
    assert cai2021.eq3_scores(sure, 0).item() == pytest.approx(-math.log(1e9), rel=1e-5)


def test_lr_halves_every_step_and_the_schedule_resumes(tmp_path):
    def run(n, checkpoint, stop_after=None):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.Adam(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        gen, lrs = torch.Generator().manual_seed(0), []
        for epoch in train.epochs(model, opt, gen, n, checkpoint, lambda line: None,
                                  scheduler=sched):
            lrs.append(opt.param_groups[0]["lr"])
            train.step(opt, model(torch.ones(2, 2)).sum())
            sched.step()
            if epoch.number == stop_after:
                break                                   # this epoch is not saved
        return lrs
    full = run(8, tmp_path / "a.pt")
    assert full == [1.0] * 3 + [0.5] * 3 + [0.25] * 2
    assert run(8, tmp_path / "b.pt", stop_after=5) == full[:5]
    assert run(8, tmp_path / "b.pt") == full[4:]       # epochs 1-4 saved: resumes at 5


def test_lr_schedule_per_iteration_is_the_authors_multistep():
    """--lr-schedule iteration: halved after lr_step, 2 lr_step and 3 lr_step batches, then
    kept (the authors' MultiStepLR([30, 60, 90]) stepped per batch); epoch: StepLR."""
    system = cai2021.Cai2021(year=2021, lr_schedule="iteration", lr_step=3)
    opt = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    sched, lrs = system._scheduler(opt), []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs == [1.0] * 3 + [0.5] * 3 + [0.25] * 3 + [0.125] * 3
    epoch = cai2021.Cai2021(year=2021, lr_step=3)._scheduler(opt)
    assert isinstance(epoch, torch.optim.lr_scheduler.StepLR) and epoch.step_size == 3
    with pytest.raises(ValueError, match="valid: epoch, iteration"):
        cai2021.Cai2021(year=2021, lr_schedule="batch")


def small_cai(**options):
    system = cai2021.Cai2021(year=2021, width=0.25, frames=32, **options)
    system.net = system.network(2)
    return system


def test_contrastive_weight_scales_eq4_in_eq5():
    """Eq. 5 with weight w: MSE + CE + w * eq. 4, eq. 4 computed here from the projections."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 128, 32), torch.tensor([0, 1, 0, 1])
    totals = {}
    for w in (0.0, 1.0, 0.0005):
        system = small_cai(contrastive_weight=w, dropout=0.0)
        system.net.eval()                     # BatchNorm's running statistics: the same pass
        totals[w] = system.joint_loss(x, y, y, 1.0).item()
    with torch.no_grad():
        net = system.net
        v_ae, v_cnn = net["ae"].encoder(x.flatten(1)), net["cnn"](x.unsqueeze(1))
        p, u = net["projection"](v_ae, v_cnn)
        eq4 = float(losses.contrastive_loss(u, p, temperature=0.07))
    assert totals[1.0] == pytest.approx(totals[0.0] + eq4, rel=1e-5)
    assert totals[0.0005] == pytest.approx(totals[0.0] + 0.0005 * eq4, rel=1e-5)


def test_dropout_before_the_classifier_in_training_only():
    """Dropout 0.5: in training each CNN feature reaches the classifier zeroed or doubled; in
    evaluation (eq. 3's scores) unchanged."""
    torch.manual_seed(0)
    system = small_cai()
    seen = {}
    system.net["cnn"].register_forward_hook(lambda m, i, out: seen.update(cnn=out))
    system.net["head"].register_forward_pre_hook(lambda m, i: seen.update(head=i[0]))
    x, y = torch.randn(4, 128, 32), torch.tensor([0, 1, 0, 1])
    system.net.train()
    system.joint_loss(x, y, y, 1.0)
    kept = seen["head"] != 0
    assert torch.allclose(seen["head"][kept], 2 * seen["cnn"][kept])
    assert 0.4 < kept.float().mean() < 0.6
    system.net.eval()
    system.joint_loss(x, y, y, 1.0)
    assert torch.equal(seen["head"], seen["cnn"])


def test_fit_warns_when_the_classifier_is_near_chance():
    """p = 1 / (1 + exp(A)) from eq. 3's A: A = 0 is p 1/2 (a warning), A = -log 19 is 0.95."""
    for a, warned in ((0.0, True), (-math.log(19), False)):
        lines = []
        system = cai2021.Cai2021(year=2021, epochs=10, batch_size=32, log=lines.append)
        system.class_key, system._train_scores = "section", np.full(5, a)
        system._log_confidence(n_patches=70)             # 2 batches of 32 and one of 6
        assert lines[0] == (f"classifier: median p of the own section on the training clips "
                            f"{1 / (1 + math.exp(a)):.2f} after 30 steps")
        assert any("warning" in line for line in lines) == warned


SMALL = ["--width", "0.25", "--frames", "32", "--epochs", "20", "--lr", "1e-3",
         "--batch-size", "16", "--device", "cpu"]


def cai_run(tmp, out="runs"):
    return ["--year", "2021", "--machine", "valve", "--system", "cai2021",
            "--data-root", tmp / "data", "--out", tmp / out, "--cache-dir", tmp / "cache"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2021-layout valve set (two sections, 16 training clips each, 8 test clips per
    section, domain and label), one model trained with all three losses and scored by its AE."""
    tmp = tmp_path_factory.mktemp("cai")
    synth.synthesize(tmp / "data", year=2021, machines=["valve"], n_train=16, n_test=8,
                     eval_part=False)
    assert asd.main(["train", *cai_run(tmp), *SMALL, "--score", "ae"]) == 0
    assert asd.main(["test", *cai_run(tmp), "--device", "cpu"]) == 0
    return tmp


def test_cai2021_on_synthetic_2021_data_reaches_auc_bar(trained):
    """The jointly trained AE detects the source domain's anomalies, the jointly trained
    MobileNetV2 tells the sections apart, and eq. 3 scores a clip unlike its section high.
    Eq. 3's AUC on these anomalies is not asserted: here sections differ in pitch alone, and a
    section classifier learns to hear pitch alone, which none of the anomalies moves. Its mean
    source AUC (two sections) was 0.67-0.83 over 4 seeds; 0.68-0.91 over 7 seeds without the
    tone anomalies (AUC 0.34-0.59 alone); 0.41-0.70 over 4 seeds with twice the training clips:
    the better the classifier, the blinder to the rest (commands: the note of issue 10)."""
    assert asd.main(["evaluate", "--year", "2021", "--system", "cai2021",
                     "--data-root", trained / "data", "--out", trained / "runs"]) == 0
    result = json.loads((trained / "runs/dcase2021/cai2021/dev/results.json").read_text())
    auc = {(s["section"], s["domain"]): s["auc"] for s in result["sections"]}
    # source: 8 normal and 8 anomalous clips per section; a random score's AUC has a standard
    # deviation of 0.15 there, its mean over two sections 0.11: 0.8 is almost three of them
    # above 0.5 (runs here: 0.80 and 0.92 after 20 epochs; 0.89 and 0.98 after 30). The
    # target domain is not asserted: two target training clips per section (1 in 10) leave the
    # AE's target AUC between 0.41 and 0.91 from run to run at these sizes
    source = [auc[s, "source"] for s in ("00", "01")]
    assert np.mean(source) >= 0.8 and min(source) >= 0.7, result["sections"]
    system, _ = asd.load_model(trained / "runs/dcase2021/cai2021/dev/models/valve", "cpu",
                               trained / "cache")
    assert system.classes == ["00", "01"] and system.scoring == "ae"
    clips = [c for c in data.list_clips(trained / "data/dcase2021/dev_data", year=2021,
                                            machine="valve", split="test")
             if c.domain == "source" and c.label == "normal"]
    with torch.no_grad():
        system.net.eval()
        right = [int(system.net["head"](system.net["cnn"](
                     features.frame_windows(m, width=32, hop=8).unsqueeze(1)))
                     .mean(0).argmax()) == t
                 for m, t in zip(system.inputs(clips), system._targets(clips))]
        system.scoring = "cnn"                  # eq. 3 on the same clips: finite, a ranking
        eq3 = system.score(clips)
        # eq. 3's premise: a clip unlike its own section scores high. Scored as the other
        # section, the same normal clips must rank above themselves scored as their own (a sign
        # error or a wrong class index would fail this; the bracket: the hand case above)
        swapped = system._score(system.inputs(clips), [1 - t for t in system._targets(clips)])
    assert np.mean(right) >= 0.9, right
    assert np.isfinite(eq3).all() and len(set(eq3.round(6))) == len(eq3)
    y = np.r_[np.zeros(len(eq3)), np.ones(len(swapped))]
    assert scoring.roc_auc(y, np.r_[eq3, swapped]) >= 0.95, (eq3, swapped)
    assert np.median(eq3) < 0 < np.median(swapped)      # p > 1/2 for the own class, < 1/2 else
