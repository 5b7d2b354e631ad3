"""scoring.py against trusted references: sklearn for AUC, pAUC and precision/recall/F1,
scipy.stats for the harmonic mean and the gamma fit, and subsets picked by hand for the
per-year rules of the official score."""
import json
import os
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score, roc_curve

import scoring
import submission
from scoring import ScoringError

AUC_ATOL = 1e-12  # hand-written ROC metrics vs sklearn
GAMMA_RTOL = 1e-5  # gamma threshold vs scipy.stats.gamma.fit(floc=...) + ppf
MAX_FPRS = (0.05, 0.1, 0.3, 1.0)
EPS = np.finfo(float).eps


def _assert_matches_sklearn(y, s):
    assert abs(scoring.roc_auc(y, s) - roc_auc_score(y, s)) < AUC_ATOL
    for max_fpr in MAX_FPRS:
        ours = scoring.partial_auc(y, s, max_fpr=max_fpr)
        assert abs(ours - roc_auc_score(y, s, max_fpr=max_fpr)) < AUC_ATOL, (max_fpr, y, s)


# ---------------------------------------------------------------------------------------
# AUC and pAUC

def test_auc_matches_sklearn_on_random_sets():
    rng = np.random.default_rng(0)
    for n in list(range(2, 40)) + list(rng.integers(40, 201, size=60)):
        y = rng.integers(0, 2, size=n)
        y[:2] = (0, 1)  # both classes present
        rng.shuffle(y)
        s = rng.normal(size=n) + 0.7 * y
        _assert_matches_sklearn(y, s)
        _assert_matches_sklearn(y, np.round(s, 1))  # some ties


def test_auc_matches_sklearn_on_heavy_ties():
    rng = np.random.default_rng(1)
    for n in (2, 3, 5, 10, 50, 200):
        for _ in range(20):
            y = rng.integers(0, 2, size=n)
            y[:2] = (0, 1)
            s = rng.integers(0, 4, size=n).astype(float)
            _assert_matches_sklearn(y, s)


def test_auc_all_tied_and_tiny_sets():
    _assert_matches_sklearn([0, 1, 0, 1, 1], [0.3] * 5)
    assert scoring.roc_auc([0, 1, 0, 1, 1], [0.3] * 5) == 0.5
    for s in ([0.0, 1.0], [1.0, 0.0], [0.5, 0.5]):
        _assert_matches_sklearn([0, 1], s)
        _assert_matches_sklearn([1, 0], s)
    assert scoring.roc_auc([0, 1], [0.0, 1.0]) == 1.0
    assert scoring.partial_auc([0, 1], [1.0, 0.0]) == pytest.approx(
        0.5 * (1 - 0.005 / 0.095))  # area 0 after McClish


def test_roc_points_are_sklearns_roc_curve():
    rng = np.random.default_rng(2)
    for n in (2, 3, 7, 40, 200):
        for decimals in (None, 1, 0):                    # no ties, some, many
            y = rng.integers(0, 2, size=n)
            y[:2] = (0, 1)
            s = rng.normal(size=n) + 0.8 * y
            s = s if decimals is None else np.round(s, decimals)
            fpr, tpr = scoring.roc_points(y, s)
            ref_fpr, ref_tpr, _ = roc_curve(y, s)
            np.testing.assert_array_equal(fpr, ref_fpr)
            np.testing.assert_array_equal(tpr, ref_tpr)


@pytest.mark.parametrize("y, s", [([0, 0, 0], [0.1, 0.2, 0.3]), ([1, 1], [0.1, 0.2])])
def test_one_class_raises(y, s):
    with pytest.raises(ScoringError, match="both"):
        scoring.roc_auc(y, s)
    with pytest.raises(ScoringError, match="both"):
        scoring.partial_auc(y, s)


def test_bad_inputs_raise():
    with pytest.raises(ScoringError, match="NaN"):
        scoring.roc_auc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ScoringError, match="3 labels but 2 scores"):
        scoring.roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ScoringError, match="max_fpr"):
        scoring.partial_auc([0, 1], [0.1, 0.2], max_fpr=0.0)
    with pytest.raises(ScoringError, match="labels must be"):
        scoring.roc_auc([0, 2], [0.1, 0.2])


