"""Scores for DCASE Task 2, 2020-2026: ROC AUC and pAUC, the official score of each year and
the baselines' gamma decision threshold. The result files the evaluators read (their names, the
CSVs) are submission.py's.

AUC and pAUC are written by hand and follow `sklearn.metrics.roc_auc_score` exactly (ROC
points at distinct thresholds, collinear points dropped, trapezoids, McClish-standardised
pAUC), because that is what every organisers' evaluator calls; tests/test_scoring.py proves
the two agree. The rules per year follow the organisers' evaluators:
y-kawagu/dcase2020_task2_evaluator (evaluator.py), y-kawagu/dcase2021_task2_evaluator, and
the nttcslab dcase2022..2025_task2_evaluator scripts (one rule from 2022 on). The results
table, which sets the official AE baseline's and the papers' published figures beside ours, is
results.py's.
Left out: the evaluators' jackknife confidence intervals and per-attribute tables, drawing
(plots.py draws the ROC points given here), and reading the ground truth (the dataset
module's job: rows arrive here already labelled).
"""
import math

import numpy as np

import data

YEARS = tuple(data.YEARS)   # the single year table
DOMAINS = ("source", "target")
MAX_FPR = 0.1  # false-positive rate up to which pAUC is taken, every year
DECISION_QUANTILE = 0.9  # quantile of the fitted gamma used as threshold by every baseline
EPS = float(np.finfo(float).eps)  # 2.2e-16, the evaluators' floor (sys.float_info.epsilon)
GAMMA_LOC_MARGIN = 1e-6  # fraction of the score range left below min(scores) when loc shifts
NEWTON_TOL = 1e-13  # Newton step on log(shape) below which the gamma fit has converged
NEWTON_MAX_ITER = 100


class ScoringError(ValueError):
    """Input that no evaluator could score: one class only, NaN scores, unknown year, ..."""


# ---------------------------------------------------------------------------------------
# ROC AUC and McClish pAUC, as sklearn.metrics.roc_auc_score

def _check_binary(y_true, y_score):
    """Validate labels (0 normal, 1 anomaly) and scores; return them as (N,) arrays."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 1 or s.ndim != 1:
        raise ScoringError(f"expected 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ScoringError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ScoringError(f"labels must be 0 (normal) or 1 (anomaly), got {np.unique(y)}")
    if not np.isfinite(s).all():
        # sklearn rejects inf as well as NaN; a broken clip must never get a score
        raise ScoringError(f"{np.count_nonzero(~np.isfinite(s))} scores are NaN or infinite")
    if np.unique(y).size != 2:
        raise ScoringError("ROC AUC needs both normal (0) and anomalous (1) clips; "
                           f"only label {np.unique(y)} is present")
    return y.astype(float), s


def _roc_curve(y, s):
    """ROC points at the distinct score thresholds, highest first, as sklearn.roc_curve
    with drop_intermediate=True. Returns fpr, tpr, both (P,) and starting at (0, 0)."""
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    # last index of every run of tied scores: ties move the curve diagonally, in one step
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = 1 + last - tps
    if tps.size > 2:
        # drop points collinear with their neighbours, as sklearn does, so that the same
        # trapezoids are summed in the same order and the results agree to the last bits
        corner = np.logical_or(np.diff(fps, 2), np.diff(tps, 2))
        keep = np.r_[True, corner, True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]


def _trapezoid(x, y):
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def roc_auc(y_true, y_score):
    """Area under the ROC curve; y_true (N,) in {0, 1} with 1 = anomaly, y_score (N,)
    higher = more anomalous. Equals sklearn.metrics.roc_auc_score(y_true, y_score)."""
    fpr, tpr = _roc_curve(*_check_binary(y_true, y_score))
    return _trapezoid(fpr, tpr)


def partial_auc(y_true, y_score, max_fpr=MAX_FPR):
    """McClish-standardised area under the ROC curve for fpr in [0, max_fpr], the pAUC of
    every DCASE evaluator: sklearn.metrics.roc_auc_score(y_true, y_score, max_fpr=max_fpr).
    0.5 for a chance-level detector, 1 for a perfect one; max_fpr in (0, 1]."""
    if not 0 < max_fpr <= 1:
        raise ScoringError(f"max_fpr must lie in (0, 1], got {max_fpr!r}")
    fpr, tpr = _roc_curve(*_check_binary(y_true, y_score))
    if max_fpr == 1:
        return _trapezoid(fpr, tpr)  # sklearn returns the plain AUC here, no McClish step
    area = _trapezoid(*roc_up_to(fpr, tpr, max_fpr))
    # McClish (1989): map [area of the diagonal, area of a perfect curve] onto [0.5, 1]
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    return float(0.5 * (1 + (area - min_area) / (max_area - min_area)))


def roc_points(y_true, y_score):
    """The ROC curve as sklearn.metrics.roc_curve(y_true, y_score) gives it (with
    drop_intermediate=True): the points the AUC above sums, for plots. Returns fpr, tpr, both
    (P,), from (0, 0) to (1, 1), fpr non-decreasing."""
    return _roc_curve(*_check_binary(y_true, y_score))


def figure_subsets(year, label, domain):
    """Which clips of one section each official figure of `year` takes, for drawing them:
    [(name, mask, keys)], mask (N,) bool over the section's clips, keys the figures of
    official_score's section row computed on those clips ("pauc" among them: its curve holds
    the pAUC). Subsets without both classes (a domain absent from the test set) are left out.
      2020: every clip (auc, pauc);
      2021: each domain's own clips (auc, pauc of that domain's row);
      2022+: each domain's normals with all anomalies (auc_<domain>); every clip (pauc)."""
    label, domain = np.asarray(label), np.asarray(domain, dtype=object)
    every = np.ones(label.shape, dtype=bool)
    if year == 2020:
        subsets = [("all clips", every, ("auc", "pauc"))]
    elif year == 2021:
        subsets = [(d, domain == d, ("auc", "pauc")) for d in DOMAINS]
    else:
        subsets = [(d, (domain == d) | (label == 1), (f"auc_{d}",)) for d in DOMAINS]
        subsets.append(("all clips", every, ("pauc",)))
    return [(name, mask, keys) for name, mask, keys in subsets
            if np.any(label[mask] == 0) and np.any(label[mask] == 1)]


