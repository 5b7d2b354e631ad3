"""The results table: our figures beside the official AE baseline's published development-set
figures (BASELINE_DEV per section, each year's source named; BASELINE_2026 over the whole set)
and the paper's own (each system file's PAPER_DEV), as rows for results.csv and results.md
(comparison_rows, format_markdown, published_note) and results.json's "paper" (paper_entry).
Ours come from scoring.official_score; the published figures' means per machine type and
official score over our sections follow the same rule of each year (scoring's machine_summary,
official_figures and means, imported here). Moved from scoring.py when it passed ~650 lines
(../shared/DESIGN.md).
"""
from scoring import arithmetic_mean, harmonic_mean, machine_summary, official_figures


# ---------------------------------------------------------------------------------------
# The official AE baseline's published development-set figures, beside ours
#
# Only figures read in the organisers' own baseline READMEs (the result.csv each one shows);
# where a README shows no figure the cell stays empty. Order: the year's official figures,
# (AUC, pAUC) to 2021, (AUC_source, AUC_target, pAUC) from 2022.
#   2020: y-kawagu/dcase2020_task2_baseline, README.md (every machine type, per machine ID)
#   2021: y-kawagu/dcase2021_task2_baseline_ae, README.md (fan and valve only)
#   2022: Kota-Dohi/dcase2022_task2_baseline_ae, README.md (fan and valve only)
#   2023-2025: nttcslab/dcase2023_task2_baseline_ae's README shows none: left empty.
BASELINE_DEV = {
    2020: {("ToyCar", "01"): (0.828474, 0.678514), ("ToyCar", "02"): (0.866307, 0.762236),
           ("ToyCar", "03"): (0.639396, 0.546659), ("ToyCar", "04"): (0.869477, 0.701461),
           ("ToyConveyor", "01"): (0.793497, 0.650428),
           ("ToyConveyor", "02"): (0.64243, 0.564437),
           ("ToyConveyor", "03"): (0.744579, 0.60488),
           ("fan", "00"): (0.539607, 0.492435), ("fan", "02"): (0.721866, 0.554171),
           ("fan", "04"): (0.622098, 0.527072), ("fan", "06"): (0.72277, 0.529961),
           ("pump", "00"): (0.670769, 0.57269), ("pump", "02"): (0.609369, 0.58037),
           ("pump", "04"): (0.8886, 0.676842), ("pump", "06"): (0.734902, 0.570175),
           ("slider", "00"): (0.963315, 0.818451), ("slider", "02"): (0.78809, 0.628819),
           ("slider", "04"): (0.946011, 0.739503), ("slider", "06"): (0.702247, 0.490242),
           ("valve", "00"): (0.687311, 0.51349), ("valve", "02"): (0.674083, 0.512281),
           ("valve", "04"): (0.744, 0.515351), ("valve", "06"): (0.552833, 0.482895)},
    2021: {("fan", "00", "source"): (0.6738, 0.573157895),
           ("fan", "01", "source"): (0.6786, 0.505263158),
           ("fan", "02", "source"): (0.6542, 0.532631579),
           ("fan", "00", "target"): (0.6955, 0.548421053),
           ("fan", "01", "target"): (0.4953, 0.483157895),
           ("fan", "02", "target"): (0.6441, 0.559473684),
           ("valve", "00", "source"): (0.5026, 0.506842105),
           ("valve", "01", "source"): (0.5404, 0.494210526),
           ("valve", "02", "source"): (0.596, 0.516315789),
           ("valve", "00", "target"): (0.4716, 0.485263158),
           ("valve", "01", "target"): (0.5857, 0.548421053),
           ("valve", "02", "target"): (0.5489, 0.489473684)},
    2022: {("fan", "00"): (0.8488, 0.4542, 0.6136), ("fan", "01"): (0.7150, 0.46, 0.5089),
           ("fan", "02"): (0.8042, 0.6477, 0.6131),
           ("valve", "00"): (0.5432, 0.5116, 0.5231), ("valve", "01"): (0.489, 0.5448, 0.4968),
           ("valve", "02"): (0.5298, 0.4432, 0.4973)},
}


# 2026: the official AE baseline's figures over the whole set (AUC source, AUC target, pAUC,
# official score, in %), each with its source. No per-section table was readable here, so
# they stand beside our official score (published_note), not in the per-section columns.
BASELINE_2026 = {
    ("eval", "AE-MSE"): dict(auc_source=66.06, auc_target=57.32, pauc=56.87, score=59.80,
                             source="the organisers' 2026 evaluator README "
                                    "(nttcslab/dcase2026_task2_evaluator), as quoted in issue 23"),
    ("eval", "AE-Mahalanobis"): dict(score=54.76, source="the same README"),
    ("dev", "AE-Mahalanobis"): dict(auc_source=66.46, auc_target=54.24, pauc=53.91, score=57.66,
                                    source="a participant's README, NOT the organisers': no "
                                           "organisers' development-set table was found"),
}


def published_note(year, part):
    """Markdown lines giving the official baseline's published whole-set figures of `year`
    and `part` with their sources ("" where none: every year but 2026)."""
    rows = [(name, f) for (p, name), f in BASELINE_2026.items()
            if p == part and year == 2026]
    lines = [f"- baseline {name}: " + ", ".join(f"{k} {f[k]:.2f}" for k in (
        "auc_source", "auc_target", "pauc", "score") if k in f) + f" (source: {f['source']})"
        for name, f in rows]
    return ("\n\nThe official baseline on the real DCASE 2026 " + part + " set (%):\n"
            + "\n".join(lines)) if lines else ""


