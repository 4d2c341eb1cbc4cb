"""``rlflow report RUN [RUN ...] --html FILE``: one self-contained HTML page of the runs.

The same charts as the terminal dashboard (:mod:`rlflow.report`) drawn as inline SVG —
curves overlaid per metric, each run in its colour, time per node as bars — plus each
run's graph (stages left to right, nodes coloured by their model) and its last samples.
Nothing is fetched: no script, no font, no stylesheet from elsewhere, so the page opens
offline and can be mailed or attached as it is. Pure functions of the runs; no torch.
"""

from __future__ import annotations

from html import escape
from typing import Any, Optional

from rlflow.charts import HEX, Series, bounds, num
from rlflow.records import node_totals
from rlflow.report import RunData, chart_keys, headline, labels, series

CHART_W, CHART_H = 440, 210
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 56, 12, 38, 30  # the title and a row of legend above the plot

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
.swatch { display: inline-block; width: 14px; height: 4px; margin-right: 6px; vertical-align: middle; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
code, .mono { font-family: ui-monospace, monospace; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def _hex(color: str) -> str:
    return HEX.get(color, color)


def svg_chart(title: str, lines: list[Series], width: int = CHART_W, height: int = CHART_H) -> str:
    """A line chart: one polyline per series, the y range and x range on the axes, a legend."""
    box = bounds(lines)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}"><text x="{_PAD_L}" y="16" font-weight="bold">{escape(title)}</text>']
    if box is None:
        return "".join(out) + '<text x="60" y="100">(no values)</text></svg>'
    x_lo, x_hi, y_lo, y_hi = box
    pw, ph = width - _PAD_L - _PAD_R, height - _PAD_T - _PAD_B

    def xy(x: float, y: float) -> str:
        return f"{_PAD_L + (x - x_lo) / (x_hi - x_lo) * pw:.1f},{_PAD_T + (y_hi - y) / (y_hi - y_lo) * ph:.1f}"

    out.append(f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>')
    out.append(f'<text x="{_PAD_L - 4}" y="{_PAD_T + 10}" text-anchor="end">{num(y_hi, 3)}</text>'
               f'<text x="{_PAD_L - 4}" y="{_PAD_T + ph}" text-anchor="end">{num(y_lo, 3)}</text>'
               f'<text x="{_PAD_L}" y="{height - 12}">step {num(x_lo, 6)}</text>'
               f'<text x="{width - _PAD_R}" y="{height - 12}" text-anchor="end">{num(x_hi, 6)}</text>')
    for i, s in enumerate(lines):
        pts = " ".join(xy(x, y) for x, y in s.finite())
        ys = [y for _, y in s.finite()]
        out.append(f'<polyline class="series" fill="none" stroke="{_hex(s.color)}" stroke-width="2" points="{pts}">'
                   f'<title>{escape(s.label)}: last {num(ys[-1])}, min {num(min(ys))}, max {num(max(ys))}</title></polyline>')
        if len(lines) > 1:
            out.append(f'<text x="{_PAD_L + 130 * i}" y="{_PAD_T - 8}" fill="{_hex(s.color)}">━ {escape(s.label)}</text>')
    return "".join(out) + "</svg>"


def svg_bars(run: RunData, width: int = 640) -> str:
    """Time per node over the run as horizontal bars, the slowest first."""
    totals = sorted(node_totals(run.records).items(), key=lambda kv: -kv[1]["total_s"])
    whole = sum(v["total_s"] for _, v in totals) or 1.0
    top = max((v["total_s"] for _, v in totals), default=1.0) or 1.0
    row_h, label_w, fig_w = 22, 160, 190
    bar_w = width - label_w - fig_w
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row_h * len(totals) + 8}">']
    for i, (name, v) in enumerate(totals):
        y = 4 + i * row_h
        figure = f"{v['total_s']:.2f}s  {100 * v['total_s'] / whole:.1f}%" + (
            f"  {v['tokens_per_s']:.0f} tok/s" if v["tokens_per_s"] else "")
        out.append(f'<text x="0" y="{y + 14}">{escape(name)}</text>'
                   f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{max(1.0, bar_w * v["total_s"] / top):.1f}" '
                   f'height="{row_h - 8}" fill="{_hex(run.color)}"/>'
                   f'<text x="{label_w + bar_w + 8}" y="{y + 14}">{escape(figure)}</text>')
    return "".join(out) + "</svg>"


def svg_graph(config: Optional[dict[str, Any]]) -> str:
    """The run's graph from its config.json: a column per stage (the update last), nodes
    coloured by model, an edge per producer -> reader with its columns on hover."""
    if not config:
        return "<p>(no config.json)</p>"
    try:
        from rlflow.graph import DATA, build
        from rlflow.spec import Pipeline
        from rlflow.view import flow_line, model_colors

        pg = build(Pipeline.from_config(config))
    except Exception as e:  # noqa: BLE001 - a config that no longer loads still gets its charts
        return f"<p>(the graph could not be rebuilt from config.json: {escape(str(e))})</p>"
    updates = [n.name for n in pg.pipeline.nodes if n.stage == "update"]
    columns = pg.stages() + ([updates] if updates else [])
    colors = model_colors(pg.pipeline.models)
    box_w, box_h, gap_x, gap_y = 170, 44, 60, 18
    pos = {name: (10 + c * (box_w + gap_x), 10 + r * (box_h + gap_y)) for c, names in enumerate(columns)
           for r, name in enumerate(names)}
    width = 20 + len(columns) * (box_w + gap_x)
    height = 20 + max((len(c) for c in columns), default=1) * (box_h + gap_y)
    out = [f'<p class="mono">{escape(flow_line(pg))}</p>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>']
    for src, dst, d in pg.graph.edges(data=True):
        if src == DATA or src not in pos or dst not in pos:
            continue
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        out.append(f'<path class="edge" d="M{x0 + box_w},{y0 + box_h / 2} C{x0 + box_w + gap_x / 2},{y0 + box_h / 2} '
                   f'{x1 - gap_x / 2},{y1 + box_h / 2} {x1},{y1 + box_h / 2}" fill="none" stroke="#888" '
                   f'marker-end="url(#arrow)"><title>{escape(", ".join(d["columns"]))}</title></path>')
    for name, (x, y) in pos.items():
        node = pg.node(name)
        model = next(iter(node.model_refs().values()), None)
        fill = _hex(colors[model]) if model in colors else "#777"
        out.append(f'<rect class="node" x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{fill}" '
                   f'fill-opacity="0.18" stroke="{fill}"/><text x="{x + 8}" y="{y + 18}" font-weight="bold">'
                   f'{escape(name)}</text><text x="{x + 8}" y="{y + 34}">{escape(node.label())}'
                   f'{escape(" @" + model) if model else ""}</text>')
    return "".join(out) + "</svg>"


def _samples_table(run: RunData, n: int) -> str:
    rows = "".join(f"<tr><td>{s['step']}</td><td>{escape(str(s.get('prompt', '')))}</td>"
                   f"<td>{escape(str(s.get('response', '')))}</td><td>{escape(str(s.get('answer', '')))}</td>"
                   f"<td>{num(s['reward']) if isinstance(s.get('reward'), (int, float)) else ''}</td></tr>"
                   for s in run.samples[-n:])
    return ("<table><tr><th>step</th><th>prompt</th><th>response</th><th>expected</th><th>reward</th></tr>"
            f"{rows}</table>") if rows else "<p>(no samples)</p>"


def html_page(runs: list[RunData], samples: int = 8) -> str:
    """The whole page: the runs' headlines, the curves, time per node, graphs and samples."""
    names = labels(runs)
    head = "".join(f'<li><span class="swatch" style="background:{_hex(r.color)}"></span>{escape(headline(r, n))}</li>'
                   for r, n in zip(runs, names))
    charts = "".join(svg_chart(k, series(runs, k)) for k in chart_keys(runs))
    bars = "".join(f"<h3>{escape(n)}</h3>{svg_bars(r)}" for r, n in zip(runs, names))
    graphs = "".join(f"<h3>{escape(n)}</h3>{svg_graph(r.config)}" for r, n in zip(runs, names))
    table = "".join(f"<h3>{escape(n)}</h3>{_samples_table(r, samples)}" for r, n in zip(runs, names))
    title = "rlflow report: " + ", ".join(names)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1><ul>{head}</ul>"
            f'<h2>Curves</h2><div class="grid">{charts or "<p>(no curves recorded)</p>"}</div>'
            f"<h2>Time per node</h2>{bars}<h2>Graph</h2>{graphs}<h2>Samples</h2>{table}</body></html>\n")