# ---------------------------------------------------------------------------------------
# Official score, per year

def _rows(machine, section, domain, labels, scores, decisions=None):
    out = []
    for i, (label, score) in enumerate(zip(labels, scores)):
        row = {"machine": machine, "section": section, "domain": domain,
               "label": label, "score": score}
        if decisions is not None:
            row["decision"] = decisions[i]
        out.append(row)
    return out


def _two_domain_section(machine, section, seed):
    """Source normals low, target normals high, anomalies of the two domains in between, so
    that the 2022 rule, a per-domain AUC and a pooled AUC all differ."""
    rng = np.random.default_rng(seed)
    parts = {("source", 0): rng.normal(0.0, 1.0, 12), ("target", 0): rng.normal(1.5, 1.0, 9),
             ("source", 1): rng.normal(0.8, 1.0, 5), ("target", 1): rng.normal(2.5, 1.0, 7)}
    rows = []
    for (domain, label), scores in parts.items():
        rows += _rows(machine, section, domain, [label] * scores.size, scores.tolist())
    return parts, rows


def test_official_2022_rule_source_normals_plus_all_anomalies():
    parts, rows = _two_domain_section("fan", "00", seed=3)
    parts2, rows2 = _two_domain_section("fan", "01", seed=4)
    parts3, rows3 = _two_domain_section("valve", "00", seed=5)
    expected = []
    for p in (parts, parts2, parts3):
        anomalies = np.r_[p["source", 1], p["target", 1]]
        figures = {}
        for d in ("source", "target"):
            s = np.r_[p[d, 0], anomalies]
            y = np.r_[np.zeros(p[d, 0].size), np.ones(anomalies.size)]
            figures[d] = roc_auc_score(y, s)
        s_all = np.r_[p["source", 0], p["target", 0], anomalies]
        y_all = np.r_[np.zeros(p["source", 0].size + p["target", 0].size), np.ones(anomalies.size)]
        figures["pauc"] = roc_auc_score(y_all, s_all, max_fpr=0.1)
        figures["pooled"] = roc_auc_score(y_all, s_all)
        s_dom = np.r_[p["source", 0], p["source", 1]]
        y_dom = np.r_[np.zeros(p["source", 0].size), np.ones(p["source", 1].size)]
        figures["naive_source"] = roc_auc_score(y_dom, s_dom)
        expected.append(figures)
    # the example must tell the three rules apart, else the test proves nothing
    assert abs(expected[0]["source"] - expected[0]["naive_source"]) > 0.05
    assert abs(expected[0]["source"] - expected[0]["pooled"]) > 0.05

    for year in (2022, 2023, 2024, 2025):
        result = scoring.official_score(year, rows + rows2 + rows3)
        got = result["sections"]
        assert [(r["machine"], r["section"], r["domain"]) for r in got] == [
            ("fan", "00", None), ("fan", "01", None), ("valve", "00", None)]
        for r, e in zip(got, expected):
            assert r["auc_source"] == pytest.approx(e["source"], abs=AUC_ATOL)
            assert r["auc_target"] == pytest.approx(e["target"], abs=AUC_ATOL)
            assert r["pauc"] == pytest.approx(e["pauc"], abs=AUC_ATOL)
            assert r["auc"] == pytest.approx(e["pooled"], abs=AUC_ATOL)
        all_figures = [e[k] for e in expected for k in ("source", "target", "pauc")]
        assert result["official_score"] == pytest.approx(scipy.stats.hmean(all_figures), rel=1e-12)
        fan = [e[k] for e in expected[:2] for k in ("source", "target", "pauc")]
        assert result["machines"]["fan"]["score"] == pytest.approx(scipy.stats.hmean(fan))
        assert result["machines"]["fan"]["auc_source"] == pytest.approx(
            scipy.stats.hmean([expected[0]["source"], expected[1]["source"]]))
        assert result["machines"]["fan"]["mean_rule"] == "harmonic"
        json.dumps(result)  # plain Python types only


