"""The year table, file-name parsing for every year's patterns, clip listing, the organisers'
ground-truth tables, the synthetic data sets; and the real clips of ../shared/data."""
import collections
import json
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import data
import synth

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("year, path, expected", [
    (2020, "dev_data/valve/train/normal_id_04_00000123.wav",
     dict(machine="valve", section="04", domain=None, split="train", label="normal")),
    (2020, "dev_data/ToyCar/test/anomaly_id_01_00000007.wav",
     dict(machine="ToyCar", section="01", split="test", label="anomaly")),
    (2020, "eval_data/fan/test/id_05_00000000.wav",
     dict(machine="fan", section="05", split="test", label="unknown")),
    (2021, "dev_data/gearbox/train/section_01_target_train_normal_0002_volt_1.0.wav",
     dict(section="01", domain="target", split="train", attributes="volt_1.0")),
    (2021, "dev_data/fan/source_test/section_02_source_test_anomaly_0099.wav",
     dict(domain="source", split="test", label="anomaly", attributes="")),
    (2021, "eval_data/fan/target_test/section_04_0013.wav",
     dict(section="04", domain="target", split="test", label="unknown")),
    (2022, "dev_data/bearing/test/section_02_target_test_normal_0049_vel_8_loc_G.wav",
     dict(machine="bearing", domain="target", label="normal", attributes="vel_8_loc_G")),
    (2022, "eval_data/valve/test/section_05_0199.wav",
     dict(section="05", domain=None, label="unknown", index="0199")),
    (2024, "dev_data/slider/train/section_00_source_train_normal_0001_noAttribute.wav",
     dict(attributes="noAttribute", domain="source")),
    (2025, "dev_data/fan/supplemental/section_00_source_supplemental_normal_0003_m-n_X.wav",
     dict(split="supplemental", label="normal", attributes="m-n_X")),
])
def test_parse_every_years_patterns(year, path, expected):
    clip = data.parse_name(Path(path), year=year)
    for key, value in expected.items():
        assert getattr(clip, key) == value, (key, clip)


@pytest.mark.parametrize("year, name", [
    (2020, "section_00_source_train_normal_0000.wav"),   # a 2021+ name in a 2020 set
    (2022, "normal_id_00_00000000.wav"),                 # a 2020 name in a 2022 set
    (2023, "section_00_source_train_broken_0000.wav"),
    (2023, "notes.wav"),
])
def test_unknown_names_raise_with_file_and_pattern(year, name):
    with pytest.raises(data.DataError, match=rf"{name}.*expected .*section_|{name}.*expected .*id_"):
        data.parse_name(Path("dev_data/fan/train") / name, year=year)


def test_year_table_rejects_unknown_year_and_machine():
    with pytest.raises(data.DataError, match="valid: 2020, 2021"):
        data.get_year(2019)
    with pytest.raises(data.DataError, match="unknown machine 'toaster'.*valid:.*valve"):
        data.get_year(2020).sections("toaster", "dev")
    assert data.get_year(2020).sections("ToyConveyor", "eval") == ("04", "05", "06")
    assert data.get_year(2023).sections("Vacuum", "eval") == ("00",)


def test_list_clips_errors_name_the_folder(tmp_path):
    with pytest.raises(data.DataError, match=r"fan/train: folder not found"):
        data.list_clips(tmp_path, year=2022, machine="fan", split="train")
    (tmp_path / "fan" / "train").mkdir(parents=True)
    with pytest.raises(data.DataError, match=r"fan/train: no \*\.wav"):
        data.list_clips(tmp_path, year=2022, machine="fan", split="train")


