"""Pictures of a result, as hand-written SVG: per machine type the ROC curve of every section
and domain with the pAUC region shaded, and histograms of its normal and anomalous test scores
per domain with the decision threshold drawn; for `score`, the scored files against the
held-out scores the threshold was fitted to; and results.html, one self-contained page with the
results table and these pictures that opens in any browser.

SVG is text, so no plotting library is needed (the run-time dependencies stay torch, numpy,
scipy, soundfile), and a test reads every curve, bar and line back and compares it with
scoring's ROC, numpy.histogram and the threshold. Which clips each curve is drawn on is
scoring.figure_subsets, the year's rule; this file only draws. Every figure is returned as a
string; asd.py writes it (data.write_atomic). Each drawing area is a <g class="panel"> whose
data-* attributes give its place in pixels and the data range it shows, so that a reader (or a
test) can map any point back to data. Left out: log axes, interactivity, raster output.
"""
import html

import numpy as np

import scoring

PANEL = 260                  # px: width and height of one drawing area
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 34, 46   # px around a drawing area (ticks, labels, title)
CELL_W, CELL_H = LEFT + PANEL + RIGHT, TOP + PANEL + BOTTOM
LEGEND_ROOM = 76             # px below a ROC panel: its legend (up to 5 lines) stays off the curves
HEADER = 34                  # px: the figure's title line
COLUMNS = 4                  # ROC panels per row
N_BINS = 24                  # histogram bins, shared by the series of one figure
FONT = 11                    # px
LEGEND_FONT = 10             # px; a character of it is about 0.56 of that wide
COLOURS = {"source": "#1f77b4", "target": "#ff7f0e", "all clips": "#444444",
           "normal": "#1f77b4", "anomaly": "#d62728",
           "held-out normal": "#2ca02c", "scored": "#9467bd"}
SVG_NS = "http://www.w3.org/2000/svg"


def colour(name):
    return COLOURS.get(name, "#2ca02c")


def _num(v):
    return f"{v:.2f}"        # pixel coordinates: 1/100 px is finer than any screen


def _text(x, y, s, *, anchor="start", size=FONT, weight="normal", rotate=False):
    turn = f' transform="rotate(-90 {_num(x)} {_num(y)})"' if rotate else ""
    return (f'<text x="{_num(x)}" y="{_num(y)}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}"{turn}>{html.escape(str(s))}</text>')


# ---------------------------------------------------------------------------------------
# One drawing area: pixels from data, axes, ticks


class Panel:
    """A drawing area PANEL x PANEL px with its top-left corner at (left, top) px, showing
    x in [x0, x1] and y in [y0, y1] (y upwards)."""

    def __init__(self, left, top, x_range, y_range):
        self.left, self.top = left, top
        (self.x0, self.x1), (self.y0, self.y1) = x_range, y_range

    def x(self, v):
        return self.left + (v - self.x0) / (self.x1 - self.x0) * PANEL

    def y(self, v):
        return self.top + PANEL - (v - self.y0) / (self.y1 - self.y0) * PANEL

    def points(self, xs, ys):
        return " ".join(f"{_num(self.x(a))},{_num(self.y(b))}" for a, b in zip(xs, ys))

    def open(self, kind, **about):
        """The panel's <g>: its pixel box, data range and `about` in data-* attributes."""
        extra = "".join(f' data-{k}="{html.escape(str(v))}"' for k, v in about.items())
        return (f'<g class="panel {kind}" data-left="{self.left}" data-top="{self.top}" '
                f'data-size="{PANEL}" data-x0="{self.x0!r}" data-x1="{self.x1!r}" '
                f'data-y0="{self.y0!r}" data-y1="{self.y1!r}"{extra}>')

    def axes(self, title, xlabel, ylabel, xticks, yticks):
        """Frame, ticks with labels, axis titles and the title above."""
        out = [f'<rect x="{self.left}" y="{self.top}" width="{PANEL}" height="{PANEL}" '
               f'fill="none" stroke="#000" stroke-width="1"/>']
        bottom = self.top + PANEL
        for v in xticks:
            x = self.x(v)
            out.append(f'<line x1="{_num(x)}" y1="{bottom}" x2="{_num(x)}" y2="{bottom + 4}" '
                       f'stroke="#000"/>')
            out.append(_text(x, bottom + 15, f"{v:g}", anchor="middle"))
        for v in yticks:
            y = self.y(v)
            out.append(f'<line x1="{self.left - 4}" y1="{_num(y)}" x2="{self.left}" '
                       f'y2="{_num(y)}" stroke="#000"/>')
            out.append(_text(self.left - 6, y + 4, f"{v:g}", anchor="end"))
        out.append(_text(self.left + PANEL / 2, bottom + 32, xlabel, anchor="middle"))
        out.append(_text(self.left - 40, self.top + PANEL / 2, ylabel, anchor="middle",
                         rotate=True))
        out.append(_text(self.left + PANEL / 2, self.top - 10, title, anchor="middle",
                         weight="bold"))
        return out

    def legend(self, entries, *, corner="below"):
        """entries: [(colour or None, text)], a small box of lines inside the panel at a corner
        ("top-right", "bottom-right"), or below it, under the axis title."""
        width = 30 + max(len(t) for _, t in entries) * LEGEND_FONT * 0.56
        height = 6 + 14 * len(entries)
        x = self.left + PANEL - width - 6 if corner.endswith("right") else self.left - 30
        y = (self.top + PANEL + BOTTOM - 6 if corner == "below" else
             self.top + PANEL - height - 6 if corner.startswith("bottom") else self.top + 6)
        out = [f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(width)}" height="{height}" '
               f'fill="#fff" fill-opacity="0.85" stroke="#bbb"/>']
        for i, (swatch, label) in enumerate(entries):
            row = y + 13 + 14 * i
            if swatch is not None:
                out.append(f'<rect x="{_num(x + 6)}" y="{_num(row - 8)}" width="14" '
                           f'height="8" fill="{swatch}" stroke="#888" stroke-width="0.5"/>')
            out.append(_text(x + 26, row, label, size=LEGEND_FONT))
        return out


