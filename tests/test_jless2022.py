"""JLESS 2022: LOF against scikit-learn (duplicates included), cosine to the mean against scipy,
log-softmax and focal loss against cross-entropy and hand-worked values, FMix masks (their
mean, their low frequencies), batch mixing (target clips in every batch), MobileFaceNet
against table 1 layer by layer, the DPT's masked reconstruction learning, and the system on
synthetic 2022 data with a target domain reaching an AUC bar through asd.main."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial import distance
from sklearn.neighbors import LocalOutlierFactor

import asd
import augment
import data
import detectors
import losses
import models
import submission
import synth
import train
from systems import jless2022


def test_lof_equals_scikit_learn_novelty_scores_with_duplicates():
    rng = np.random.default_rng(0)
    fit = rng.standard_normal((60, 6))
    fit[10:13] = fit[5]                       # three copies of one point: k-distance > 0
    fit[20:27] = fit[3]                       # eight copies: more duplicates than k = 4
    new = rng.standard_normal((30, 6)) * 1.5
    new[:2], new[2] = fit[5], fit[3]          # new points on top of duplicated ones
    for k in (4, 1, 9):
        ref = LocalOutlierFactor(n_neighbors=k, novelty=True).fit(fit)
        ours = detectors.LOF(k).fit(torch.from_numpy(fit))         # float64, as the reference
        assert np.allclose(ours.score(torch.from_numpy(new)).numpy(), -ref.score_samples(new),
                           rtol=1e-9), k
        assert np.allclose(ours.train_scores().numpy(), -ref.negative_outlier_factor_, rtol=1e-9)
    few = fit[:3]                             # k larger than N - 1: scikit-learn uses N - 1
    with pytest.warns(UserWarning):
        ref = LocalOutlierFactor(n_neighbors=4, novelty=True).fit(few)
    ours = detectors.LOF(4).fit(torch.from_numpy(few))
    assert np.allclose(ours.score(torch.from_numpy(new)).numpy(), -ref.score_samples(new))
    again = detectors.LOF().load_state(detectors.LOF(4).fit(torch.from_numpy(fit)).state())
    assert torch.equal(again.score(torch.from_numpy(new)),
                       detectors.LOF(4).fit(torch.from_numpy(fit)).score(torch.from_numpy(new)))


def test_cosine_to_mean_equals_scipy_and_log_softmax_is_cross_entropy():
    rng = np.random.default_rng(1)
    fit, new = rng.standard_normal((20, 5)), rng.standard_normal((7, 5))
    det = detectors.CosineToMean().fit(torch.from_numpy(fit))
    expected = [distance.cosine(v, fit.mean(axis=0)) for v in new]
    assert np.allclose(det.score(torch.from_numpy(new)).numpy(), expected)
    logits, classes = torch.randn(9, 4), torch.randint(4, (9,))
    assert torch.allclose(detectors.log_softmax_score(logits, classes).float(),
                          F.cross_entropy(logits, classes, reduction="none"), atol=1e-6)
    # by hand: logits (0, ln 3) give p = (1/4, 3/4)
    got = detectors.log_softmax_score(torch.tensor([[0.0, math.log(3)]], dtype=torch.float64),
                                      torch.tensor([0]))
    assert math.isclose(float(got), math.log(4), rel_tol=1e-9)


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_weights_easy_examples_down():
    logits, labels = torch.randn(16, 6), torch.randint(6, (16,))
    assert torch.allclose(losses.focal_loss(logits, labels, gamma=0.0),
                          F.cross_entropy(logits, labels), atol=1e-6)
    # by hand: p_t = 3/4 (logits 0 and ln 3), gamma 2: -(1/4)^2 log(3/4)
    got = losses.focal_loss(torch.tensor([[0.0, math.log(3)]]), torch.tensor([1]), gamma=2.0)
    assert math.isclose(float(got), -(0.25 ** 2) * math.log(0.75), rel_tol=1e-5)


def test_fmix_masks_have_the_requested_mean_and_low_frequencies():
    gen = torch.Generator().manual_seed(0)
    h, w = 64, 32
    fy, fx = torch.fft.fftfreq(h)[:, None], torch.fft.fftfreq(w)[None, :]
    low = torch.sqrt(fx ** 2 + fy ** 2) <= 0.1                       # 3% of the components
    for lam in (0.1, 0.37, 0.5, 0.9):
        mask = augment.fmix_mask((h, w), lam, gen)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == round(lam * h * w)
        power = torch.fft.fft2(mask - mask.mean()).abs() ** 2
        assert power[low].sum() > 0.8 * power.sum(), lam
        shuffled = mask.flatten()[torch.randperm(h * w, generator=gen)].reshape(h, w)
        power = torch.fft.fft2(shuffled - shuffled.mean()).abs() ** 2
        assert power[low].sum() < 0.2 * power.sum()                   # white: no such blobs
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, h, w)
    mixed, perm, lam = augment.fmix(x, gen, np.random.default_rng(0), alpha=1.0)
    own = mixed == x                                                   # each value: its own
    assert torch.all(own | (mixed == x[perm]))                         # or its partner's
    assert abs(own[perm != torch.arange(4)].float().mean() - lam) < 1e-6


def test_domain_mixed_batches_always_hold_target_clips():
    gen = torch.Generator().manual_seed(0)
    is_target = torch.zeros(203, dtype=torch.bool)
    is_target[torch.randperm(203, generator=gen)[:7]] = True
    for size in (2, 8, 32):
        seen = []
        for idx in train.domain_mixed_batches(is_target, size, gen):
            assert is_target[idx].any() and len(idx) <= size
            seen += idx[~is_target[idx]].tolist()
        assert sorted(seen) == (~is_target).nonzero().flatten().tolist()   # each source once
    assert all(int(is_target[i].sum()) == 8 for i in
               list(train.domain_mixed_batches(is_target, 32, gen))[:-1])   # a quarter of 32
    plain = list(train.domain_mixed_batches(torch.zeros(10, dtype=torch.bool), 4, gen))
    assert [len(b) for b in plain] == [4, 4, 2]                        # no targets: batches
    assert sorted(torch.cat(plain).tolist()) == list(range(10))


def test_mobilefacenet_follows_table_1_layer_by_layer():
    net = models.MobileFaceNet(input_shape=(128, 64)).eval()
    shapes, x = [], torch.zeros(1, 1, 128, 64)
    for layer in net.features:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    # table 1's rows (C, F, T): conv 3x3 s2, depthwise 3x3, bottlenecks (5, 1, 6, 1, 2
    # repeats), conv 1x1, linear GDConv, linear conv 1x1
    expected = ([(64, 64, 32)] * 2 + [(64, 32, 16)] * 5 + [(128, 16, 8)] * 7
                + [(128, 8, 4)] * 3 + [(512, 8, 4), (512, 1, 1), (128, 1, 1)])
    assert shapes == expected
    expansions = [b.block[0][0].out_channels // b.block[0][0].in_channels
                  for b in net.features[2:17]]
    assert expansions == [2] * 5 + [4] + [2] * 6 + [4] + [2] * 2
    gdconv = net.features[-2][0]
    assert gdconv.kernel_size == (8, 4) and gdconv.groups == 512
    assert not any(isinstance(m, torch.nn.PReLU) for m in net.features[-2:].modules())  # linear
    stft = models.MobileFaceNet(input_shape=(512, 32), width=0.25).eval()
    assert stft.features[-2][0].kernel_size == (32, 2)                 # the STFT variant
    assert stft(torch.zeros(2, 1, 512, 32)).shape == (2, 128)


def test_dpt_masked_reconstruction_loss_decreases_on_a_tiny_set():
    torch.manual_seed(0)
    net = models.DPT(input_shape=(16, 16), tile=(4, 4), dim=16, depth=1, heads=2)
    rows = torch.linspace(0, 3, 16)[:, None]
    x = torch.sin(rows * torch.arange(1, 5.0)[:, None, None] + torch.arange(16.0) / 3)  # (4, 16, 16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen, losses = torch.Generator().manual_seed(0), []
    for _ in range(60):
        mask = torch.rand((4, *net.grid), generator=gen) < 0.25
        _, rec = net(x, mask)
        loss = ((rec - net.tiles(x)) ** 2).mean(dim=-1)[mask].mean()
        losses.append(train.step(opt, loss).item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses
    # the grid: tile (i, j) holds rows 4i..4i+3 and frames 4j..4j+3
    assert torch.equal(net.tiles(x)[1, 2, 3], x[1, 8:12, 12:16].flatten())


def test_table_3_is_the_recipe_and_flags_override_it():
    system = jless2022.Jless2022(year=2022)
    assert system.resolve("bearing") == dict(feature="logmel", model="dpt", loss="focal",
                                             augment=("mixup",), detector="log-softmax+mse")
    assert system.resolve("RoboticArm") == jless2022.RECIPES[jless2022.OTHER]
    assert system.resolve("RoboticArm", n_classes=1)["model"] == "dpt"      # one class
    assert system.resolve("fan", n_classes=1) == jless2022.RECIPES["bearing"]   # table 3's too
    with pytest.raises(ValueError, match="one class"):
        jless2022.Jless2022(year=2024, model="mfn", detector="lof").resolve("RoboticArm", 1)
    mine = jless2022.Jless2022(year=2022, detector="cosine", augment=("none",))
    assert mine.resolve("fan")["detector"] == "cosine" and mine.resolve("fan")["augment"] == ()
    with pytest.raises(ValueError, match="valid: auto, lof, cosine"):
        jless2022.Jless2022(year=2022, detector="knn")
    with pytest.raises(ValueError, match="needs --model dpt"):
        jless2022.Jless2022(year=2022, model="mfn").resolve("bearing")


# Small settings: 2-s synthetic clips, so a 256-point STFT (hop 128: 251 frames, 128 bins up to
# 8 kHz) and a quarter-width MobileFaceNet; the DPT on 64-band log-mel
SMALL = ["--n-fft", "256", "--hop", "128", "--stft-bins", "128", "--n-mels", "64",
         "--mfn-width", "0.25", "--dpt-dim", "32", "--patch-hop", "48", "--device", "cpu"]
EPOCHS = {"fan": 6, "bearing": 8}


def jless_run(tmp, machine, out="runs"):
    return ["--year", "2022", "--machine", machine, "--system", "jless2022",
            "--data-root", tmp / "data", "--out", tmp / out, "--cache-dir", tmp / "cache"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2022-layout set (fan: table 3's STFT MobileFaceNet, ArcFace, FMix and mixup, LOF;
    bearing: its DPT, focal loss, log-softmax & MSE), two sections each, 30 training clips
    per section of which 3 are from the target domain; trained and tested."""
    tmp = tmp_path_factory.mktemp("jless")
    synth.synthesize(tmp / "data", year=2022, machines=list(EPOCHS), n_train=30, n_test=10,
                     eval_part=False)
    for machine, epochs in EPOCHS.items():
        run = jless_run(tmp, machine)
        assert asd.main(["train", *run, *SMALL, "--epochs", epochs]) == 0
        assert asd.main(["test", *run, "--device", "cpu"]) == 0
    return tmp


