"""The organisers' ground truth of the anonymised evaluation clips in each year's format (2020
eval_data_list.csv, 2021 one table per domain, 2022+ label/domain/attribute tables), the
synthetic sets that write them, `evaluate --part eval` reading them (and naming the file it
lacks), and the results table beside the baseline's published figures."""
import collections
import csv

import numpy as np
import pytest

import asd
import data
import results
import scoring
import submission
import synth
import systems

# The 2020 format, as y-kawagu/dcase2020_task2_evaluator reads it: a machine type line, then
# rows whose last column is the label (its Y_TRUE_COL = 2)
EVAL_DATA_LIST = """fan
id_01_00000000.wav,normal_id_01_00000000.wav,0
id_01_00000001.wav,anomaly_id_01_00000000.wav,1
id_03_00000000.wav,anomaly_id_03_00000000.wav,1
pump
id_01_00000000.wav,normal_id_01_00000000.wav,0
"""


def test_2020_eval_data_list_is_read_per_machine_type_and_id(tmp_path):
    (tmp_path / "eval_data_list.csv").write_text(EVAL_DATA_LIST)
    fan_01 = data.read_ground_truth(tmp_path, machine="fan", section="01", year=2020)
    assert fan_01 == {"id_01_00000000.wav": ("normal", None, ""),
                      "id_01_00000001.wav": ("anomaly", None, "")}
    assert data.read_ground_truth(tmp_path / "eval_data_list.csv", machine="pump", section="01",
                                  year=2020) == {"id_01_00000000.wav": ("normal", None, "")}
    with pytest.raises(data.DataError, match="no block for machine type 'valve'; found: fan, pump"):
        data.read_ground_truth(tmp_path, machine="valve", section="01", year=2020)
    (tmp_path / "eval_data_list.csv").write_text("id_01_00000000.wav,x,0\n")
    with pytest.raises(data.DataError, match=r"eval_data_list.csv:1: expected a machine type"):
        data.read_ground_truth(tmp_path, machine="fan", section="01", year=2020)


@pytest.mark.parametrize("year", [2020, 2021, 2022, 2025])
def test_synthetic_eval_sets_are_labelled_by_their_years_ground_truth(tmp_path, year):
    machine = [m for m in data.get_year(year).eval][0]
    synth.synthesize(tmp_path, year=year, machines=[machine], n_train=2, n_test=2)
    folder = data.part_dir(tmp_path, year, "eval")
    clips = data.list_clips(folder, year=year, machine=machine, split="test")
    assert all(c.label == "unknown" for c in clips)
    labelled = data.label_eval_clips(clips, folder)
    counts = collections.Counter((c.domain, c.label) for c in labelled)
    n_sections = len({c.section for c in clips})
    if year == 2020:
        assert counts == {(None, "normal"): 4 * n_sections, (None, "anomaly"): 4 * n_sections}
        assert clips[0].name == "id_01_00000000.wav"
    else:
        assert set(counts.values()) == {2 * n_sections} and len(counts) == 4
    if year == 2021:
        assert clips[0].name == "section_03_source_test_0000.wav"
        assert sorted(p.name for p in (folder / "ground_truth_data").iterdir())[:2] == [
            f"ground_truth_{machine}_section_03_source_test.csv",
            f"ground_truth_{machine}_section_03_target_test.csv"]


def write_results(tmp_path, year, machine, scorer):
    """Result CSVs as `test` writes them, scored by scorer(clip) from the true labels."""
    folder = data.part_dir(tmp_path / "data", year, "eval")
    clips = data.label_eval_clips(
        data.list_clips(folder, year=year, machine=machine, split="test"), folder)
    results = tmp_path / f"runs/dcase{year}/ae/eval/results"
    results.mkdir(parents=True)
    groups = collections.defaultdict(list)
    for c in clips:
        groups[(c.section, c.domain if year == 2021 else None)].append(c)
    for (section, domain), group in groups.items():
        for kind, value in (("anomaly_score", scorer), ("decision_result", lambda c: 1)):
            name = submission.result_filename(year, kind, machine, section, domain)
            submission.write_csv(results / name, [(c.name, value(c)) for c in group])
    return clips


@pytest.mark.parametrize("year", [2020, 2021, 2023])
def test_evaluate_eval_part_with_each_years_ground_truth(tmp_path, year, capsys):
    machine = [m for m in data.get_year(year).eval][0]
    synth.synthesize(tmp_path / "data", year=year, machines=[machine], n_train=2, n_test=3)
    rng = np.random.default_rng(0)
    clips = write_results(tmp_path, year, machine,
                          lambda c: float(rng.random() + 0.6 * (c.label == "anomaly")))
    run = ["--year", year, "--system", "ae", "--part", "eval", "--data-root", tmp_path / "data",
           "--out", tmp_path / "runs"]
    assert asd.main(["evaluate", *run]) == 0
    out = tmp_path / f"runs/dcase{year}/ae/eval"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert table[-1]["machine"] == "official score" and float(table[-1]["score"]) > 0.5
    assert "| official score |" in (out / "results.md").read_text()
    n_rows = len({(c.section, c.domain) for c in clips}) if year == 2021 else len(
        {c.section for c in clips})
    assert len(table) == n_rows + 2                           # sections, machine, official