def svg_document(width, height, title, body):
    """A standalone SVG (also valid inline in HTML5 and XHTML); as wide as its title needs."""
    width = max(width, round(24 + 0.62 * 13 * len(title)))      # 13-px bold sans-serif
    return "\n".join([f'<svg xmlns="{SVG_NS}" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
                      f"<title>{html.escape(title)}</title>",
                      f'<rect width="{width}" height="{height}" fill="#fff"/>',
                      _text(12, 22, title, size=13, weight="bold"), *body, "</svg>"]) + "\n"


# ---------------------------------------------------------------------------------------
# ROC curves


def roc_panel(panel, title, curves, undefined=(), max_fpr=scoring.MAX_FPR, **about):
    """curves: [(name, fpr, tpr, figures)], figures {"AUC": 0.91, "pAUC": ...}; the area under a
    curve carrying a pAUC is shaded for FPR <= max_fpr, the region its pAUC measures.
    undefined: legend lines for the curves that cannot be drawn (a domain absent)."""
    ticks = [0, 0.2, 0.4, 0.6, 0.8, 1]
    out = [panel.open("roc", **about),
           f'<rect class="pauc-region" x="{_num(panel.x(0))}" y="{panel.top}" '
           f'width="{_num(panel.x(max_fpr) - panel.x(0))}" height="{PANEL}" fill="#e6e6e6"/>',
           *panel.axes(title, "false-positive rate", "true-positive rate", ticks, ticks)]
    for name, fpr, tpr, figures in curves:
        if "pAUC" in figures:
            f, t = scoring.roc_up_to(fpr, tpr, max_fpr)
            out.append(f'<polygon class="pauc-area" data-name="{html.escape(name)}" '
                       f'points="{panel.points([*f, max_fpr, 0], [*t, 0, 0])}" '
                       f'fill="{COLOURS[name]}" fill-opacity="0.25"/>')
    out.append(f'<line x1="{_num(panel.x(0))}" y1="{_num(panel.y(0))}" x2="{_num(panel.x(1))}" '
               f'y2="{_num(panel.y(1))}" stroke="#999" stroke-dasharray="3,3"/>')
    for name, fpr, tpr, _ in curves:     # every clip's curve dashed: it may lie on another
        dash = ' stroke-dasharray="6,3"' if name == "all clips" and len(curves) > 1 else ""
        out.append(f'<polyline class="roc" data-name="{html.escape(name)}" '
                   f'points="{panel.points(fpr, tpr)}" fill="none" stroke="{COLOURS[name]}" '
                   f'stroke-width="2"{dash}/>')
    entries = [(COLOURS[n], f"{n}: " + ", ".join(f"{k} {v:.3f}" for k, v in figs.items()))
               for n, _, _, figs in curves]
    entries += [(None, line) for line in undefined]
    entries.append(("#e6e6e6", f"FPR <= {max_fpr:g}: pAUC region"))
    out += panel.legend(entries)
    out.append("</g>")
    return out


