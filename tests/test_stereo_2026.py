"""DCASE 2026, the stereo year: its name rules and year table, stereo clips read channel by
channel (--channel near|far|mean|both) against soundfile's own reading, a channel count that
does not fit the year refused in one line naming the file, the synthetic far channel harder to
detect with than the near one, and synth -> train -> test -> evaluate -> package through
asd.main, whose official score equals an independent computation of the 2026 rule (harmonic
mean of AUC source, AUC target, pAUC; scikit-learn and scipy) on the same CSVs."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

import asd
import data
import features
import submission
import synth


# --------------------------------------------------------------------------------------------
# Name rules and the year table

@pytest.mark.parametrize("name, fields", [
    ("section_00_source_train_normal_0000_.wav", ("source", "train", "normal", "")),
    ("section_00_target_test_anomaly_0049_.wav", ("target", "test", "anomaly", "")),
    ("section_00_source_test_normal_0003_speed_A.wav", ("source", "test", "normal", "speed_A")),
    ("section_00_0199.wav", (None, "test", "unknown", "")),
])
def test_2026_names(name, fields):
    clip = data.parse_name(Path("d/ToyCarEmu/test") / name, year=2026)
    assert (clip.machine, clip.section) == ("ToyCarEmu", "00")
    assert (clip.domain, clip.split, clip.label, clip.attributes) == fields


def test_the_empty_attribute_form_is_2026s_alone():
    with pytest.raises(data.DataError, match="not a DCASE 2025 clip name"):
        data.parse_name(Path("d/fan/train/section_00_source_train_normal_0000_.wav"), year=2025)


def test_2026_year_table(capsys):
    spec = data.get_year(2026)
    assert spec.channels == 2 and all(data.get_year(y).channels == 1 for y in range(2020, 2026))
    assert spec.records == {"dev": 19336329, "train": 20151556, "eval": 20437238}
    assert asd.main(["list", "machines", "--year", "2026"]) == 0
    assert capsys.readouterr().out.split() == ["ToyCar", "ToyCarEmu", "bearingEmu", "fan",
                                               "gearboxEmu", "sliderEmu", "valveEmu"]
    assert asd.main(["list", "sections", "--year", "2026", "--part", "eval"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{m} 00" for m in ("ToyDrone", "ToothBrush", "SewingMachine", "BlowerDustCollector",
                            "Sander")]
    assert submission.result_filename(2026, "anomaly_score", "Sander", "00") == \
        "anomaly_score_Sander_section_00_test.csv"
    assert submission.baseline_name(2026, "decision_result_Sander_section_00_test.csv") == \
        "decision_result_DCASE2026T2Sander_section_00_test_seed13711_id(0_)_Eval.csv"


# --------------------------------------------------------------------------------------------
# Channels

@pytest.fixture
def stereo(tmp_path):
    """A stereo and a mono 16-bit wav; the stereo one's channels differ (a tone, noise)."""
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    x = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * rng.uniform(-1, 1, t.size)], axis=1)
    sf.write(tmp_path / "st.wav", x, 16000, subtype="PCM_16")
    sf.write(tmp_path / "mo.wav", x[:, 0], 16000, subtype="PCM_16")
    return tmp_path / "st.wav", tmp_path / "mo.wav"


def test_each_channel_is_read_as_soundfile_reads_it(stereo):
    reference, _ = sf.read(stereo[0], dtype="float32")           # (n, 2)
    expected = {"near": reference[:, 0], "far": reference[:, 1],
                "mean": reference.mean(axis=1), "both": reference.T}
    for channel, want in expected.items():
        with features.reading(channels=2, channel=channel):
            got = features.load_wav(stereo[0])
        assert got.shape == want.shape and got.dtype == np.float32, channel
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(expected["near"], expected["far"])