def test_jless2022_on_synthetic_2022_data_reaches_auc_bar(trained):
    assert asd.main(["evaluate", "--year", "2022", "--system", "jless2022",
                     "--data-root", trained / "data", "--out", trained / "runs"]) == 0
    result = json.loads((trained / "runs/dcase2022/jless2022/dev/results.json").read_text())
    sections = [s for s in result["sections"] if s["section"] != "all"]
    assert len(sections) == 4
    source = [s["auc_source"] for s in sections]
    target = [s["auc_target"] for s in sections]
    # 10 normal and 10 anomalous clips per section and domain: a random scorer's AUC has a
    # standard deviation of 0.13 each, 0.066 for a mean of four, 0.047 for all eight; the bars
    # are 4.5, 1.5 and 4.7 of them away. The target domain is harder here than in the paper:
    # 3 target clips per section, and synth's target speed-up (12%) nearly equals the pitch
    # step between sections (10%). Measured: source 0.88, target 0.69, all 0.79.
    assert np.mean(source) >= 0.8 and np.mean(target) >= 0.6, sections
    assert np.mean(source + target) >= 0.72, sections
    models_dir = trained / "runs/dcase2022/jless2022/dev/models"
    for machine in EPOCHS:
        saved = torch.load(models_dir / machine / "model.pt", weights_only=False)["state"]
        assert saved["recipe"] == jless2022.RECIPES[machine]
        assert json.loads((models_dir / machine / "threshold.json").read_text())["threshold"] > 0


