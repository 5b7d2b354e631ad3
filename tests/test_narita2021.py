"""Narita 2021: the center loss and the VAE's terms against hand-worked cases of eq. 3-10, PANNs'
log-mel against librosa, the ResNet38 checkpoint loader on files in PANNs' format (rejected when
a weight is missing or mis-shaped, and giving the same features as the network it was saved
from), and the whole system on synthetic 2021 data reaching an AUC bar."""
import json
import math

import librosa
import numpy as np
import pytest
import scipy.signal
import torch

import asd
import encoders
import features
import losses
import models
import submission
import synth
from systems import narita2021


def test_center_loss_and_centre_update_follow_eq_3_to_5():
    loss = losses.CenterLoss(3, 2, alpha=0.5)
    loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    h, y = torch.tensor([[2.0, 0.0], [4.0, 0.0], [1.0, 3.0]]), torch.tensor([0, 0, 1])
    # eq. 3 per example: 1/2 ||h_i - c_{y_i}||^2
    assert torch.allclose(loss(h, y), torch.tensor([2.0, 8.0, 2.0]))
    loss.update(h, y)
    # eq. 4: dc_0 = ((0-2, 0) + (0-4, 0)) / (1 + 2) = (-2, 0); eq. 5: c_0 = c_0 - 0.5 dc_0 = (1, 0)
    # dc_1 = (1-1, 1-3) / (1 + 1) = (0, -1); c_1 = (1, 1.5); class 2 is not in the batch
    assert torch.allclose(loss.centers, torch.tensor([[1.0, 0.0], [1.0, 1.5], [5.0, 5.0]]))


def test_vae_terms_scores_and_loss_follow_eq_6_to_10():
    x, x_hat = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [0.0, 1.0]])
    mu, logvar = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    rec, kld = losses.vae_loss_terms(x, x_hat, mu, logvar)
    assert torch.allclose(rec, torch.tensor([1.0 + 4.0, 1.0]))               # eq. 6
    # eq. 7: -1/2 [(1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2)] = 1 - ln(2) / 2; N(0, 1) itself: 0
    assert torch.allclose(kld, torch.tensor([1 - math.log(2.0) / 2, 0.0]))
    center = torch.tensor([2.0, 0.5])
    eq9, eq10 = rec + kld, rec + kld + 150 * center
    score = lambda kind: narita2021.anomaly_score(rec, kld, center, kind=kind, lam=150, weight=0.01)
    assert torch.allclose(score("eq9"), eq9) and torch.allclose(score("eq10"), eq10)
    assert torch.allclose(score("ensemble"), eq9 + 0.01 * eq10)
    # eq. 8, the training loss, is eq. 10 averaged over the batch
    assert float(narita2021.eq10(rec, kld, center, 150).mean()) == pytest.approx(float(eq10.mean()))
    with pytest.raises(ValueError, match="valid: ensemble, eq9, eq10"):
        narita2021.Narita2021(year=2021, anomaly_score="eq11")