@pytest.mark.parametrize("year", range(2020, 2026))
def test_synthetic_sets_have_each_years_layout(tmp_path, year):
    n = synth.synthesize(tmp_path, year=year, n_train=10, n_test=2)
    spec = data.get_year(year)
    machine = synth.default_machines(year)[0]
    train = data.list_clips(data.part_dir(tmp_path, year, "dev"), year=year, machine=machine,
                            split="train")
    test = data.list_clips(data.part_dir(tmp_path, year, "dev"), year=year, machine=machine,
                           split="test")
    assert n > 0 and {c.section for c in train} <= set(spec.dev[machine])
    counts = collections.Counter((c.domain, c.label) for c in test)
    if year == 2020:
        assert counts == {(None, "normal"): 8, (None, "anomaly"): 8}     # 2 IDs x 4
    else:
        n_sections = min(2, len(spec.dev[machine]))               # synth writes at most 2
        assert set(counts.values()) == {2 * n_sections} and len(counts) == 4
        assert collections.Counter(c.domain for c in train) == {"source": 9 * n_sections,
                                                                 "target": 1 * n_sections}
    if machine in spec.no_attribute:
        assert {c.attributes for c in train} == {"noAttribute"}


def test_synthetic_eval_set_is_anonymised_and_labelled_by_ground_truth(tmp_path):
    synth.synthesize(tmp_path, year=2022, machines=["fan"], n_train=4, n_test=3)
    folder = data.part_dir(tmp_path, 2022, "eval")
    clips = data.list_clips(folder, year=2022, machine="fan", split="test")
    assert all(c.label == "unknown" and c.name.count("_") == 2 for c in clips)
    labelled = data.label_eval_clips(clips, folder)
    assert collections.Counter((c.section, c.domain, c.label) for c in labelled) == {
        (s, d, lab): 3 for s in ("03", "04") for d in data.DOMAINS for lab in ("normal", "anomaly")}


def test_synthesis_is_deterministic(tmp_path):
    synth.synthesize(tmp_path / "a", year=2023, machines=["valve"], n_train=2, n_test=1, seed=3)
    synth.synthesize(tmp_path / "b", year=2023, machines=["valve"], n_train=2, n_test=1, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                         for f in files)


def test_synth_command_writes_the_sections_and_anomaly_kinds_asked_for(tmp_path, capsys):
    """`asd.py synth --sections 3 --anomalies tone`: three sections, and every anomalous clip
    carries a 3-5 kHz tone (its band holds far more energy than in any normal clip)."""
    import asd
    import features
    assert asd.main(["synth", "--year", 2021, "--out", tmp_path, "--machines", "valve",
                     "--n-train", 2, "--n-test", 3, "--sections", 3, "--anomalies", "tone"]) == 0
    clips = data.list_clips(data.part_dir(tmp_path, 2021, "dev"), year=2021, machine="valve",
                            split="test")
    assert sorted({c.section for c in clips}) == ["00", "01", "02"]

    def band_share(path):                      # share of the energy between 3 and 5 kHz
        power = np.abs(np.fft.rfft(features.load_wav(path))) ** 2
        hz = np.fft.rfftfreq(2 * (len(power) - 1), 1 / synth.SR)
        return power[(hz > 3000) & (hz < 5000)].sum() / power.sum()
    share = {label: [band_share(c.path) for c in clips if c.label == label]
             for label in ("normal", "anomaly")}
    assert min(share["anomaly"]) > 10 * max(share["normal"]), share
    for bad in (["--anomalies", "hum"], ["--anomalies", ""], ["--sections", 0]):
        assert asd.main(["synth", "--year", 2021, "--out", tmp_path / "x", *bad]) == 2
        assert "anomalies must be some of tone, impulses, harmonic" in capsys.readouterr().err


def test_missing_ground_truth_row_names_the_clip(tmp_path):
    synth.synthesize(tmp_path, year=2024, machines=["3DPrinter"], n_train=2, n_test=1)
    folder = data.part_dir(tmp_path, 2024, "eval")
    table = folder / "ground_truth_data" / "ground_truth_3DPrinter_section_00_test.csv"
    table.write_text("".join(table.read_text().splitlines(keepends=True)[1:]))
    clips = data.list_clips(folder, year=2024, machine="3DPrinter", split="test")
    with pytest.raises(data.DataError, match="section_00_0000.wav: no row"):
        data.label_eval_clips(clips, folder)


# The real recordings of ../shared/data (absent in a clone without shared/: skipped, said why)
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


