"""``rlflow report RUN [RUN ...]``: what finished (or unfinished) runs recorded, as a terminal
dashboard — curves, time per node, samples — that fits the terminal's width.

Reading a run (:func:`load_run`) is separate from drawing it (:func:`dashboard`, a pure
function of the runs and a width, tested as captured text). Each chart is one metric;
several runs overlay on it, each in its own colour, named in the legend. The HTML page of
the same charts is :mod:`rlflow.page`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Group
from rich.text import Text

from rlflow.charts import PALETTE, Series, bar_chart, legend, line_chart, num, plural, sparkline
from rlflow.loader import UserError
from rlflow.records import node_totals, prefixed_means, reward_window

# charts in the order shown: a metric, or a prefix that gives one chart per metric under it
CURVES = ("reward/mean", "reward/", "eval/", "kl/mean", "rewards/kl_penalty", "entropy/mean", "response_length/mean",
          "grad_norm/", "clip_frac", "perf/mfu")
CHART_HEIGHT = 6
MIN_CHART_WIDTH = 44


@dataclass
class RunData:
    """What a run directory holds: its records, samples, summary and config."""

    path: Path
    records: list[dict[str, Any]]
    samples: list[dict[str, Any]] = field(default_factory=list)
    summary: Optional[dict[str, Any]] = None
    config: Optional[dict[str, Any]] = None
    bad: list[str] = field(default_factory=list)  # lines or files that could not be read
    color: str = PALETTE[0]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def pipeline(self) -> str:
        """The pipeline's name (from the summary or config.json), else the directory's."""
        return (self.summary or {}).get("pipeline") or (self.config or {}).get("name") or self.name


def read_records(path: Path, bad: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a run's jsonl file, one per line; each unreadable line is noted in ``bad``."""
    records = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{i}: not valid JSON ({e.msg}; a truncated line?)")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        else:
            bad.append(f"{path}:{i}: not a record (a JSON object with a 'step')")
    return records


def _read_json(path: Path, bad: list[str]) -> Optional[dict[str, Any]]:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        bad.append(f"{path}: not valid JSON ({e.msg})")
        return None
    return data if isinstance(data, dict) else None


def load_run(path: str | Path, color: str = PALETTE[0]) -> RunData:
    """A run directory's files (RF109 when it is not one); unreadable lines are kept in ``bad``."""
    run = Path(path)
    if not run.is_dir():
        raise UserError("RF109", f"{run}: " + ("no such directory" if not run.exists() else "not a run directory (a file)"))
    if not (run / "metrics.jsonl").is_file():
        raise UserError("RF109", f"{run}: not a run directory (no metrics.jsonl)")
    bad: list[str] = []
    records = read_records(run / "metrics.jsonl", bad)
    samples = read_records(run / "samples.jsonl", bad) if (run / "samples.jsonl").exists() else []
    return RunData(run, records, samples, _read_json(run / "summary.json", bad), _read_json(run / "config.json", bad),
                   bad, color)


def labels(runs: list[RunData]) -> list[str]:
    """A short label per run: its pipeline's name, with the directory when two share one."""
    names = [r.pipeline for r in runs]
    return [f"{n} ({r.name})" if names.count(n) > 1 else n for n, r in zip(names, runs)]


# --- the curves ---------------------------------------------------------------------------