def _official_keys(year):
    return ["auc_source", "auc_target", "pauc"] if year >= 2022 else ["auc", "pauc"]


def _baseline_of(year, row):
    """The baseline's figures of one section row as a dict, or None where not published."""
    key = (row["machine"], row["section"]) + ((row["domain"],) if year == 2021 else ())
    figures = BASELINE_DEV.get(year, {}).get(key)
    return None if figures is None else dict(zip(_official_keys(year), figures))


def comparison_rows(result, *, with_baseline=True, paper=None):
    """The results table: one row per section (2021: and domain), one per machine type (its
    mean and score), the official score last; each with the baseline's figure beside ours
    where published (with_baseline=False: the eval set, no published figure), and, given a
    system's PAPER_DEV (paper), its paper's figures in columns after the baseline's. Returns
    (header, rows); a cell without a figure is None."""
    year, keys = result["year"], _official_keys(result["year"])
    header = (["machine", "section", "domain"] + keys + ["score"]
              + [f"baseline_{k}" for k in keys + ["score"]])
    sections = result["sections"]
    base = [_baseline_of(year, r) if with_baseline else None for r in sections]
    rows = []
    for r, b in zip(sections, base):
        rows.append([r["machine"], r["section"], r["domain"]] + [r[k] for k in keys] + [None]
                    + [(b or {}).get(k) for k in keys] + [None])
    for machine, m in result["machines"].items():
        mine = [b for r, b in zip(sections, base) if r["machine"] == machine]
        b = machine_summary(year, mine) if all(mine) else {}
        rows.append([machine, "all", m["mean_rule"] + " mean"] + [m[k] for k in keys]
                    + [m["score"]] + [b.get(k) for k in keys + ["score"]])
    b_score = None
    if all(base):                      # the baseline's score over the same sections as ours
        figures = [x for b in base for x in official_figures(year, b)]
        b_score = arithmetic_mean(figures) if year == 2020 else harmonic_mean(figures)
    rows.append(["official score", "", ""] + [None] * len(keys) + [result["official_score"]]
                + [None] * len(keys) + [b_score])
    if paper:
        entry = paper_entry(result, paper)
        header += [f"paper_{k}" for k in keys + ["score"]]
        for row, figures in zip(rows, entry["sections"] + list(entry["machines"].values())
                                + [{"score": entry["official_score"]}]):
            row += [(figures or {}).get(k) for k in keys + ["score"]]
    return header, rows


def format_markdown(header, rows):
    """A Markdown table of comparison_rows(); figures with 4 decimals, unknown cells empty."""
    def cell(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The paper's own development-set figures beside ours. Each system file carries them as a
# plain constant, PAPER_DEV (read by systems.paper_figures): {"year", "source" (the table),
# "sections": {(machine, section[, domain in 2021]): {figure: value}}, "machines": {machine:
# {figure: value}} (where the paper gives only per machine type figures), "official_score"}.
# Figures are fractions, keyed as ours (auc, pauc; auc_source, auc_target, pauc; score).

def _paper_section(paper, row):
    key = (row["machine"], row["section"]) + ((row["domain"],) if paper["year"] == 2021 else ())
    return paper.get("sections", {}).get(key)


def _paper_machine(year, machine, figures):
    """The paper's figures of one machine type: as the paper gives them, else the year's means
    over the paper's figures of our sections, each metric where the paper gives it for all."""
    given = dict(figures["machines"].get(machine, {}))
    rows = figures["sections"]
    if given or not rows or not all(rows):
        return given or None
    mean = arithmetic_mean if year == 2020 else harmonic_mean
    out = {k: mean([r[k] for r in rows]) for k in rows[0] if all(k in r for r in rows)}
    if year >= 2022 and {"auc_source", "auc_target"} <= set(out):
        out["auc"] = mean([r[k] for r in rows for k in ("auc_source", "auc_target")])
    if all(k in out for k in _official_keys(year)):
        out["score"] = mean([x for r in rows for x in official_figures(year, r)])
    return out


def paper_entry(result, paper):
    """results.json's "paper": the paper's figures for each of our sections (None where it
    gives none), machine types and official score, over the same sections as ours (the
    paper's own official score where our run covers all its machine types and sections)."""
    year, sections = result["year"], result["sections"]
    if paper.get("year") != year:
        raise ValueError(f"PAPER_DEV is of {paper.get('year')}, the results of {year}")
    ours = [_paper_section(paper, r) for r in sections]
    machines = {}
    for machine in result["machines"]:
        rows = [p for r, p in zip(sections, ours) if r["machine"] == machine]
        machines[machine] = _paper_machine(year, machine, {"machines": paper.get("machines", {}),
                                                           "sections": rows})
    official = None
    if ours and all(p and all(k in p for k in _official_keys(year)) for p in ours):
        figures = [x for p in ours for x in official_figures(year, p)]
        official = arithmetic_mean(figures) if year == 2020 else harmonic_mean(figures)
    if official is None and paper.get("machines") and set(paper["machines"]) <= set(machines):
        official = paper.get("official_score")      # per machine type figures: all of them
    return {"source": paper["source"], "sections": ours, "machines": machines,
            "official_score": official}