FIGURE_NAMES = {"auc": "AUC", "pauc": "pAUC", "auc_source": "AUC", "auc_target": "AUC"}
FIGURE_TITLES_SHORT = {"auc_source": "source", "auc_target": "target"}   # 2022+


def section_curves(year, rows, section_row):
    """The curves of one section: [(name, fpr, tpr, {figure: value})], each on the clips its
    official figure takes (scoring.figure_subsets); rows: that section's labelled rows;
    section_row(name) -> the result row holding its figures."""
    label = np.array([r["label"] for r in rows])
    score = np.array([r["score"] for r in rows], dtype=float)
    curves = []
    for name, mask, keys in scoring.figure_subsets(year, label, [r["domain"] for r in rows]):
        fpr, tpr = scoring.roc_points(label[mask], score[mask])
        row = section_row(name)
        curves.append((name, fpr, tpr, {FIGURE_NAMES[k]: row[k] for k in keys}))
    return curves


# ---------------------------------------------------------------------------------------
# Score histograms


def bin_edges(values, threshold=None):
    """N_BINS equal bins spanning every value (and the threshold), shared by all series of a
    figure so that their bars line up. Returns (N_BINS + 1,) edges."""
    v = np.concatenate([np.asarray(x, dtype=float).ravel() for x in values])
    lo, hi = float(v.min()), float(v.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, N_BINS + 1)