def test_jless2022_same_seed_same_scores(trained):
    run = jless_run(trained, "bearing", out="again")
    assert asd.main(["train", *run, *SMALL, "--epochs", EPOCHS["bearing"]]) == 0
    assert asd.main(["test", *run, "--device", "cpu"]) == 0
    name = "anomaly_score_bearing_section_00_test.csv"
    first = trained / "runs/dcase2022/jless2022/dev/results" / name
    again = trained / "again/dcase2022/jless2022/dev/results" / name
    assert len({v for _, v in submission.read_csv(first)}) > 10
    assert again.read_text() == first.read_text()


def test_batch_mixing_takes_the_target_patches_own_share_or_the_flags():
    gen = torch.Generator().manual_seed(0)
    is_target = torch.zeros(100, dtype=torch.bool)
    is_target[:3] = True                                   # 3 % target: 0.96 of 32, so 1
    system = jless2022.Jless2022(year=2022)
    assert system.batch_target_share(is_target) == pytest.approx(0.03)
    assert all(int(is_target[b].sum()) == 1 for b in system._batches(is_target, gen))
    is_target[:30] = True                                  # 30 %: 9.6 of 32, so 10
    full = [b for b in system._batches(is_target, gen) if len(b) == 32]
    assert full and all(int(is_target[b].sum()) == 10 for b in full)
    flagged = jless2022.Jless2022(year=2022, target_share=0.25)  # a quarter of 32: 8
    full = [b for b in flagged._batches(is_target, gen) if len(b) == 32]
    assert full and all(int(is_target[b].sum()) == 8 for b in full)