def test_official_2021_per_domain_auc():
    # target clips sit 5 higher than source clips: fine within a domain, bad when pooled
    parts = {("source", 0): [0.0, 1.0, 2.0, 3.0], ("source", 1): [2.5, 4.0],
             ("target", 0): [5.0, 6.0, 7.0, 8.0], ("target", 1): [7.5, 9.0]}
    rows = [r for (d, label), s in parts.items()
            for r in _rows("pump", "01", d, [label] * len(s), s)]
    result = scoring.official_score(2021, rows)
    figures = []
    for r, d in zip(result["sections"], ("source", "target")):
        assert (r["machine"], r["section"], r["domain"]) == ("pump", "01", d)
        y = [0] * len(parts[d, 0]) + [1] * len(parts[d, 1])
        s = parts[d, 0] + parts[d, 1]
        assert r["auc"] == pytest.approx(roc_auc_score(y, s), abs=AUC_ATOL)
        assert r["auc"] == pytest.approx(7 / 8)
        assert r["pauc"] == pytest.approx(roc_auc_score(y, s, max_fpr=0.1), abs=AUC_ATOL)
        assert (r["n_normal"], r["n_anomaly"]) == (4, 2)
        figures += [r["auc"], r["pauc"]]
    pooled = roc_auc_score([row["label"] for row in rows], [row["score"] for row in rows])
    assert pooled == pytest.approx(22 / 32)  # what a pooled rule would have given
    assert result["official_score"] == pytest.approx(scipy.stats.hmean(figures), rel=1e-12)
    assert result["machines"]["pump"]["auc"] == pytest.approx(
        scipy.stats.hmean([r["auc"] for r in result["sections"]]))


def test_official_2020_arithmetic_means():
    rng = np.random.default_rng(11)
    rows, per_id = [], {}
    for machine, ids in (("fan", ("00", "02", "04")), ("slider", ("00", "02"))):
        for mid in ids:
            y = np.r_[np.zeros(15), np.ones(6)].astype(int)
            s = rng.normal(size=21) + y * rng.uniform(0, 2)
            # the domain is ignored in 2020, even when present
            rows += _rows(machine, mid, "source", y.tolist(), s.tolist())
            per_id[machine, mid] = (roc_auc_score(y, s), roc_auc_score(y, s, max_fpr=0.1))
    result = scoring.official_score(2020, rows)
    assert len(result["sections"]) == 5
    fan = [v for k, v in per_id.items() if k[0] == "fan"]
    assert result["machines"]["fan"]["auc"] == pytest.approx(np.mean([a for a, _ in fan]))
    assert result["machines"]["fan"]["pauc"] == pytest.approx(np.mean([p for _, p in fan]))
    assert result["machines"]["fan"]["mean_rule"] == "arithmetic"
    everything = [x for v in per_id.values() for x in v]
    assert result["official_score"] == pytest.approx(np.mean(everything), rel=1e-12)
    assert result["official_score"] != pytest.approx(scipy.stats.hmean(everything), rel=1e-6)