def nice_ticks(lo, hi, n=5, *, integer=False):
    """About n round tick values within [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    raw = (hi - lo) / n
    power = 10.0 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= 0.7 * raw)   # n-1 to n+2 ticks
    if integer:
        step = max(1.0, np.ceil(step))
    first = np.ceil(lo / step) * step
    return [float(v) + 0.0 for v in np.arange(first, hi + step * 1e-9, step)]   # no -0


def histogram_panel(panel_at, title, series, edges, threshold, xlabel="anomaly score",
                    **about):
    """series: [(name, scores)]; bars of numpy.histogram(scores, edges), drawn over each other
    half transparent, and the threshold as a dashed vertical line (None: not known).
    panel_at(x_range, y_range) -> the Panel to draw in."""
    counts = [np.histogram(np.asarray(s, dtype=float), edges)[0] for _, s in series]
    top = max(1, max(int(c.max()) for c in counts))
    pad = 0.03 * float(edges[-1] - edges[0])       # the outer bars and the line clear the frame
    # the upper third stays free for the legend
    panel = panel_at((float(edges[0]) - pad, float(edges[-1]) + pad), (0.0, top * 1.5))
    out = [panel.open("histogram", **about)]
    for (name, scores), c in zip(series, counts):
        for a, b, n in zip(edges[:-1], edges[1:], c):
            if n:
                out.append(f'<rect class="bar" data-name="{html.escape(name)}" '
                           f'x="{_num(panel.x(a))}" y="{_num(panel.y(n))}" '
                           f'width="{_num(panel.x(b) - panel.x(a))}" '
                           f'height="{_num(panel.y(0) - panel.y(n))}" fill="{colour(name)}" '
                           f'fill-opacity="0.55" stroke="{colour(name)}" stroke-width="0.5"/>')
    entries = [(colour(name), f"{name} ({len(s)})") for name, s in series]
    if threshold is not None:
        x = _num(panel.x(threshold))
        out.append(f'<line class="threshold" data-value="{threshold!r}" x1="{x}" '
                   f'y1="{panel.top}" x2="{x}" y2="{panel.top + PANEL}" stroke="#000" '
                   f'stroke-width="1.5" stroke-dasharray="5,3"/>')
        entries.append(("#000", f"threshold {threshold:.4g}"))
    else:
        entries.append((None, "threshold: not known"))
    out += panel.axes(title, xlabel, "clips", nice_ticks(panel.x0, panel.x1),
                      nice_ticks(0, top * 1.5, integer=True))
    out += panel.legend(entries, corner="top-right")
    out.append("</g>")
    return out


# ---------------------------------------------------------------------------------------
# Whole figures


def machine_svg(result, rows, machine, threshold, max_fpr=scoring.MAX_FPR):
    """One machine type's figure: a ROC panel per section (COLUMNS to a row), then a score
    histogram per domain present (normal against anomalous, with the threshold). result: an
    official_score() result; rows: the labelled rows of this machine (machine, section,
    domain, label, score); threshold: its model's decision threshold, or None."""
    year = result["year"]
    sections = sorted({r["section"] for r in rows})
    n_rows = -(-len(sections) // COLUMNS)
    body = []
    for i, section in enumerate(sections):
        mine = [r for r in rows if r["section"] == section]
        found = {r["domain"]: r for r in result["sections"]
                 if r["machine"] == machine and r["section"] == section}
        curves = section_curves(year, mine, lambda name: found.get(name, found.get(None)))
        undefined = [f"{r['domain'] or FIGURE_TITLES_SHORT[key]}: undefined ({reason})"
                     for r in found.values() for key, reason in r.get("undefined", {}).items()]
        panel = Panel(LEFT + (i % COLUMNS) * CELL_W,
                      HEADER + TOP + (i // COLUMNS) * (CELL_H + LEGEND_ROOM),
                      (0.0, 1.0), (0.0, 1.0))
        body += roc_panel(panel, f"{'ID' if year == 2020 else 'section'} {section}", curves,
                          sorted(set(undefined)), max_fpr, section=section)
    domains = [None] if year == 2020 else [d for d in scoring.DOMAINS
                                          if any(r["domain"] == d for r in rows)]
    edges = bin_edges([[r["score"] for r in rows]], threshold)
    top = HEADER + TOP + n_rows * (CELL_H + LEGEND_ROOM)
    for j, domain in enumerate(domains):
        mine = [r for r in rows if domain is None or r["domain"] == domain]
        series = [(name, [r["score"] for r in mine if r["label"] == label])
                  for name, label in (("normal", 0), ("anomaly", 1))]
        body += histogram_panel(lambda xr, yr: Panel(LEFT + j * CELL_W, top, xr, yr),
                                f"{domain or 'all'} test clips", series, edges, threshold,
                                domain=domain or "all")
    width = max(min(len(sections), COLUMNS), len(domains)) * CELL_W
    height = HEADER + n_rows * (CELL_H + LEGEND_ROOM) + CELL_H
    title = (f"{machine}, DCASE {year} rules: ROC per {'ID' if year == 2020 else 'section'} "
             f"(shaded: FPR <= {max_fpr:g}, the pAUC); test scores per domain")
    return svg_document(width, height, title, body)


def score_svg(scores, threshold, held_out, *, title, held_name="held-out normal"):
    """score --plot: the histogram of the scored files' scores beside the scores that the
    threshold was fitted to (the held-out normal clips'), with the threshold."""
    series = [("scored", scores)] + ([(held_name, held_out)] if len(held_out) else [])
    edges = bin_edges([s for _, s in series], threshold)
    body = histogram_panel(lambda xr, yr: Panel(LEFT, HEADER + TOP, xr, yr),
                           "anomaly scores", series, edges, threshold)
    return svg_document(CELL_W, HEADER + CELL_H, title, body)


# ---------------------------------------------------------------------------------------
# results.html


def _cell(v):
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


CAPTION = ("Per machine type: the ROC curve of every section and domain, each on the clips its "
           "official figure takes (2022 on: a domain's normal clips with all anomalies; dashed: "
           "every clip, which the pAUC takes), the pAUC region (false-positive rate up to "
           f"{scoring.MAX_FPR:g}) shaded; below, the test scores of normal and anomalous clips "
           "per domain, with the model's decision threshold (dashed line).")


def results_html(title, header, table, notes, svgs):
    """A self-contained page (XHTML, so any browser and any XML reader takes it): the results
    table (results.comparison_rows), notes (lines shown under it), and the SVG figures
    inline, one per machine type ({machine: svg text})."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                     for row in table)
    figures = "\n".join(f'<h2>{html.escape(m)}</h2>\n<div class="figure">\n{svg}</div>'
                        for m, svg in svgs.items())
    caption = f'<p class="caption">{html.escape(CAPTION)}</p>\n' if svgs else ""
    notes = "\n".join(f"<p>{html.escape(n)}</p>" for n in notes if n)
    style = ("body{font-family:sans-serif;margin:24px;color:#111}"
             "table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:nth-child(-n+3),th{text-align:left}th{background:#f3f3f3}"
             ".figure{overflow-x:auto}")
    return (f'<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en">\n'
            f'<head>\n<meta charset="utf-8"/>\n<title>{html.escape(title)}</title>\n'
            f"<style>{style}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"
            f"{notes}\n{caption}{figures}\n</body>\n</html>\n")