class TwoNumbers(torch.nn.Module):
    """A stand-in network whose embedding of a patch is its first two values."""
    embedding_dim = 2

    def forward(self, x):
        return x.flatten(1)[:, :2]


def test_l2_normalise_scales_each_patch_embedding_before_the_clip_mean():
    # clip 0: patches (3, 4) and (0, 2) -> unit (0.6, 0.8) and (0, 1), mean (0.3, 0.9);
    # raw: (1.5, 3); clip 1: (1, 0) either way
    x = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]], [[1.0, 0.0]]])          # (3, 1, 2)
    owner = torch.tensor([0, 0, 1])
    for flag, clip0 in ((True, [0.3, 0.9]), (False, [1.5, 3.0])):
        system = jless2022.Jless2022(year=2022, l2_normalise=flag)
        system.recipe = dict(model="mfn")
        system.net, system.head = TwoNumbers(), torch.nn.Linear(2, 3)
        emb, logits, _ = system._outputs(x, owner, 2)
        assert torch.allclose(emb, torch.tensor([clip0, [1.0, 0.0]]))
        assert len(logits) == 2 and logits[0].shape == (2, 3)


def test_dpt_id_loss_sees_the_unmasked_input_it_is_scored_on():
    system = jless2022.Jless2022(year=2022, model="dpt", loss="focal", augment=["none"],
                                 n_mels=16, mel_frames=16, dpt_dim=16, dpt_depth=1,
                                 dpt_heads=2, dpt_tile=(4, 4))
    system.recipe = system.resolve("bearing", 2)
    system.build(2)
    seen, id_loss = [], system._id_loss
    system._id_loss = lambda emb, y: seen.append(emb) or id_loss(emb, y)
    x, y = torch.randn(4, 16, 16), torch.tensor([0, 1, 0, 1])
    system.net.eval()                  # the same forward pass in both calls below
    system._loss(x, y, torch.Generator().manual_seed(0), np.random.default_rng(0))
    unmasked, _ = system.net(x)
    masked, _ = system.net(x, torch.ones(4, *system.net.grid, dtype=torch.bool))
    assert torch.allclose(seen[0], unmasked) and not torch.allclose(seen[0], masked)