def test_a_channel_count_that_does_not_fit_the_year_is_one_line(stereo):
    with pytest.raises(features.AudioError) as stereo_in_mono:
        features.load_wav(stereo[0])                                  # a mono year's run
    with features.reading(channels=2, channel="near"), \
            pytest.raises(features.AudioError) as mono_in_2026:
        features.load_wav(stereo[1])
    for err, name, count in ((stereo_in_mono, "st.wav", "2 channels, expected 1"),
                             (mono_in_2026, "mo.wav", "1 channel, expected 2")):
        message = str(err.value)
        assert message.startswith(str(stereo[0].parent / name)) and count in message
        assert "\n" not in message


def test_the_cache_key_carries_the_channel(stereo, tmp_path):
    cache = tmp_path / "cache"
    got = {}
    for channel in ("near", "far"):
        with features.reading(channels=2, channel=channel):
            got[channel] = features.clip_features([stereo[0]], "log_mel",
                                                  features.log_mel_settings(2026),
                                                  cache_dir=cache)[0]
    assert len(list(cache.glob("*.npy"))) == 2                     # one entry per channel
    assert not np.allclose(got["near"], got["far"])


def test_channel_flags_are_checked_in_one_line(tmp_path, capsys):
    base = ["train", "--system", "ae", "--data-root", tmp_path, "--out", tmp_path]
    assert asd.main([*base, "--year", "2024", "--machine", "fan", "--channel", "far"]) == 2
    assert "--channel far: the DCASE 2024 clips are mono" in capsys.readouterr().err
    base[2] = "midea2024"
    assert asd.main([*base, "--year", "2026", "--machine", "fan", "--channel", "both"]) == 2
    err = capsys.readouterr().err
    assert "--channel both: midea2024 reads one channel; systems that declare two: ae" in err
    assert len(err.splitlines()) == 1


def test_the_ae_reads_both_channels(tmp_path):
    """--channel both: the AE's vectors hold the near and the far log-mel bands of each frame
    (2 x 128 x 5 values), and test reads the channels the model was trained on."""
    synth.synthesize(tmp_path / "data", year=2026, machines=["fan"], n_train=10, n_test=2,
                     eval_part=False)
    run = ["--year", "2026", "--system", "ae", "--machine", "fan", "--data-root",
           tmp_path / "data", "--out", tmp_path / "runs", "--cache-dir", tmp_path / "c"]
    assert asd.main(["train", *run, "--quick", "--channel", "both"]) == 0
    assert asd.main(["test", *run]) == 0
    state = torch.load(tmp_path / "runs/dcase2026/ae/dev/models/fan/model.pt",
                       weights_only=False)["state"]["model"]
    assert {tuple(w.shape) for w in state.values()} >= {(128, 1280), (1280, 128)}