@needs_shared
def test_real_2023_dev_clips_parse_to_their_official_labels():
    root = SHARED / "dcase2023_dev_sample"
    seen = collections.Counter()
    for machine in data.get_year(2023).dev:
        for split in ("train", "test"):
            for clip in data.list_clips(root, year=2023, machine=machine, split=split):
                parts = clip.name.split("_")          # section_00_<domain>_<split>_<label>_...
                assert (clip.machine, clip.section, clip.domain, clip.split, clip.label) == (
                    machine, "00", parts[2], parts[3], parts[4])
                assert clip.attributes and clip.name.endswith(clip.attributes + ".wav")
                seen[clip.label] += 1
    assert seen == {"normal": 23, "anomaly": 5}


@needs_shared
def test_real_2024_roboticarm_eval_clips_labelled_by_the_organisers_tables():
    root = SHARED / "dcase2024_eval_roboticarm_sample"
    train = data.list_clips(root, year=2024, machine="RoboticArm", split="train")
    assert len(train) == 39 and all(c.label == "normal" and c.domain == "source" for c in train)
    assert all(c.attributes.startswith("weight") for c in train)
    test = data.label_eval_clips(
        data.list_clips(root, year=2024, machine="RoboticArm", split="test"), root)
    assert collections.Counter((c.domain, c.label) for c in test) == {
        ("source", "normal"): 15, ("source", "anomaly"): 12,
        ("target", "normal"): 14, ("target", "anomaly"): 16}
    first = next(c for c in test if c.name == "section_00_0000.wav")
    assert (first.domain, first.label, first.attributes) == ("source", "normal", "weight15_BckgF")


def _hold_lock(path, ready, release):
    """In a child process: hold data.lock on `path` until `release` is set."""
    with data.lock(path, what="model x", wait=False):
        ready.set()
        release.wait(10)


def test_lock_refuses_or_waits_while_another_process_holds_it_and_dies_with_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "x.lock"
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_lock, args=(path, ready, release))
    child.start()
    assert ready.wait(10)
    with pytest.raises(data.Busy, match=rf"another run \(pid {child.pid}, started .*\) is "
                                        r"building model x; wait for it or stop it"):
        with data.lock(path, what="model x", wait=False):
            pass
    lines = []
    threading.Timer(0.3, release.set).start()      # the holder lets go soon
    with data.lock(path, what="model x", wait=True, log=lines.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and f"pid {child.pid}" in lines[0]
    assert not path.exists()                       # removed on release
    child.join(10)
    killed = ctx.Process(target=_hold_lock, args=(path, ready, ctx.Event()))
    ready.clear()
    killed.start()
    assert ready.wait(10)
    killed.kill()
    killed.join(10)                                # the kernel frees a dead holder's lock
    with data.lock(path, what="model x", wait=False):
        pass


def test_held_out_clips_of_a_folder_are_the_same_whatever_else_trains(tmp_path):
    """A machine type's run and a run whose pool adds other folders hold out the same clips of
    it: a shared model never trains on a clip another run fits its threshold to."""
    synth.synthesize(tmp_path, year=2022, machines=["valve", "fan"], n_train=12, n_test=1)
    listed = {(part, m): data.list_clips(data.part_dir(tmp_path, 2022, part), year=2022,
                                         machine=m, split="train")
              for part in ("dev", "eval") for m in ("valve", "fan")}
    _, alone = data.split_held_out(listed["dev", "valve"], 0.1, seed=0)
    fit, held = data.split_held_out([c for v in listed.values() for c in v], 0.1, seed=0)
    assert len(alone) >= 2 and set(alone) <= set(held) and not set(fit) & set(held)
    assert {c.path.parent for c in held} == {v[0].path.parent for v in listed.values()}
    assert set(data.split_held_out(listed["dev", "valve"], 0.1, seed=1)[1]) != set(alone)
    assert data.clip_groups(alone) == [{"machine": "valve", "part": "dev", "section": s,
                                        "clips": sum(c.section == s for c in alone)}
                                       for s in sorted({c.section for c in alone})]