def test_batchnorm_statistics_are_recomputed_after_too_few_updates(tmp_path):
    """The smoke run below: 3 epochs of one batch leave 0.9^3 = 73% of each BatchNorm layer's
    start (mean 0, variance 1) in its running statistics; in eval mode the clips' differences
    shrank layer by layer, their embeddings lay within 4e-4 of their length of one another and
    LOF gave the held-out clips equal scores. Recomputed over the training patches, the first
    layer holds their exact statistics and the embeddings spread."""
    synth.synthesize(tmp_path / "data", year=2022, machines=["valve"], n_train=8, n_test=1,
                     eval_part=False)
    clips = data.list_clips(tmp_path / "data/dcase2022/dev_data", year=2022, machine="valve",
                            split="train")
    spread = {}
    for mode in ("never", "auto"):
        lines = []
        system = jless2022.Jless2022(year=2022, epochs=3, recompute_bn=mode, log=lines.append,
                                     **{k: v for k, v in jless2022.Jless2022.quick.items()
                                        if k != "epochs"})
        (tmp_path / mode).mkdir()
        system.fit(clips, tmp_path / mode)
        x, owner = system.patches(clips)
        emb, _, _ = system._outputs(x, owner, len(clips))
        spread[mode] = float(torch.cdist(emb, emb).max() / emb.norm(dim=1).mean())
        assert any("BatchNorm statistics recomputed" in l for l in lines) is (mode == "auto")
    assert spread["never"] < 1e-2 < 0.1 < spread["auto"], spread
    first, bn = system.net.features[0][0], system.net.features[0][1]
    with torch.no_grad():
        h = first(x[:, None])                                      # (P, C, F', T')
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.transpose(0, 1).flatten(1).var(dim=1), rtol=1e-4)


def test_dev_runs_train_on_the_additional_sections_or_say_they_are_missing(tmp_path, capsys):
    """Table 3 trains on sections 0-5: a 2022 dev run takes eval_data/<m>/train (synth: 03, 04)
    beside dev's 00, 01; without that folder it trains on 00, 01 and says what is missing."""
    synth.synthesize(tmp_path / "data", year=2022, machines=["valve"], n_train=8, n_test=1)
    run = ["train", *jless_run(tmp_path, "valve"), "--quick", "--epochs", "3", "--device", "cpu",
           "--threads", "1"]
    trained_on = tmp_path / "runs/dcase2022/jless2022/dev/models/valve/model.json"
    assert asd.main(run) == 0
    groups = json.loads(trained_on.read_text())["trained_on"]
    assert [(g["part"], g["section"]) for g in groups] == [
        ("dev", "00"), ("dev", "01"), ("eval", "03"), ("eval", "04")]
    assert "additional training sections" not in capsys.readouterr().out
    shutil.rmtree(tmp_path / "data/dcase2022/eval_data/valve/train")
    assert asd.main([*run, "--force"]) == 0
    groups = json.loads(trained_on.read_text())["trained_on"]
    assert [(g["part"], g["section"]) for g in groups] == [("dev", "00"), ("dev", "01")]
    (line,) = [l for l in capsys.readouterr().out.splitlines() if "additional" in l]
    assert line.startswith("valve: the additional training sections 03, 04, 05 (") and (
        "trains on sections 00, 01 only; the paper used sections 00-05" in line and
        line.endswith("python asd.py download --year 2022 --machine valve --part train "
                      f"--data-root {tmp_path / 'data'}"))
