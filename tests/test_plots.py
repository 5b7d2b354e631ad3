"""The pictures read back: every SVG and results.html parse as XML; each ROC curve drawn is, point
for point, the ROC that scoring computes on the clips of the year's rule (picked here by hand),
the shaded pAUC area is the pAUC's area, histogram bars are numpy.histogram's counts, and the
threshold line stands at the threshold. Then the CLI: evaluate on a synthetic set whose test
clips are all in the source domain (every defined figure, one line on the rest, the pictures,
where the files went), and score --plot through asd.main."""
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import asd
import plots
import results
import scoring
import submission
import synth

SVG = "{http://www.w3.org/2000/svg}"
XHTML = "{http://www.w3.org/1999/xhtml}"
PX = 1e-4      # of an axis' range: coordinates are written to 1/100 px on 260 px (4e-5)


def _rows(year, seed=0, domains=("source", "target"), sections=("00", "01")):
    """Labelled rows of one machine type: anomalies score higher, the target domain a bit
    higher again, some ties (scores rounded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for section in sections:
        for domain in domains:
            for label, n in ((0, 12), (1, 7)):
                for v in np.round(rng.gamma(3 + 3 * label, 0.5, n) + (domain == "target"), 1):
                    rows.append({"machine": "valve", "section": section, "domain": domain,
                                 "label": label, "score": float(v)})
    return rows


def _panels(root, kind):
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == f"panel {kind}"]


def _to_data(g, px, py):
    """Pixels of panel g back to data, by the mapping its data-* attributes declare."""
    left, top, size = (float(g.get(k)) for k in ("data-left", "data-top", "data-size"))
    x0, x1, y0, y1 = (float(g.get(f"data-{k}")) for k in ("x0", "x1", "y0", "y1"))
    return (x0 + (np.asarray(px) - left) / size * (x1 - x0),
            y0 + (top + size - np.asarray(py)) / size * (y1 - y0))


def _tolerance(g, axis):
    """What 1/100 px (with margin) is in data units on axis "x" or "y" of panel g."""
    return PX * abs(float(g.get(f"data-{axis}1")) - float(g.get(f"data-{axis}0")))


def _points(g, element):
    xy = np.array([p.split(",") for p in element.get("points").split()], dtype=float)
    return _to_data(g, xy[:, 0], xy[:, 1])


def _by_hand(year, label, domain):
    """The clips each curve must be drawn on, by the year's rule (not scoring.figure_subsets)."""
    every = np.ones(label.size, dtype=bool)
    if year == 2020:
        wanted = {"all clips": every}
    elif year == 2021:
        wanted = {d: domain == d for d in ("source", "target")}
    else:
        wanted = {d: (domain == d) | (label == 1) for d in ("source", "target")}
        wanted["all clips"] = every
    return {k: m for k, m in wanted.items() if (label[m] == 0).any() and (label[m] == 1).any()}


def check_roc_panels(svg, year, rows):
    root = ET.fromstring(svg)
    panels = _panels(root, "roc")
    assert sorted(g.get("data-section") for g in panels) == sorted({r["section"] for r in rows})
    for g in panels:
        mine = [r for r in rows if r["section"] == g.get("data-section")]
        label = np.array([r["label"] for r in mine])
        score = np.array([r["score"] for r in mine])
        wanted = _by_hand(year, label, np.array([r["domain"] for r in mine], dtype=object))
        drawn = {e.get("data-name"): _points(g, e) for e in g.iter(f"{SVG}polyline")}
        assert set(drawn) == set(wanted)
        for name, mask in wanted.items():
            fpr, tpr = scoring.roc_points(label[mask], score[mask])
            np.testing.assert_allclose(drawn[name][0], fpr, atol=PX)
            np.testing.assert_allclose(drawn[name][1], tpr, atol=PX)
        for shade in g.iter(f"{SVG}polygon"):     # the area its pAUC takes, before McClish
            mask = wanted[shade.get("data-name")]
            x, y = _points(g, shade)
            area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
            p, pauc = scoring.MAX_FPR, scoring.partial_auc(label[mask], score[mask])
            low = p * p / 2
            assert area == pytest.approx(low + (2 * pauc - 1) * (p - low), abs=PX)
    return root