def roc_up_to(fpr, tpr, max_fpr):
    """The part of an ROC curve (roc_points) with fpr <= max_fpr < 1, closed by the point
    linearly interpolated at max_fpr, as sklearn does: the curve under which the pAUC is taken.
    Returns fpr, tpr, both (K,)."""
    # first point beyond max_fpr; fpr[-1] = 1 > max_fpr, so it always exists
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    f0, f1, t0, t1 = fpr[stop - 1], fpr[stop], tpr[stop - 1], tpr[stop]
    tpr_at_max = (t1 - t0) / (f1 - f0) * (max_fpr - f0) + t0  # linear, as np.interp
    return np.r_[fpr[:stop], max_fpr], np.r_[tpr[:stop], tpr_at_max]


def precision_recall_f1(y_true, y_decision):
    """Precision, recall and F1 of 0/1 decisions, anomaly (1) the positive class. 0/0 is
    taken as 0.0, which is what the evaluators' tp / max(tp + fp, eps) gives."""
    y, d = np.asarray(y_true), np.asarray(y_decision)
    if not np.isin(y, (0, 1)).all():
        raise ScoringError(f"labels must be 0 (normal) or 1 (anomaly), got {np.unique(y)}")
    if y.shape != d.shape or not np.isin(d, (0, 1)).all():
        raise ScoringError(f"expected {y.size} decisions in {{0, 1}}, got {np.unique(d)} "
                           f"in shape {d.shape}")
    tp = int(np.sum((y == 1) & (d == 1)))
    fp = int(np.sum((y == 0) & (d == 1)))
    fn = int(np.sum((y == 1) & (d == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ---------------------------------------------------------------------------------------
# Official score of each year

def harmonic_mean(values):
    """Harmonic mean with every value floored at EPS first, as the evaluators do, so that an
    AUC of 0 pulls the mean to ~0 instead of dividing by zero."""
    v = np.maximum(np.asarray(values, dtype=float), EPS)
    return float(v.size / np.sum(1.0 / v))


def arithmetic_mean(values):
    return float(np.mean(values))


def _check_year(year):
    if year not in YEARS:
        raise ScoringError(f"unknown year {year!r}; valid years: {', '.join(map(str, YEARS))}")


def _check_row(year, i, row):
    missing = {"machine", "section", "label", "score"} - set(row)
    if year >= 2021:
        missing |= {"domain"} - set(row)
    if missing:
        raise ScoringError(f"row {i} lacks keys {sorted(missing)}: {row!r}")
    if year >= 2021 and row["domain"] not in DOMAINS:
        raise ScoringError(f"row {i}: domain must be one of {DOMAINS}, got {row['domain']!r}")


def _group_rows(year, rows):
    """Group rows by (machine, section); returns {key: dict of (N,) arrays}, keys sorted.
    decision is None for every group unless every row carries one."""
    groups, n_decisions, n_rows = {}, 0, 0
    for i, row in enumerate(rows):
        _check_row(year, i, row)
        g = groups.setdefault((str(row["machine"]), str(row["section"])),
                              {"label": [], "score": [], "domain": [], "decision": []})
        g["label"].append(row["label"])
        g["score"].append(row["score"])
        g["domain"].append(row.get("domain"))
        g["decision"].append(row.get("decision"))
        n_decisions += row.get("decision") is not None
        n_rows += 1
    if n_rows == 0:
        raise ScoringError("no rows to score")
    if 0 < n_decisions < n_rows:
        raise ScoringError(f"only {n_decisions} of {n_rows} rows carry a decision; "
                           "give one on every row or on none")
    for (machine, section), g in groups.items():
        where = f"machine {machine} section {section}"
        g["label"], g["score"] = np.asarray(g["label"]), np.asarray(g["score"], dtype=float)
        if not np.isin(g["label"], (0, 1)).all():
            raise ScoringError(f"{where}: labels must be 0 or 1, got {np.unique(g['label'])}")
        if not np.isfinite(g["score"]).all():
            raise ScoringError(f"{where}: NaN or infinite scores")
        g["domain"] = np.asarray(g["domain"], dtype=object)
        g["decision"] = np.asarray(g["decision"]) if n_decisions else None
        if n_decisions and not np.isin(g["decision"], (0, 1)).all():
            raise ScoringError(f"{where}: decisions must be 0 or 1, got {np.unique(g['decision'])}")
    return dict(sorted(groups.items()))


def _require_both_classes(label, where):
    n_normal, n_anomaly = int(np.sum(label == 0)), int(np.sum(label == 1))
    if n_normal == 0 or n_anomaly == 0:
        raise ScoringError(f"{where} has {n_normal} normal and {n_anomaly} anomalous clips; "
                           "AUC needs both")
    return n_normal, n_anomaly


def _add_decisions(out, label, decision, suffix=""):
    if decision is not None and label.size == 0:     # a domain absent from the test set
        out.update({f"precision{suffix}": None, f"recall{suffix}": None, f"f1{suffix}": None})
    elif decision is not None:
        p, r, f = precision_recall_f1(label, decision)
        out.update({f"precision{suffix}": p, f"recall{suffix}": r, f"f1{suffix}": f})


def _rows_2020(machine, section, g):
    """2020: one row per (machine type, machine ID), on that ID's test clips."""
    label, score = g["label"], g["score"]
    n_normal, n_anomaly = _require_both_classes(label, f"machine {machine} id {section}")
    out = {"machine": machine, "section": section, "domain": None,
           "auc": roc_auc(label, score), "pauc": partial_auc(label, score),
           "n_normal": n_normal, "n_anomaly": n_anomaly}
    _add_decisions(out, label, g["decision"])
    return [out]


def _missing(domain, n_normal, n_anomaly):
    """Why a domain's figure is undefined: the class (or every clip) it lacks."""
    return (f"no {domain} clips" if n_normal + n_anomaly == 0 else
            f"no {domain} normal clips" if n_normal == 0 else f"no {domain} anomalous clips")


def _rows_2021(machine, section, g):
    """2021: one row per (machine, section, domain), on that domain's own clips only. A domain
    without both classes (a test set of one domain) keeps its row, with AUC and pAUC None and
    the reason in row["undefined"]; a section with no domain to score is an error."""
    rows = []
    for domain in DOMAINS:
        mine = g["domain"] == domain
        label, score = g["label"][mine], g["score"][mine]
        n_normal, n_anomaly = int(np.sum(label == 0)), int(np.sum(label == 1))
        out = {"machine": machine, "section": section, "domain": domain, "auc": None,
               "pauc": None, "n_normal": n_normal, "n_anomaly": n_anomaly}
        if n_normal and n_anomaly:
            out.update(auc=roc_auc(label, score), pauc=partial_auc(label, score))
        else:
            out["undefined"] = dict.fromkeys(("auc", "pauc"),
                                             _missing(domain, n_normal, n_anomaly))
        _add_decisions(out, label, None if g["decision"] is None else g["decision"][mine])
        rows.append(out)
    if all("undefined" in r for r in rows):
        reasons = "; ".join(r["undefined"]["auc"] for r in rows)
        raise ScoringError(f"machine {machine} section {section}: {reasons}; AUC needs normal "
                           "and anomalous clips of one domain at least")
    return rows


def _rows_2022(machine, section, g):
    """2022-2025: one row per (machine, section). AUC_<domain> takes that domain's normals
    and the anomalies of BOTH domains; pAUC takes every clip of the section. 'auc' is the
    evaluator's "AUC (all)" over every clip, reported but not part of the official score.
    Precision/recall/F1 are per domain on that domain's clips, keys suffixed _source/_target.
    A domain without normal clips (a test set of one domain) has AUC_<domain> None, with the
    reason in out["undefined"]; pAUC and the other domain's AUC are still defined."""
    label, score, domain = g["label"], g["score"], g["domain"]
    n_normal, n_anomaly = _require_both_classes(label, f"machine {machine} section {section}")
    out = {"machine": machine, "section": section, "domain": None,
           "auc": roc_auc(label, score), "pauc": partial_auc(label, score),
           "n_normal": n_normal, "n_anomaly": n_anomaly}
    for d in DOMAINS:
        if not np.any((domain == d) & (label == 0)):
            out[f"auc_{d}"] = None
            out.setdefault("undefined", {})[f"auc_{d}"] = _missing(
                d, 0, int(np.sum((domain == d) & (label == 1))))
            continue
        subset = (domain == d) | (label == 1)
        out[f"auc_{d}"] = roc_auc(label[subset], score[subset])
    for d in DOMAINS:
        mine = domain == d
        _add_decisions(out, label[mine], None if g["decision"] is None else g["decision"][mine],
                       suffix=f"_{d}")
    return [out]


def official_figures(year, row):
    """The numbers of one section row that enter the official (and per machine) score."""
    if year >= 2022:
        return [row["auc_source"], row["auc_target"], row["pauc"]]
    return [row["auc"], row["pauc"]]


def machine_summary(year, rows):
    """Per machine type means of its section rows: arithmetic in 2020, harmonic (EPS-floored)
    from 2021, as in the evaluators' "Average" / "harmonic mean" lines."""
    rule = "arithmetic" if year == 2020 else "harmonic"
    plain = arithmetic_mean if year == 2020 else harmonic_mean

    def mean(values):     # None where a figure is undefined (a domain absent from the test set)
        return None if any(v is None for v in values) else plain(values)
    out = {"mean_rule": rule}
    if year >= 2022:
        # the evaluator's machine "AUC" pools the source and target AUCs of all its sections
        out["auc"] = mean([r["auc_source"] for r in rows] + [r["auc_target"] for r in rows])
        out["auc_source"] = mean([r["auc_source"] for r in rows])
        out["auc_target"] = mean([r["auc_target"] for r in rows])
        metric_keys = [f"{m}_{d}" for m in ("precision", "recall", "f1") for d in DOMAINS]
    else:
        out["auc"] = mean([r["auc"] for r in rows])
        metric_keys = ["precision", "recall", "f1"]
    out["pauc"] = mean([r["pauc"] for r in rows])
    out["score"] = mean([x for r in rows for x in official_figures(year, r)])
    if any(k in rows[0] for k in ("f1", "f1_source")):
        for key in metric_keys:
            out[key] = mean([r[key] for r in rows])
        if year >= 2022:
            # one figure over both domains too, as the evaluator's machine "harmonic mean" line
            for m in ("precision", "recall", "f1"):
                out[m] = mean([r[f"{m}_{d}"] for r in rows for d in DOMAINS])
    return out


def official_score(year, rows):
    """Score a system as the organisers' evaluator of `year` does.

    rows: iterable of dicts with keys machine, section ("00"; the machine ID in 2020),
    domain ("source"/"target"; ignored in 2020), label (0 normal, 1 anomaly), score (float),
    and optionally decision (0/1) on every row, which adds precision, recall and F1.

    Official score:
      2020: the evaluator prints only per machine averages; like the ASDKit toolkit we
            report the arithmetic mean of all per-ID AUCs and pAUCs taken together.
      2021: harmonic mean of the AUCs and pAUCs of all (machine, section, domain).
      2022-2026: harmonic mean of AUC_source, AUC_target and pAUC of all (machine, section)
            (2026: unchanged, whichever channel the system read).
    Harmonic means floor every value at EPS first, as the evaluators do.
    A test set without one domain (2021-2025) leaves that domain's figures None (each section
    row says why in "undefined"), every mean that needs them None, and the official score None:
    the official score needs both domains. `undefined_line` says so in one line.
    Returns a JSON-serialisable dict: year, official_score, sections (list of dicts, one per
    (machine, section) or, in 2021, per (machine, section, domain)) and machines
    ({machine: {auc, pauc, score, mean_rule, ...}}).
    """
    _check_year(year)
    groups = _group_rows(year, rows)
    make_rows = _rows_2020 if year == 2020 else _rows_2021 if year == 2021 else _rows_2022
    sections = [r for (machine, section), g in groups.items()
                for r in make_rows(machine, section, g)]
    figures = [x for r in sections for x in official_figures(year, r)]
    # 2020 has no official single number: arithmetic mean over every ID, ASDKit's convention
    score = (None if any(x is None for x in figures) else
             arithmetic_mean(figures) if year == 2020 else harmonic_mean(figures))
    machines = {}
    for machine in dict.fromkeys(r["machine"] for r in sections):
        machines[machine] = machine_summary(year, [r for r in sections if r["machine"] == machine])
    return {"year": int(year), "official_score": score, "sections": sections, "machines": machines}


def format_table(result):
    """Plain-text table of an official_score() result: one line per section (and domain),
    one per machine type with its mean, the official score last."""
    year = result["year"]
    keys = ["auc_source", "auc_target", "pauc"] if year >= 2022 else ["auc", "pauc"]
    n_official = len(keys)
    if any(k.startswith("f1") for k in result["sections"][0]):
        keys += [f"{m}{d}" for m in ("precision", "recall", "f1")
                 for d in (("_source", "_target") if year >= 2022 else ("",))]
    short = {"auc": "AUC", "pauc": "pAUC", "precision": "prec", "recall": "recall", "f1": "F1",
             "source": " src", "target": " tgt", "": ""}
    titles = [short[metric] + short[domain]
              for metric, _, domain in (k.partition("_") for k in keys)]
    head = f"{'machine':<14} {'section':<8} {'domain':<7}" + "".join(f" {t:>10}" for t in titles)
    lines = [f"DCASE {year} Task 2, rules of the {year} evaluator", head, "-" * len(head)]
    def cell(v):               # "-": undefined, a domain absent from the test set
        return f" {'-':>10}" if v is None else f" {v:>10.4f}"
    for r in result["sections"]:
        cells = "".join(cell(r[k]) for k in keys)
        lines.append(f"{r['machine']:<14} {r['section']:<8} {r['domain'] or '':<7}{cells}")
    lines.append("-" * len(head))
    for machine, m in result["machines"].items():
        cells = "".join(cell(m[k]) for k in keys)
        lines.append(f"{machine:<14} {'all':<8} {m['mean_rule'][0] + '-mean':<7}{cells}")
    rule = "arithmetic" if year == 2020 else "harmonic"
    score = result["official_score"]
    lines.append(f"official score ({rule} mean of {', '.join(titles[:n_official])}): "
                 + ("undefined" if score is None else f"{score:.4f}"))
    return "\n".join(lines)


FIGURE_TITLES = {"auc": "AUC", "pauc": "pAUC", "auc_source": "AUC source",
                 "auc_target": "AUC target"}


def undefined_line(result):
    """One line naming the figures of an official_score() result that are undefined, and why
    (a domain absent from the test set); None when every figure is defined."""
    missing = {}                              # (figures, reason) -> ["fan 00", ...]
    for r in result["sections"]:
        by_reason = {}
        for key, reason in r.get("undefined", {}).items():
            by_reason.setdefault(reason, []).append(FIGURE_TITLES[key])
        for reason, figures in by_reason.items():
            missing.setdefault((" and ".join(figures), reason), []).append(
                f"{r['machine']} {r['section']}")
    if not missing:
        return None
    parts = [f"{figure} of {', '.join(where)} ({reason})"
             for (figure, reason), where in missing.items()]
    return (f"undefined: {'; '.join(parts)}. The official {result['year']} score needs these "
            "figures of both domains, so there is none; every other figure above is defined.")


# ---------------------------------------------------------------------------------------
# Decision threshold: gamma fit of the training scores, as the baselines

def fit_gamma(scores):
    """Maximum-likelihood gamma fit with the location fixed; returns (shape, loc, scale).

    loc = 0 when every score is > 0, else loc = min - GAMMA_LOC_MARGIN * (max - min + 1e-12)
    so that every shifted score is > 0. The baselines call scipy.stats.gamma.fit(scores) with
    a free location, but that MLE is ill-posed for shape < 1 (the likelihood grows without
    bound as loc approaches min(scores)) and the answer depends on the optimiser; with loc
    fixed the MLE is unique. The shape k solves log(k) - digamma(k) = log(mean) - mean(log x),
    by Newton steps on log(k) from Minka's (2002) closed-form approximation; scale = mean / k.
    """
    from scipy import special     # here, not at the top: `asd.py list` stays fast
    x = np.asarray(scores, dtype=float)
    if x.ndim != 1 or x.size < 2:
        raise ScoringError(f"gamma fit needs at least 2 scores in a 1-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ScoringError("gamma fit: scores contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        raise ScoringError(f"gamma fit: all {x.size} scores equal {lo}; no spread to fit")
    loc = 0.0 if lo > 0 else lo - GAMMA_LOC_MARGIN * (hi - lo + 1e-12)
    z = x - loc  # (N,) all > 0
    mean = float(z.mean())
    s = math.log(mean) - float(np.mean(np.log(z)))  # > 0 by Jensen unless all equal
    if not s > 0:
        raise ScoringError(f"gamma fit: scores too close to each other (log-ratio {s})")
    k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)  # Minka's start, ~1.5% off
    for _ in range(NEWTON_MAX_ITER):
        g = math.log(k) - float(special.digamma(k)) - s
        # for large k (scores with a small relative spread) g is a difference of two nearly
        # equal numbers; once it is down to their rounding error, further steps are noise
        if abs(g) <= 4 * EPS * max(1.0, math.log(k)):
            break
        dg = 1.0 - k * float(special.polygamma(1, k))  # d g / d log(k), always < 0
        step = g / dg
        k = math.exp(math.log(k) - step)  # stepping in log(k) keeps k > 0
        if abs(step) < NEWTON_TOL:
            break
    else:
        raise ScoringError(f"gamma fit: Newton did not converge in {NEWTON_MAX_ITER} steps")
    return k, loc, mean / k


def gamma_threshold(scores, q=DECISION_QUANTILE):
    """Decision threshold: the q-quantile of the gamma fitted to (training) scores."""
    from scipy import special
    if not 0 < q < 1:
        raise ScoringError(f"quantile q must lie in (0, 1), got {q!r}")
    shape, loc, scale = fit_gamma(scores)
    return float(loc + scale * special.gammaincinv(shape, q))


FEW_STEPS = 100   # float32 steps: scores spread over fewer than this many tie and rank coarsely


def check_spread(scores, what, *, advice="train longer (--epochs) or on more clips"):
    """Refuse scores that are all equal within float32 rounding (16 steps): a collapsed model
    (every clip mapped to one point) ranks nothing, and a threshold fitted to its scores means
    nothing. Scores spread over fewer than FEW_STEPS float32 steps give a warning line
    (returned; None otherwise): their ranking is coarse and new clips may tie."""
    x = np.asarray(scores, dtype=float)
    scale = max(1.0, float(np.abs(x).max()))
    step = float(np.finfo(np.float32).eps) * scale          # float32's step at these scores
    steps = float(x.max() - x.min()) / step
    if steps <= 16:
        raise ScoringError(f"{what}: all {x.size} scores are equal within float rounding "
                           f"({x.min():.6g} to {x.max():.6g}): the model has collapsed and "
                           f"ranks nothing; {advice}")
    if steps < FEW_STEPS:
        return (f"warning: {what} span {x.max() - x.min():.3g}, only {steps:.0f} float32 steps "
                f"({step:.2g}): the model maps normal clips almost to one point, so new clips "
                f"may tie and the threshold is coarse; {advice}")
    return None