def test_vae_follows_table_1():
    vae = models.VAE(3776).eval()
    widths = [m.out_features for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [1024, 1024, 1024, 512, 512, 512, 512, 1024, 1024, 1024, 3776]
    x = torch.randn(4, 3776)
    x_hat, mu, logvar, h = vae(x)
    assert (x_hat >= 0).all() and h.shape == (4, 512)               # ReLU output; h is encoder's
    assert torch.equal(vae(x)[0], x_hat)                            # no generator: z = mu
    assert not torch.equal(vae(x, torch.Generator().manual_seed(0))[0], x_hat)


def test_panns_log_mel_matches_librosa_at_32_khz():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    x = 0.1 * np.sin(2 * np.pi * 1000 * t) + 0.05 * rng.standard_normal(16000)   # 1 s, float64
    x32 = features.resample(torch.from_numpy(x), sr_in=16000, sr_out=32000).numpy()
    assert np.array_equal(x32, scipy.signal.resample_poly(x, 2, 1))
    spectrum = np.abs(np.fft.rfft(x32))
    assert np.argmax(spectrum) * 32000 / len(x32) == pytest.approx(1000, abs=2)  # same pitch
    mel = librosa.feature.melspectrogram(y=x32, sr=32000, n_fft=1024, hop_length=320,
                                         window="hann", center=True, pad_mode="reflect",
                                         power=2.0, n_mels=64, fmin=50, fmax=14000)
    ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)        # PANNs' settings
    ours = features.panns_log_mel(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (64, 101)
    assert np.abs(ours - ref).max() < 1e-4                                   # dB
    silent = features.panns_log_mel(torch.zeros(4000, dtype=torch.float64))
    assert torch.all(silent == -100.0)                                       # amin 1e-10


def lean_checkpoint(model):
    """A file's worth of PANNs-format state in a few kB: every tensor of the right shape, all
    zeros (one stored element expanded)."""
    return {k: torch.zeros(()).expand(v.shape) for k, v in model.state_dict().items()}


def test_checkpoint_loader_names_missing_and_misshaped_weights(tmp_path):
    net = encoders.ResNet38()
    state = lean_checkpoint(net)
    assert sum(v.shape[0] for k, v in state.items() if k.startswith("resnet") and
               k.endswith("bn2.weight")) == 3776                  # the paper's d: 16 BasicBlocks
    state.pop("resnet.layer3.2.conv1.weight")
    torch.save({"iteration": 0, "model": state}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"'resnet.layer3.2.conv1.weight' \(256, 256, 3, 3\) "
                                         r"is missing") as err:
        encoders.load_panns_checkpoint(net, tmp_path / "missing.pth")
    assert len(str(err.value).splitlines()) == 1
    state = lean_checkpoint(net)
    state["conv_block1.conv1.weight"] = torch.zeros(64, 1, 5, 5)
    torch.save({"model": state}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"'conv_block1.conv1.weight' has shape \(64, 1, 5, 5\), "
                                         r"expected \(64, 1, 3, 3\)"):
        encoders.load_panns_checkpoint(net, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="no such file"):
        encoders.load_panns_checkpoint(net, tmp_path / "absent.pth")
    # BatchNorm counters may be absent; keys ResNet38 lacks are returned, not fatal
    state = {k: v for k, v in lean_checkpoint(net).items() if "num_batches_tracked" not in k}
    torch.save({"model": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "ok.pth")
    assert encoders.load_panns_checkpoint(net, tmp_path / "ok.pth") == ["extra.weight"]


def test_checkpoint_in_panns_format_gives_the_features_of_the_saved_network(tmp_path):
    """The file PANNs' main.py writes ({"iteration", "model"}) of a seeded ResNet38 with moved
    BatchNorm statistics: the system's features from it equal the channel means of that
    network's 16 BasicBlocks on PANNs' log-mel of the clip."""
    torch.manual_seed(0)
    net = encoders.ResNet38().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    torch.save({"iteration": 600000, "model": net.state_dict()}, tmp_path / "ResNet38.pth")
    clip = synth.machine_sound(np.random.default_rng(0), kind="clicks", f0=100.0, seconds=1.0)
    synth.write_clip(tmp_path / "a.wav", clip)
    system = narita2021.Narita2021(year=2021, pretrained=str(tmp_path / "ResNet38.pth"),
                                   log=lambda line: None)
    system.extractor = system._load_resnet38()
    got = system.vectors(system.log_mels([type("Clip", (), {"path": tmp_path / "a.wav"})]))
    with torch.no_grad():
        wave = torch.from_numpy(features.load_wav(tmp_path / "a.wav"))      # 16-bit, as read
        direct = encoders.channel_means(net(features.panns_log_mel(wave)[None])[1:17])
    assert got.shape == (1, 3776) and torch.allclose(got, direct, atol=1e-6)
    assert system.min_samples < len(clip) and "resnet38" in system.settings["extractor"]
    assert not system.minmax         # auto: ResNet38's non-negative block means as they are


def test_balanced_ensemble_weight_gives_eq9_and_eq10_equal_shares(capsys):
    """--ensemble-weight balanced: on the training clips, w x eq. 10 weighs as much as eq. 9
    on average, as the paper's 0.01 did on its scales; both terms are logged."""
    system = narita2021.Narita2021(year=2021, hidden=16, bottleneck=8, latent=4)
    system.sections = ["00", "01"]
    system._build_vae(12)
    with torch.no_grad():
        system.center.centers.normal_(generator=torch.Generator().manual_seed(0))
    x, y = torch.rand(10, 12, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 5)
    system._balance(x, y)
    with torch.no_grad():
        x_hat, mu, logvar, h = system.vae(x)
        rec, kld = losses.vae_loss_terms(x, x_hat, mu, logvar)
        e10 = narita2021.eq10(rec, kld, system.center(h, y), 150.0)
    assert float(system.weight * e10.mean()) == pytest.approx(float(narita2021.eq9(rec, kld).mean()))
    assert "lambda L_C" in capsys.readouterr().out
    fixed = narita2021.Narita2021(year=2021, ensemble_weight=0.01)
    assert fixed.weight == 0.01 and fixed.minmax      # the own extractor's features: scaled
    with pytest.raises(ValueError, match="balanced or a number"):
        narita2021.Narita2021(year=2021, ensemble_weight="half")


# The AUC bar: a synthetic 2021 valve set, two sections, 24 training clips each (1 in 10 from
# the target domain), 10 normal and 10 anomalous test clips per section and domain. Small
# settings: MobileNetV2 width 0.25 trained 5 epochs as the extractor, a VAE of 256/64/32 units.
SMALL = ["--width", "0.25", "--extractor-epochs", "5", "--epochs", "30", "--batch-size", "16",
         "--hidden", "256", "--bottleneck", "64", "--latent", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("narita")
    synth.synthesize(tmp / "data", year=2021, machines=["valve"], n_train=24, n_test=10,
                     eval_part=False)
    run = ["--year", "2021", "--machine", "valve", "--system", "narita2021",
           "--data-root", tmp / "data", "--out", tmp / "runs", "--cache-dir", tmp / "cache"]
    assert asd.main(["train", *run, *SMALL]) == 0
    assert asd.main(["test", *run, "--device", "cpu"]) == 0
    assert asd.main(["evaluate", "--year", "2021", "--system", "narita2021",
                     "--data-root", tmp / "data", "--out", tmp / "runs"]) == 0
    return tmp / "runs/dcase2021/narita2021/dev"


def test_narita2021_on_synthetic_2021_data_reaches_auc_bar(trained):
    result = json.loads((trained / "results.json").read_text())
    source = [s["auc"] for s in result["sections"] if s.get("domain") == "source"]
    # 10 normal and 10 anomalous clips per section and domain: a random score's mean AUC over
    # two sections has a standard deviation of about 0.07 around 0.5; 0.8 is four of them
    # away. The target domain (2 of the 24 training clips per section) is reported, not held
    # to a bar: the VAE has barely seen it (the paper's target AUCs are its weak side too).
    assert len(source) == 2 and np.mean(source) >= 0.8, result["sections"]
    about = json.loads((trained / "models/valve/model.json").read_text())
    assert about["features"]["extractor"].startswith("mobilenetv2")
    # which extractor made the features, and the paper's table 6 beside ours
    assert result["extractors"]["valve"] == about["features"]["extractor"]
    markdown = (trained / "results.md").read_text()
    assert f"valve: features from {about['features']['extractor']} (the paper: PANNs" in markdown
    assert result["paper"]["sections"][0] == {"auc": 0.7885, "pauc": 0.6300}   # valve 00 source
    assert about["options"]["anomaly_score"] == "ensemble"
    scores = [float(v) for _, v in submission.read_csv(
        trained / "results/anomaly_score_valve_section_00_source_test.csv")]
    assert len(set(scores)) == len(scores) == 20


def test_one_centre_per_training_section_with_the_additional_sections(tmp_path):
    """CenterLossLayer(6): a 2021 dev run trains on dev's sections and the additional training
    ones (synth: 00, 01 and 03, 04), one centre each; the test clips use their own."""
    synth.synthesize(tmp_path / "data", year=2021, machines=["valve"], n_train=4, n_test=1)
    run = ["--year", "2021", "--machine", "valve", "--system", "narita2021",
           "--data-root", tmp_path / "data", "--out", tmp_path / "runs", "--no-cache",
           "--device", "cpu", "--threads", "1"]
    assert asd.main(["train", *run, "--quick"]) == 0
    models = tmp_path / "runs/dcase2021/narita2021/dev/models/valve"
    sections = sorted({g["section"] for g in
                       json.loads((models / "model.json").read_text())["trained_on"]})
    saved = torch.load(models / "model.pt", weights_only=False)["state"]
    assert sections == saved["sections"] == ["00", "01", "03", "04"]
    assert saved["center"]["centers"].shape[0] == 4
    assert asd.main(["test", *run]) == 0