def _points(run: RunData, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; a held-out figure also at step 0 (before) and the last step (after)."""
    pts = {r["step"]: r[key] for r in run.records if isinstance(r.get(key), (int, float))}
    if key.startswith("eval/") and run.summary:
        before, after = run.summary.get("eval_before") or {}, run.summary.get("eval_after") or {}
        if key in before:
            pts.setdefault(0, before[key])
        if key in after:
            pts[int(run.summary.get("steps") or max(pts, default=0))] = after[key]
    steps = sorted(pts)
    return [float(s) for s in steps], [float(pts[s]) for s in steps]


def chart_keys(runs: list[RunData]) -> list[str]:
    """The metrics that get a chart: those of :data:`CURVES` that some run recorded."""
    seen: set[str] = set()
    for r in runs:
        for rec in r.records:
            seen.update(k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        for part in ("eval_before", "eval_after"):
            seen.update(((r.summary or {}).get(part) or {}).keys())
    out: list[str] = []
    for c in CURVES:
        found = sorted(k for k in seen if k.startswith(c)) if c.endswith("/") else ([c] if c in seen else [])
        out += [k for k in found if k not in out]
    return out


def series(runs: list[RunData], key: str) -> list[Series]:
    """One series per run that has ``key``, in the run's colour."""
    out = []
    for run, label in zip(runs, labels(runs)):
        xs, ys = _points(run, key)
        if ys:
            out.append(Series(label, xs, ys, run.color))
    return out


def grid(blocks: list[Text], width: int, cols: int) -> Text:
    """Charts side by side, ``cols`` to a row, each padded to its share of ``width``."""
    cell = (width - 2 * (cols - 1)) // cols
    out = Text()
    for i in range(0, len(blocks), cols):
        row = [b.split("\n", allow_blank=True) for b in blocks[i:i + cols]]
        height = max(len(r) for r in row)
        for line in range(height):
            for j, lines in enumerate(row):
                piece = lines[line].copy() if line < len(lines) else Text()
                piece.truncate(cell)
                out.append(piece)
                if j < len(row) - 1:
                    out.append(" " * (cell - len(piece)) + "  ")
            out.append("\n")
    return out


def curves(runs: list[RunData], width: int) -> Text:
    """Every chart of :func:`chart_keys`, as many to a row as fit in ``width``."""
    cols = max(1, min(3, (width + 2) // (MIN_CHART_WIDTH + 2)))
    cell = (width - 2 * (cols - 1)) // cols
    blocks = [line_chart(key, series(runs, key), cell, CHART_HEIGHT) for key in chart_keys(runs)]
    return grid(blocks, width, cols) if blocks else Text("no curves recorded\n", style="dim")


# --- time, samples, the headline ------------------------------------------------------------


def node_bars(run: RunData, width: int) -> Text:
    """Time per node over the run, the slowest first: bar, total seconds, share, tokens/s and
    the MFU of the node's model (its mean ``perf/mfu/<model>``, where recorded)."""
    from rlflow.view import mfu_by_node, node_models

    totals = node_totals(run.records)
    mfu = mfu_by_node(totals, prefixed_means(run.records, "perf/mfu/"), node_models(run.config or {}))
    whole = sum(v["total_s"] for v in totals.values()) or 1.0
    rows = [(name, v["total_s"], f"{v['total_s']:.2f}s {100 * v['total_s'] / whole:5.1f}%  "
             + (f"{v['tokens_per_s']:.0f} tok/s" if v["tokens_per_s"] else "-")
             + (f"  MFU {100 * mfu[name]:.1f}%" if name in mfu else ""))
            for name, v in sorted(totals.items(), key=lambda kv: -kv[1]["total_s"])]
    return bar_chart(rows, width, run.color)


def sample_lines(run: RunData, n: int, width: int) -> Text:
    """The last ``n`` samples: prompt, response, the expected answer and the reward."""
    out = Text()
    for s in run.samples[-n:] if n else []:
        expected = f"  expected {s['answer']!r}" if s.get("answer") not in (None, "") else ""
        reward = f"  reward {num(s['reward'])}" if isinstance(s.get("reward"), (int, float)) else ""
        line = f"step {s['step']}: {s.get('prompt')!r} -> {s.get('response')!r}{expected}{reward}"
        out.append((line if len(line) <= width else line[: width - 1] + "…") + "\n")
    return out


def headline(run: RunData, label: str) -> str:
    """A run in a line: its pipeline, steps and time, reward at the start -> at the end (the
    summary's figure), held-out figures before -> after."""
    steps = run.summary["steps"] if run.summary else len(run.records)
    seconds = run.summary["seconds"] if run.summary else sum(r.get("seconds", 0.0) for r in run.records)
    parts = [f"{label}: {plural(steps, 'step')} in {seconds:.1f}s" + ("" if run.summary else " (did not finish)")]
    start, end, k = reward_window([r["reward/mean"] for r in run.records if isinstance(r.get("reward/mean"), (int, float))])
    if start is not None:
        parts.append(f"reward {num(start)} -> {num(end)} (first/last {plural(k, 'step')})")
    before, after = ((run.summary or {}).get(k) or {} for k in ("eval_before", "eval_after"))
    for key, a in after.items():
        if key in before:
            parts.append(f"{key.removeprefix('eval/')} {100 * before[key]:.1f}% -> {100 * a:.1f}%")
    return "; ".join(parts)


def _headline_text(run: RunData, label: str, width: int) -> Text:
    """The headline, cut to ``width``, with a reward sparkline in what room is left."""
    line = headline(run, label)
    line = line if len(line) <= width else line[: width - 1] + "…"
    room = min(40, width - len(line) - 2)
    rewards = [r["reward/mean"] for r in run.records if isinstance(r.get("reward/mean"), (int, float))]
    spark = sparkline(rewards, room) if room >= 8 else ""
    return Text(line + (f"  {spark}" if spark else ""), style=run.color)


def dashboard(runs: list[RunData], width: int, samples: int = 8) -> Group:
    """The whole terminal report of ``runs`` in ``width`` columns."""
    names = labels(runs)
    parts: list[Any] = [_headline_text(r, n, width) for r, n in zip(runs, names)]
    if len(runs) > 1:
        parts.append(legend([Series(n, [], [], r.color) for r, n in zip(runs, names)], width))
    parts.append(Text(""))
    parts.append(curves(runs, width))
    for run, name in zip(runs, names):
        parts.append(Text(f"time per node — {name}", style="bold"))
        parts.append(node_bars(run, width))
    for run, name in zip(runs, names):
        lines = sample_lines(run, samples, width)
        if lines:
            parts.append(Text(f"last samples — {name}", style="bold"))
            parts.append(lines)
    return Group(*parts)