def check_histogram(g, series, threshold, edges):
    """Bars of each named series are numpy.histogram's counts on `edges`; the line is at the
    threshold."""
    dx, dy = _tolerance(g, "x"), _tolerance(g, "y")
    for name, scores in series.items():
        counts = np.zeros(len(edges) - 1, dtype=int)
        for bar in g.iter(f"{SVG}rect"):
            if bar.get("class") == "bar" and bar.get("data-name") == name:
                x, top = float(bar.get("x")), float(bar.get("y"))
                (a, b), (n, zero) = _to_data(g, [x, x + float(bar.get("width"))],
                                             [top, top + float(bar.get("height"))])
                i = int(np.argmin(abs(edges - a)))
                assert (a, b) == pytest.approx((edges[i], edges[i + 1]), abs=dx)
                counts[i] = round(n)
                assert (n, zero) == pytest.approx((counts[i], 0), abs=dy)
        np.testing.assert_array_equal(counts, np.histogram(scores, edges)[0], err_msg=name)
    lines = [e for e in g.iter(f"{SVG}line") if e.get("class") == "threshold"]
    if threshold is None:
        assert not lines
        return
    (line,) = lines
    assert line.get("x1") == line.get("x2")
    assert _to_data(g, float(line.get("x1")), 0)[0] == pytest.approx(threshold, abs=dx)
    assert float(line.get("data-value")) == threshold


def check_machine_svg(svg, year, rows, threshold):
    root = check_roc_panels(svg, year, rows)
    scores = [r["score"] for r in rows]
    edges = np.linspace(min(scores + [threshold or scores[0]]),
                        max(scores + [threshold or scores[0]]), plots.N_BINS + 1)
    histograms = _panels(root, "histogram")
    domains = sorted({r["domain"] for r in rows}) if year > 2020 else ["all"]
    assert [g.get("data-domain") for g in histograms] == domains
    for g in histograms:
        mine = [r for r in rows if g.get("data-domain") in ("all", r["domain"])]
        series = {name: [r["score"] for r in mine if r["label"] == label]
                  for name, label in (("normal", 0), ("anomaly", 1))}
        check_histogram(g, series, threshold, edges)


# ---------------------------------------------------------------------------------------
# The drawing, on labelled rows


@pytest.mark.parametrize("year", [2020, 2021, 2022, 2025])
def test_machine_svg_draws_the_rules_roc_histograms_and_threshold(year):
    rows = _rows(year, seed=year)
    result = scoring.official_score(year, rows)
    check_machine_svg(plots.machine_svg(result, rows, "valve", 3.7), year, rows, 3.7)


@pytest.mark.parametrize("year", [2021, 2022])
def test_one_domain_svg_draws_the_defined_curves_and_names_the_others(year):
    rows = _rows(year, seed=3, domains=("source",))
    result = scoring.official_score(year, rows)
    svg = plots.machine_svg(result, rows, "valve", None)
    check_machine_svg(svg, year, rows, None)
    texts = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert texts.count("target: undefined (no target clips)") == 2      # one per section
    assert "threshold: not known" in texts


def test_nice_ticks_and_bin_edges():
    assert plots.nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1])
    assert plots.nice_ticks(-73.2, 2601) == [0, 500, 1000, 1500, 2000, 2500]
    assert plots.nice_ticks(0, 3, integer=True) == [0, 1, 2, 3]
    np.testing.assert_array_equal(plots.bin_edges([[1.0, 3.0]], threshold=5.0),
                                  np.linspace(1, 5, plots.N_BINS + 1))
    assert plots.bin_edges([[2.0, 2.0]])[[0, -1]].tolist() == [1.5, 2.5]   # one value: a bin