def test_the_far_channel_is_harder_to_detect_with(tmp_path):
    """The 'tone' anomaly (3-5 kHz) scored by the clip's energy above 2.5 kHz: the near
    channel separates the clips, the far one (low-passed, under more noise) much less."""
    tmp = tmp_path
    synth.synthesize(tmp, year=2026, machines=["fan"], n_train=0, n_test=10, eval_part=False,
                     anomalies=["tone"])
    clips = data.list_clips(data.part_dir(tmp, 2026, "dev"), year=2026, machine="fan",
                            split="test")
    labels = [c.label == "anomaly" for c in clips]
    auc = {}
    for channel in ("near", "far"):
        with features.reading(channels=2, channel=channel):
            waves = [features.load_wav(c.path) for c in clips]
        high = [np.log(np.sum(np.abs(np.fft.rfft(w))[len(w) * 2500 // 16000:] ** 2))
                for w in waves]
        auc[channel] = roc_auc_score(labels, high)
    assert auc["near"] >= 0.95 and auc["far"] <= auc["near"] - 0.2, auc


# --------------------------------------------------------------------------------------------
# The whole year through asd.main, and the official score checked independently

def independent_2026_score(results, truth_of):
    """The 2026 rule from the CSVs alone: per machine type and section, AUC over each domain's
    normals and every anomaly, pAUC (max FPR 0.1) over all; the harmonic mean of them all."""
    figures = []
    for path in sorted(Path(results).glob("anomaly_score_*.csv")):
        rows = [line.split(",") for line in path.read_text().splitlines()]
        truth = [truth_of(path, name) for name, _ in rows]        # (label 0/1, domain 0/1)
        y = np.array([t[0] for t in truth])
        d = np.array([t[1] for t in truth])
        s = np.array([float(v) for _, v in rows])
        figures += [roc_auc_score(y[(d == k) | (y == 1)], s[(d == k) | (y == 1)])
                    for k in (0, 1)]
        figures.append(roc_auc_score(y, s, max_fpr=0.1))
    return float(hmean(figures))


def dev_truth(path, name):
    clip = data.parse_name(Path(name), year=2026, machine="m", split="test")
    return int(clip.label == "anomaly"), int(clip.domain == "target")


def eval_truth(gt):
    def truth(path, name):
        machine = path.name[len("anomaly_score_"):-len("_section_00_test.csv")]
        stem = f"ground_truth_{machine}_section_00_test.csv"
        tables = [dict(line.split(",") for line in (gt / folder / stem).read_text().split())
                  for folder in ("ground_truth_data", "ground_truth_domain")]
        return int(tables[0][name]), int(tables[1][name])
    return truth


def test_2026_end_to_end_through_main(tmp_path):
    synth.synthesize(tmp_path / "data", year=2026, machines=["fan", "Sander"], n_train=12,
                     n_test=4)
    common = ["--year", "2026", "--system", "ae", "--data-root", tmp_path / "data",
              "--out", tmp_path / "runs"]
    for part, machine in (("dev", "fan"), ("eval", "Sander")):
        run = [*common, "--part", part, "--machine", machine, "--cache-dir", tmp_path / "c"]
        assert asd.main(["train", *run, "--quick", "--device", "cpu"]) == 0
        assert asd.main(["test", *run, "--channel", "far"]) == 2    # the model read near
        assert asd.main(["test", *run]) == 0
        assert asd.main(["evaluate", *common, "--part", part]) == 0
    runs = tmp_path / "runs/dcase2026/ae"
    assert json.loads((runs / "dev/models/fan/args.json").read_text())["channel"] == "near"
    for part, truth in (("dev", dev_truth),
                        ("eval", eval_truth(data.part_dir(tmp_path / "data", 2026, "eval")))):
        ours = json.loads((runs / part / "results.json").read_text())["official_score"]
        assert ours == pytest.approx(independent_2026_score(runs / part / "results", truth),
                                     abs=1e-12)
    assert "AE-MSE: auc_source 66.06" in (runs / "eval/results.md").read_text()
    assert asd.main(["package", "--year", "2026", "--system", "ae", "--out", tmp_path / "runs",
                     "--dest", tmp_path / "sub", "--label", "Smith_UniA_task2_2"]) == 0
    folder = tmp_path / "sub/dcase2026/ae/teams/Smith_UniA/Smith_UniA_task2_2"
    plain = [f"{kind}_Sander_section_00_test.csv" for kind in submission.RESULT_KINDS]
    baseline = [submission.baseline_name(2026, n) for n in plain]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        plain + baseline + ["Smith_UniA_task2_2.meta.yaml"])
    for name, other in zip(plain, baseline):       # the two forms hold the same rows
        assert (folder / name).read_bytes() == (folder / other).read_bytes()
    meta = (folder / "Smith_UniA_task2_2.meta.yaml").read_text()
    assert 'input_channel: "near"' in meta and "official_score:" in meta


def test_download_picks_2026s_archives_by_machine_type():
    """dev_ToyCar_r2.zip replaced dev_ToyCar.zip (2026-04-09); ToyCar is not ToyCarEmu."""
    import download
    files = [{"key": k, "size": 1, "md5": "0", "url": k} for k in (
        "dev_ToyCar.zip", "dev_ToyCar_r2.zip", "dev_ToyCarEmu.zip", "dev_fan.zip")]
    assert [f["key"] for f in download.archives_of(files, "ToyCar")] == ["dev_ToyCar_r2.zip"]
    assert [f["key"] for f in download.archives_of(files, "ToyCarEmu")] == ["dev_ToyCarEmu.zip"]