def test_eps_floor_keeps_zero_auc_finite():
    rows = _rows("fan", "00", "source", [0, 0, 1, 1], [0.9, 0.8, 0.1, 0.2])
    rows += _rows("fan", "00", "target", [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a division by zero would warn
        result = scoring.official_score(2021, rows)
    figures = [x for r in result["sections"] for x in (r["auc"], r["pauc"])]
    assert figures[0] == 0.0
    expected = scipy.stats.hmean(np.maximum(figures, EPS))
    assert result["official_score"] == pytest.approx(expected, rel=1e-12)
    assert 0 < result["official_score"] < 1e-14


def test_unknown_year_and_missing_data():
    rows = _rows("fan", "00", "source", [0, 1], [0.1, 0.2])
    with pytest.raises(ScoringError, match="2020, 2021, 2022, 2023, 2024, 2025"):
        scoring.official_score(2019, rows)
    with pytest.raises(ScoringError, match="machine fan section 00: no source anomalous "
                                           "clips; no target clips; AUC needs"):
        scoring.official_score(2021, _rows("fan", "00", "source", [0, 0], [0.1, 0.2]))
    with pytest.raises(ScoringError, match="machine fan section 00 has 2 normal and 0"):
        scoring.official_score(2023, _rows("fan", "00", "source", [0, 0], [0.1, 0.2]))
    with pytest.raises(ScoringError, match="machine fan id 00"):
        scoring.official_score(2020, _rows("fan", "00", None, [0, 0], [0.1, 0.2]))
    with pytest.raises(ScoringError, match="decision"):
        scoring.official_score(2020, rows + _rows("fan", "00", None, [1], [0.3], [1]))
    with pytest.raises(ScoringError, match="NaN"):
        scoring.official_score(2020, _rows("fan", "00", None, [0, 1], [0.1, float("nan")]))
    with pytest.raises(ScoringError, match="machine fan section 00: decisions must be 0 or 1"):
        scoring.official_score(2020, _rows("fan", "00", None, [0, 1], [0.1, 0.2], [0, 0.7]))


def test_precision_recall_f1_match_sklearn():
    y = [0, 0, 0, 1, 1, 1, 1, 0, 1, 0]
    d = [0, 1, 0, 1, 1, 0, 1, 1, 0, 0]
    p, r, f, _ = precision_recall_fscore_support(y, d, average="binary", pos_label=1)
    assert scoring.precision_recall_f1(y, d) == pytest.approx((p, r, f), abs=1e-12)
    assert scoring.precision_recall_f1([0, 0, 1], [0, 0, 0]) == (0.0, 0.0, 0.0)  # 0/0 -> 0

    rows = _rows("fan", "00", "source", y, np.linspace(0, 1, 10).tolist(), d)
    rows += _rows("fan", "00", "target", y[::-1], np.linspace(0, 1, 10).tolist(), d)
    result = scoring.official_score(2021, rows)
    p2, r2, f2, _ = precision_recall_fscore_support(y[::-1], d, average="binary")
    src, tgt = result["sections"]
    assert (src["precision"], src["recall"], src["f1"]) == pytest.approx((p, r, f))
    assert (tgt["precision"], tgt["recall"], tgt["f1"]) == pytest.approx((p2, r2, f2))
    sec = scoring.official_score(2024, rows)["sections"][0]
    assert (sec["precision_target"], sec["f1_source"]) == pytest.approx((p2, f))


def _source_only(seed):
    """Two sections of source clips only (the BLDC sample's form): 8 normal, 6 anomalous each."""
    rng = np.random.default_rng(seed)
    rows = []
    for section in ("00", "01"):
        y = np.r_[np.zeros(8, int), np.ones(6, int)]
        rows += _rows("fan", section, "source", y.tolist(), (rng.normal(size=14) + y).tolist(),
                      rng.integers(0, 2, size=14).tolist())
    return rows


@pytest.mark.parametrize("year", [2021, 2022, 2023, 2024, 2025])
def test_one_domain_gives_every_defined_figure_and_says_which_are_undefined(year):
    rows = _source_only(seed=year)
    result = scoring.official_score(year, rows)
    auc_key = "auc" if year == 2021 else "auc_source"
    source = [r for r in result["sections"] if r["domain"] in ("source", None)]
    for r in source:
        mine = [x for x in rows if x["section"] == r["section"]]
        y, s = [x["label"] for x in mine], [x["score"] for x in mine]
        assert r[auc_key] == pytest.approx(roc_auc_score(y, s), abs=AUC_ATOL)
        assert r["pauc"] == pytest.approx(roc_auc_score(y, s, max_fpr=0.1), abs=AUC_ATOL)
    fan = result["machines"]["fan"]
    if year == 2021:                           # the machine's AUC would need the target rows
        assert fan["auc"] is None
    else:
        assert fan["auc_source"] == pytest.approx(scipy.stats.hmean([r[auc_key] for r in source]))
    assert result["official_score"] is None and fan["score"] is None
    if year == 2021:                           # the target rows are there, every figure None
        target = [r for r in result["sections"] if r["domain"] == "target"]
        assert [(r["auc"], r["pauc"], r["f1"]) for r in target] == [(None, None, None)] * 2
    else:
        assert all(r["auc_target"] is None and r["f1_target"] is None for r in source)
        assert fan["pauc"] == pytest.approx(scipy.stats.hmean([r["pauc"] for r in source]))
    line = scoring.undefined_line(result)
    figures = "AUC and pAUC" if year == 2021 else "AUC target"
    assert line.startswith(f"undefined: {figures} of fan 00, fan 01 (no target clips). The "
                           f"official {year} score needs these figures of both domains"), line
    text = scoring.format_table(result)
    assert text.endswith("undefined") and "\n" not in line
    json.dumps(result)
    assert scoring.undefined_line(scoring.official_score(year, _two_domain_section(
        "fan", "00", seed=1)[1])) is None


@pytest.mark.parametrize("year", [2020, 2021, 2022, 2025])
def test_figure_subsets_are_the_clips_each_official_figure_takes(year):
    _, rows = _two_domain_section("fan", "00", seed=7)
    (section, *_) = scoring.official_score(year, rows)["sections"]
    y = np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows])
    subsets = scoring.figure_subsets(year, y, [r["domain"] for r in rows])
    assert len(subsets) == {2020: 1, 2021: 2}.get(year, 3)
    rows_of = {r["domain"]: r for r in scoring.official_score(year, rows)["sections"]}
    for name, mask, keys in subsets:
        row = rows_of.get(name, section)
        for key in keys:
            ref = (roc_auc_score(y[mask], s[mask], max_fpr=0.1) if key == "pauc"
                   else roc_auc_score(y[mask], s[mask]))
            assert row[key] == pytest.approx(ref, abs=AUC_ATOL), (name, key)


