"""Terminal charts as pure functions: numbers, a sparkline, braille line charts, bar charts.

Each takes data and a width (and a height) and returns a rich ``Text`` that is never
wider than that width, so a renderer can be tested as captured colourless text at a
fixed width (STYLE.md lesson 12). Several series on one chart overlay, each in its own
colour, with a legend; where two series meet in one character cell the later one's
colour shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from rich.text import Text

# one colour per run (or per series), in order; the HTML report uses the same hues
PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red")
HEX = {"cyan": "#0e9aa7", "magenta": "#c2188f", "green": "#2e8b3a", "yellow": "#c99a06", "blue": "#2f5fd0",
       "red": "#d03030"}
_BLOCKS = "▁▂▃▄▅▆▇█"
_BRAILLE = 0x2800
_DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row of 4][column of 2] within a cell


def num(v: Optional[float], digits: int = 4) -> str:
    """``v`` in ``digits`` significant figures; zero is ``0``, never ``-0``; None is ``-``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.{digits}g}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def plural(n: int, word: str, many: str = "") -> str:
    """``1 model``, ``2 models``, ``0 steps``; ``many`` where adding an s will not do (``mini-batches``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def sparkline(values: Sequence[float], width: int) -> str:
    """Block characters for ``values``, at most ``width`` of them (consecutive values averaged)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values or width < 1:
        return ""
    per = math.ceil(len(values) / width)
    pts = [sum(values[i:i + per]) / len(values[i:i + per]) for i in range(0, len(values), per)]
    lo, hi = min(pts), max(pts)
    return "".join(_BLOCKS[int((v - lo) / (hi - lo) * 7) if hi > lo else 0] for v in pts)


@dataclass
class Series:
    """One curve: its label (a run's name), its points and its colour."""

    label: str
    xs: list[float]
    ys: list[float]
    color: str = PALETTE[0]

    def finite(self) -> list[tuple[float, float]]:
        return [(x, y) for x, y in zip(self.xs, self.ys) if isinstance(y, (int, float)) and math.isfinite(y)]


def bounds(series: Sequence[Series]) -> Optional[tuple[float, float, float, float]]:
    """(x_lo, x_hi, y_lo, y_hi) over every finite point, widened where flat; None without points."""
    pts = [p for s in series for p in s.finite()]
    if not pts:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    y_lo, y_hi = min(ys), max(ys)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    return min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, y_lo, y_hi


def _segment(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[int, int]]:
    """Dots from ``a`` to ``b`` inclusive (Bresenham)."""
    (x0, y0), (x1, y1) = a, b
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err, out = dx + dy, []
    while True:
        out.append((x0, y0))
        if (x0, y0) == (x1, y1):
            return out
        e2 = 2 * err
        if e2 >= dy:
            err, x0 = err + dy, x0 + sx
        if e2 <= dx:
            err, y0 = err + dx, y0 + sy


def _canvas(series: Sequence[Series], cols: int, rows: int, box: tuple[float, float, float, float]):
    """Per cell: its braille bits and the colour of the last series drawn through it."""
    x_lo, x_hi, y_lo, y_hi = box
    bits = [[0] * cols for _ in range(rows)]
    color: list[list[Optional[str]]] = [[None] * cols for _ in range(rows)]
    w, h = 2 * cols - 1, 4 * rows - 1
    for s in series:
        dots = [(round((x - x_lo) / (x_hi - x_lo) * w), round((y_hi - y) / (y_hi - y_lo) * h)) for x, y in s.finite()]
        path = [d for a, b in zip(dots, dots[1:]) for d in _segment(a, b)] if len(dots) > 1 else dots
        for px, py in path:
            r, c = py // 4, px // 2
            bits[r][c] |= _DOT[py % 4][px % 2]
            color[r][c] = s.color
    return bits, color


def line_chart(title: str, series: Sequence[Series], width: int, height: int = 6) -> Text:
    """A titled braille line chart of ``series`` in ``width`` columns and ``height`` plot rows:
    the title with each series' last, min and max, the y range on the left, the x range below."""
    out = Text()
    out.append(_fit(title, width) + "\n", style="bold")
    box = bounds(series)
    if box is None:
        return out.append("(no values)\n", style="dim")
    for s in series:
        ys = [y for _, y in s.finite()]
        if ys:
            who = f"{s.label}: " if len(series) > 1 else ""
            out.append(_fit(f"  {who}last {num(ys[-1])}  min {num(min(ys))}  max {num(max(ys))}", width) + "\n", style=s.color)
    labels = [num(box[3], 3), num(box[2], 3)]
    pad = max(len(x) for x in labels)
    cols = max(4, width - pad - 1)
    bits, color = _canvas(series, cols, height, box)
    for r in range(height):
        label = labels[0] if r == 0 else labels[1] if r == height - 1 else ""
        out.append(label.rjust(pad) + "┤", style="dim")
        for c in range(cols):
            out.append(chr(_BRAILLE + bits[r][c]) if bits[r][c] else " ", style=color[r][c] or "")
        out.append("\n")
    lo, hi = f"step {num(box[0], 6)}", f"{num(box[1], 6)}"
    out.append(_fit(" " * (pad + 1) + lo + hi.rjust(max(1, cols - len(lo))), width) + "\n", style="dim")
    return out


def legend(series: Sequence[Series], width: int) -> Text:
    """``━━ label`` for each series, in its colour, wrapped to ``width``."""
    out, used = Text(), 0
    for s in series:
        item = f"━━ {s.label}  "
        if used and used + len(item) > width:
            out.append("\n")
            used = 0
        out.append(_fit(item, width), style=s.color)
        used += len(item)
    return out


def bar_chart(rows: Sequence[tuple[str, float, str]], width: int, color: str = PALETTE[0]) -> Text:
    """Horizontal bars: ``(label, value, figure text)`` per row, longest bar for the largest value."""
    out = Text()
    if not rows:
        return out
    name_w = min(max(len(r[0]) for r in rows), max(8, width // 3))
    fig_w = max(len(r[2]) for r in rows)
    bar_w = max(1, width - name_w - fig_w - 2)
    top = max(r[1] for r in rows) or 1.0
    for label, value, figure in rows:
        n = max(0, round(bar_w * value / top))
        out.append(_fit(label, name_w).ljust(name_w) + " ")
        out.append("█" * n, style=color)
        out.append(" " * (bar_w - n) + " " + figure.rjust(fig_w) + "\n")
    return out


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters (with an ellipsis when cut)."""
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"