@pytest.mark.parametrize("year, missing", [
    (2020, "eval_data_list.csv"),
    (2021, "ground_truth_data/ground_truth_{m}_section_03_target_test.csv"),
    (2022, "ground_truth_domain/ground_truth_{m}_section_03_test.csv"),
])
def test_evaluate_names_the_ground_truth_file_it_lacks(tmp_path, year, missing, capsys):
    machine = [m for m in data.get_year(year).eval][0]
    synth.synthesize(tmp_path / "data", year=year, machines=[machine], n_train=2, n_test=1)
    write_results(tmp_path, year, machine, lambda c: 0.5 + (c.label == "anomaly"))
    lacking = data.part_dir(tmp_path / "data", year, "eval") / missing.format(m=machine)
    lacking.unlink()
    assert asd.main(["evaluate", "--year", year, "--system", "ae", "--part", "eval",
                     "--data-root", tmp_path / "data", "--out", tmp_path / "runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(lacking) in err and "\n" not in err


def test_results_table_sets_the_published_baseline_beside_ours():
    rows = [{"machine": m, "section": s, "label": i % 2, "score": i % 2 + 0.1 * (i % 5)}
            for m in ("valve", "ToyCar") for s in (("00", "02") if m == "valve" else ("01",))
            for i in range(10)]
    header, table = results.comparison_rows(scoring.official_score(2020, rows))
    assert header == ["machine", "section", "domain", "auc", "pauc", "score", "baseline_auc",
                      "baseline_pauc", "baseline_score"]
    by_key = {(r[0], r[1]): dict(zip(header, r)) for r in table}
    assert by_key[("valve", "02")]["baseline_auc"] == 0.674083      # the README's id 2
    assert by_key[("ToyCar", "01")]["baseline_pauc"] == 0.678514
    assert by_key[("valve", "all")]["baseline_auc"] == pytest.approx((0.687311 + 0.674083) / 2)
    assert by_key[("official score", "")]["baseline_score"] == pytest.approx(np.mean(
        [0.687311, 0.51349, 0.674083, 0.512281, 0.828474, 0.678514]))
    rows_2023 = [dict(r, domain="source" if r["score"] < 0.3 else "target") for r in rows]
    _, table = results.comparison_rows(scoring.official_score(2023, rows_2023))
    assert all(v is None for r in table for v in r[-4:])       # no published 2023 figures


def test_results_table_sets_each_papers_figures_beside_the_baselines():
    """PAPER_DEV, read from the system files without importing them: per section figures
    (Shinmura's valve IDs), per machine type figures only (Cai's Omega), and where none."""
    rows = [{"machine": "valve", "section": s, "label": i % 2, "score": i % 2 + 0.1 * (i % 5)}
            for s in ("00", "02") for i in range(10)]
    result = scoring.official_score(2020, rows)
    shinmura = systems.paper_figures("shinmura2020")
    header, table = results.comparison_rows(result, paper=shinmura)
    assert header[-6:] == ["baseline_auc", "baseline_pauc", "baseline_score",
                           "paper_auc", "paper_pauc", "paper_score"]
    by_key = {(r[0], r[1]): dict(zip(header, r)) for r in table}
    assert by_key[("valve", "00")]["paper_auc"] == 0.996 and by_key[("valve", "02")]["paper_auc"] == 0.999
    assert by_key[("valve", "all")]["paper_auc"] == pytest.approx(0.9975)
    assert by_key[("valve", "all")]["paper_pauc"] is None                 # table 1 has no pAUC
    assert by_key[("official score", "")]["paper_score"] is None
    entry = results.paper_entry(result, shinmura)
    assert entry["sections"][0] == {"auc": 0.996} and entry["source"].startswith("Shinmura")
    rows_2021 = [dict(r, machine=m, domain=d) for m in ("fan", "valve") for d in ("source", "target")
                 for r in rows]
    cai = results.paper_entry(scoring.official_score(2021, rows_2021), systems.paper_figures("cai2021"))
    assert cai["machines"]["fan"] == {"score": 0.6445} and cai["sections"] == [None] * 8
    assert cai["official_score"] is None              # Omega over 7 machine types, we have 2
    assert systems.paper_figures("ae") is None


# Each README's per machine type means ("Average" 2020, "harmonic mean" 2021-2022)
README_MEANS = {2020: {"ToyCar": (0.800914, 0.672218), "ToyConveyor": (0.726835, 0.606582),
                       "fan": (0.651585, 0.52591), "pump": (0.72591, 0.600019),
                       "slider": (0.849916, 0.669254), "valve": (0.664557, 0.506004)},
                2021: {"fan": (0.631866714, 0.531826049), "valve": (0.537267925, 0.505885378)},
                2022: {"fan": (0.7852, 0.5068, 0.5741), "valve": (0.5196, 0.4961, 0.5054)}}


@pytest.mark.parametrize("year", sorted(README_MEANS))
def test_baseline_figures_agree_with_the_readmes_machine_means(year):
    """The section figures held in BASELINE_DEV give back each README's machine means: a check
    of the transcription (2022's README rounds to 4 digits)."""
    for machine, means in README_MEANS[year].items():
        figures = [v for k, v in results.BASELINE_DEV[year].items() if k[0] == machine]
        cols = list(zip(*figures))
        got = ([np.mean(c) for c in cols] if year == 2020
               else [len(c) / sum(1 / v for v in c) for c in cols])
        assert got == pytest.approx(means, abs=1e-6 if year < 2022 else 1.5e-4), machine