def test_format_table_lists_every_line():
    _, rows = _two_domain_section("fan", "00", seed=3)
    result = scoring.official_score(2023, rows)
    text = scoring.format_table(result)
    lines = text.splitlines()
    assert len(lines) == 3 + 1 + 1 + 1 + 1  # title, header, rule, section, rule, machine, score
    assert f"{result['official_score']:.4f}" in lines[-1]
    assert f"{result['sections'][0]['auc_target']:.4f}" in lines[3]


# ---------------------------------------------------------------------------------------
# Gamma decision threshold

def _scipy_threshold(x, loc=0.0, q=0.9):
    shape, loc, scale = scipy.stats.gamma.fit(x, floc=loc)
    return (shape, loc, scale), scipy.stats.gamma.ppf(q, shape, loc=loc, scale=scale)


@pytest.mark.parametrize("shape", [0.5, 2.0, 10.0])
def test_gamma_fit_matches_scipy(shape):
    rng = np.random.default_rng(int(shape * 10))
    x = rng.gamma(shape, 3.0, size=500)
    params, threshold = _scipy_threshold(x)
    assert scoring.fit_gamma(x) == pytest.approx(params, rel=1e-8)
    for q in (0.5, 0.9, 0.99):
        expected = scipy.stats.gamma.ppf(q, params[0], scale=params[2])
        assert scoring.gamma_threshold(x, q=q) == pytest.approx(expected, rel=GAMMA_RTOL)