def test_results_html_is_xml_with_the_table_notes_and_figures():
    rows = _rows(2022, seed=1)
    result = scoring.official_score(2022, rows)
    header, table = results.comparison_rows(result)
    svg = plots.machine_svg(result, rows, "valve", 3.7)
    page = plots.results_html("DCASE 2022 <ae> & co", header, table, ["official: 0.7", None],
                              {"valve": svg})
    root = ET.fromstring(page)
    body = root.find(f"{XHTML}body")
    assert root.find(f"{XHTML}head/{XHTML}title").text == "DCASE 2022 <ae> & co"
    cells = [[c.text or "" for c in tr] for tr in body.iter(f"{XHTML}tr")]
    assert cells[0] == header and len(cells) == 1 + len(table)
    assert cells[1][3] == f"{result['sections'][0]['auc_source']:.4f}"
    assert [p.text for p in body.iter(f"{XHTML}p") if not p.get("class")] == ["official: 0.7"]
    (figure,) = body.iter(f"{SVG}svg")
    check_machine_svg(ET.tostring(figure, encoding="unicode"), 2022, rows, 3.7)


# ---------------------------------------------------------------------------------------
# The CLI: evaluate on a source-only test set, score --plot


@pytest.fixture(scope="module")
def source_only(tmp_path_factory):
    """A 2022 set whose test clips are all in the source domain (the BLDC sample's form), with
    a trained and tested AE."""
    tmp = tmp_path_factory.mktemp("source_only")
    synth.synthesize(tmp / "data", year=2022, machines=["fan"], n_train=12, n_test=4)
    for clip in (tmp / "data/dcase2022/dev_data/fan/test").glob("*_target_*.wav"):
        clip.unlink()
    run = ["--year", 2022, "--system", "ae", "--part", "dev", "--data-root", tmp / "data",
           "--out", tmp / "runs"]
    assert asd.main(["train", *run, "--machine", "fan", "--cache-dir", tmp / "cache",
                     "--epochs", 3, "--batch-size", 64, "--device", "cpu"]) == 0
    assert asd.main(["test", *run, "--machine", "fan", "--cache-dir", tmp / "cache"]) == 0
    return tmp, run


def test_evaluate_one_domain_gives_the_defined_figures_and_the_pictures(source_only, capsys):
    tmp, run = source_only
    capsys.readouterr()
    assert asd.main(["evaluate", *run]) == 0
    out = capsys.readouterr().out
    assert ("undefined: AUC target of fan 00, fan 01 (no target clips). The official 2022 "
            "score needs these figures of both domains") in out
    folder = tmp / "runs/dcase2022/ae/dev"
    assert (f"results -> {folder / 'results.json'}; beside it: results.txt, results.csv, "
            f"results.md, results.html, plots/fan.svg") in out
    result = json.loads((folder / "results.json").read_text())
    assert result["official_score"] is None and len(result["sections"]) == 2
    labelled = submission.labelled_rows(folder / "results", year=2022,
                                     truth=asd.data.truth_from_names(year=2022))
    for section in result["sections"]:
        mine = [r for r in labelled if r["section"] == section["section"]]
        y, s = [r["label"] for r in mine], [r["score"] for r in mine]
        assert section["auc_source"] == scoring.roc_auc(y, s) and section["auc_target"] is None
        assert section["pauc"] == scoring.partial_auc(y, s)
    threshold = json.loads((folder / "models/fan/threshold.json").read_text())["threshold"]
    svg = (folder / "plots/fan.svg").read_text()
    check_machine_svg(svg, 2022, labelled, threshold)
    page = ET.parse(folder / "results.html").getroot()
    assert len(list(page.iter(f"{SVG}svg"))) == 1
    assert any("undefined: AUC target" in (p.text or "") for p in page.iter(f"{XHTML}p"))
    for path in (folder / "results.html", folder / "plots/fan.svg"):
        path.unlink()
    assert asd.main(["evaluate", *run, "--force", "--no-plots"]) == 0
    assert not (folder / "results.html").exists() and not (folder / "plots/fan.svg").exists()