def test_gamma_threshold_on_reconstruction_errors():
    rng = np.random.default_rng(5)
    # per-clip mean squared error of a 640-dim autoencoder output, clip-dependent noise level
    mse = np.mean(rng.normal(size=(300, 640)) ** 2, axis=1) * rng.uniform(5, 15, size=300)
    _, expected = _scipy_threshold(mse)
    assert scoring.gamma_threshold(mse) == pytest.approx(expected, rel=GAMMA_RTOL)
    # negative scores (e.g. negative log-likelihoods) shift loc below the minimum
    nll = rng.lognormal(1.0, 0.5, size=300) - 4.0
    loc = nll.min() - 1e-6 * (nll.max() - nll.min() + 1e-12)
    params, expected = _scipy_threshold(nll, loc=loc)
    assert scoring.fit_gamma(nll)[1] == loc
    assert scoring.gamma_threshold(nll) == pytest.approx(expected, rel=GAMMA_RTOL)
    # a small relative spread means a huge shape (1e4..1e12), where log(k) - digamma(k)
    # cancels to rounding noise: the fit must stop there, not fail to converge
    for spread in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        narrow = 1000.0 * (1 + spread * rng.normal(size=300))
        _, expected = _scipy_threshold(narrow)
        assert scoring.gamma_threshold(narrow) == pytest.approx(expected, rel=GAMMA_RTOL)


@pytest.mark.parametrize("scores, message", [([1.0], "at least 2"), ([1.0, np.nan], "NaN"),
                                             ([2.0, 2.0, 2.0], "equal")])
def test_gamma_fit_rejects_bad_scores(scores, message):
    with pytest.raises(ScoringError, match=message):
        scoring.fit_gamma(scores)


# ---------------------------------------------------------------------------------------
# Submission files

def test_result_filename_every_year():
    expected = {
        2020: "anomaly_score_fan_id_02.csv",
        2021: "anomaly_score_fan_section_02_target_test.csv",
        2022: "anomaly_score_fan_section_02_test.csv",
        2023: "anomaly_score_fan_section_02_test.csv",
        2024: "anomaly_score_fan_section_02_test.csv",
        2025: "anomaly_score_fan_section_02_test.csv",
    }
    for year, name in expected.items():
        assert submission.result_filename(year, "anomaly_score", "fan", "02", domain="target") == name
    assert submission.result_filename(2023, "decision_result", "ToyCar", "00") == (
        "decision_result_ToyCar_section_00_test.csv")
    with pytest.raises(ValueError, match="2020, 2021"):
        submission.result_filename(2019, "anomaly_score", "fan", "00")
    with pytest.raises(ValueError, match="anomaly_score, decision_result"):
        submission.result_filename(2020, "score", "fan", "00")
    with pytest.raises(ValueError, match="domain"):
        submission.result_filename(2021, "anomaly_score", "fan", "00")


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "anomaly_score_fan_section_00_test.csv"
    values = [0.1 + 0.2, 0.3, 1e-300, -2.5, np.float32(0.1), 7]
    rows = [(f"section_00_{i:04d}.wav", v) for i, v in enumerate(values)]
    submission.write_csv(path, rows)
    back = submission.read_csv(path)
    assert [name for name, _ in back] == [name for name, _ in rows]
    assert [float(v) for _, v in back] == [float(v) for v in values]  # exact, ties survive
    assert back[0][1] != back[1][1]
    assert path.read_text().splitlines()[0] == "section_00_0000.wav,0.30000000000000004"


def test_write_csv_is_atomic(tmp_path):
    path = tmp_path / "decision_result_fan_section_00_test.csv"
    bad_rows = [("a.wav", 1), ("b.wav", 0), ("c.wav", object())]
    with pytest.raises(ScoringError, match="object"):
        submission.write_csv(path, bad_rows)
    assert not path.exists()
    submission.write_csv(path, [("a.wav", 1)])
    before = path.read_bytes()

    def rows_then_crash():
        for i in range(10000):
            yield (f"{i}.wav", 0.5)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        submission.write_csv(path, rows_then_crash())
    with pytest.raises(ScoringError, match="non-finite"):
        submission.write_csv(path, [("a.wav", 0.5), ("b.wav", float("nan"))])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_read_csv_names_file_and_line(tmp_path):
    path = tmp_path / "anomaly_score_fan_id_00.csv"
    path.write_text("a.wav,0.1\nb.wav\nc.wav,0.3\n")
    with pytest.raises(ScoringError, match=f"{path.name}, line 2"):
        submission.read_csv(path)
    path.write_text("")
    with pytest.raises(ScoringError, match="no rows"):
        submission.read_csv(path)