@pytest.mark.parametrize("year", [2021, 2023])
def test_evaluate_one_domain_result_files_of_each_layout(tmp_path, year, capsys):
    """evaluate alone, on result CSVs written here for a source-only set (no model, so no
    threshold to draw): every layout where a domain can be missing."""
    synth.synthesize(tmp_path / "data", year=year, machines=["valve"], n_train=1, n_test=3)
    folder = tmp_path / f"data/dcase{year}/dev_data"
    clips = [c for c in asd.data.list_clips(folder, year=year, machine="valve", split="test")
             if c.domain == "source"]
    results = tmp_path / f"runs/dcase{year}/ae/dev/results"
    rng = np.random.default_rng(year)
    for section in sorted({c.section for c in clips}):
        mine = [c for c in clips if c.section == section]
        scores = [float(c.label == "anomaly") + rng.normal() for c in mine]
        for kind, values in (("anomaly_score", scores), ("decision_result", [0] * len(mine))):
            submission.write_csv(results / submission.result_filename(year, kind, "valve", section,
                                                                "source"),
                              [(c.name, v) for c, v in zip(mine, values)])
    run = ["--year", year, "--system", "ae", "--data-root", tmp_path / "data", "--out",
           tmp_path / "runs"]
    assert asd.main(["evaluate", *run]) == 0
    out = capsys.readouterr().out
    figures = "AUC and pAUC" if year == 2021 else "AUC target"
    where = ", ".join(f"valve {section}" for section in sorted({c.section for c in clips}))
    assert f"undefined: {figures} of {where} (no target clips)" in out
    assert "threshold.json not found: the pictures of valve draw no threshold" in out
    result = json.loads((results.parent / "results.json").read_text())
    assert result["official_score"] is None
    labelled = submission.labelled_rows(results, year=year,
                                     truth=asd.data.truth_from_names(year=year))
    check_machine_svg((results.parent / "plots/valve.svg").read_text(), year, labelled, None)


def test_score_plot_draws_the_scores_against_threshold_and_held_out(source_only, capsys):
    tmp, _ = source_only
    model = tmp / "runs/dcase2022/ae/dev/models/fan"
    plot = tmp / "scores.svg"
    capsys.readouterr()
    argv = ["score", "--model", model, tmp / "data/dcase2022/dev_data/fan/test", "--plot", plot]
    assert asd.main(argv) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    scored = [float(line.split("\t")[1]) for line in out.splitlines()]   # stdout: the table only
    fit = json.loads((model / "threshold.json").read_text())
    flagged = sum(s > fit["threshold"] for s in scored)
    assert re.search(rf"^scored {len(scored)} of {len(scored)} files \(0 skipped\)\nthreshold "
                     rf"[\d.e+]+: the 0.9 quantile of a gamma fitted to the scores of "
                     rf"{len(fit['scores'])} held-out clips.*; it flags {flagged} of "
                     rf"{len(scored)} clips here as anomalous", err, re.M), err
    assert len(scored) == 16 and f"histogram -> {plot}" in err
    root = ET.parse(plot).getroot()
    (g,) = _panels(root, "histogram")
    values = scored + fit["scores"] + [fit["threshold"]]
    edges = np.linspace(min(values), max(values), plots.N_BINS + 1)
    check_histogram(g, {"scored": scored, "held-out normal": fit["scores"]}, fit["threshold"],
                    edges)
    before = plot.read_text()
    assert asd.main(argv) == 2                                   # no overwrite without --force
    assert "scores.svg exists; pass --force" in capsys.readouterr().err
    assert plot.read_text() == before
