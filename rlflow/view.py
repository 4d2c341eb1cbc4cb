"""What the terminal shows: the graph, the live per-node table, the summary.

The terminal observes; it does not steer. The engine emits events to an ``Observer``;
these renderers are pure functions from state to a rich renderable, and ``LiveView``
redraws them. Only rank 0 prints; output is plain lines when stdout is not a TTY.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from rlflow.graph import DATA, PipelineGraph, Problem

def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(v) + "}"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def node_label(node) -> str:
    model = getattr(node, "model", None)
    return f"{node.name} [{node.label()}]" + (f" @{model}" if model else "")


def _shown_keys(node) -> list[str]:
    """A variant node shows its variant's own settings (read off its declaration) and its
    ``coef``; any other node its fields. ``rlflow graph --all`` shows every field."""
    declared = getattr(node, "declared", None)
    if declared is not None:
        return list(declared.params) + ["kl", "coef", "mask", "rollout_is"]
    return list(node.params())


def node_params(node, everything: bool = False) -> str:
    params = node.params()
    keys = list(params) if everything else [k for k in dict.fromkeys(_shown_keys(node)) if k in params]
    shown = []
    for k in keys:
        v = params[k]
        if k in ("variant", "model") or v is None or v is False or (isinstance(v, dict) and not v):
            continue
        if not everything and ((k == "coef" and v == 1.0) or (k == "kl_coef" and v == 0) or v == "response_mask"
                               or (k == "kl" and params.get("kl_coef", 1) == 0)):
            continue  # a KL estimator with no KL penalty is not in effect
        shown.append(f"{k}={_fmt(v)}")
    return " ".join(shown)


def render_graph(pg: PipelineGraph, everything: bool = False) -> Tree:
    """The DAG as a tree of stages: each node with its kind, model, key parameters, and
    the columns on its incoming edges (``col ← producer``)."""
    p = pg.pipeline
    root = Tree(Text.assemble((p.name, "bold"), f"  {len(p.nodes)} nodes, {len(p.models)} models"
                              + (f" — {p.description}" if p.description else "")))
    models = root.add(Text("models", style="bold"))
    for name, m in p.models.items():
        flags = "trainable" + (f" lr={m.lr:g}" if m.train else "") if m.train else "frozen"
        head = f"{m.head}({m.reward_from})" if m.head == "reward" else m.head
        models.add(f"{name}: {m.path}  head={head} {flags} ZeRO-{m.zero_stage} {m.precision}")
    data = root.add(Text.assemble(("data", "bold"), f" [{p.data.kind}] {p.data.source} batch_size={p.data.batch_size}"))
    data.add(Text("writes " + ", ".join(p.data.writes()), style="dim"))
    stages = pg.stages()
    updates = [n.name for n in p.nodes if n.stage == "update"]
    for i, names in enumerate(stages + ([updates] if updates else [])):
        branch = root.add(Text(pg.stage_title(i, names), style="bold"))
        for name in names:
            node = pg.node(name)
            t = branch.add(Text.assemble((node_label(node), "cyan"), "  ", node_params(node, everything)))
            for src, _, d in sorted(pg.graph.in_edges(name, data=True)):
                if src == DATA and not everything:
                    t.add(Text(f"← data: {', '.join(d['columns'])}", style="dim"))
                else:
                    t.add(Text(f"← {src}: {', '.join(d['columns'])}", style="dim"))
            if getattr(node, "declared", None) and node.declared.facts.get("refills"):
                up = sorted(pg.upstream(name))
                target = node.target_groups or p.data.batch_size
                t.add(Text(f"↺ refills: re-runs {', '.join(up)} on fresh prompts until {target} groups are kept "
                           f"(at most {node.max_rounds} rounds)", style="yellow"))
    phases = getattr(p, "phases", None) or []
    if phases:
        ph = root.add(Text("phases", style="bold"))
        for phase in phases:
            ph.add(f"steps {phase.start + 1}-{phase.start + phase.steps}: trains only {', '.join(phase.train)}")
    return root


def render_problems(problems: list[Problem], file: str = "") -> Text:
    errors = [p for p in problems if p.severity == "error"]
    warns = [p for p in problems if p.severity != "error"]
    out = Text()
    head = f"{file}: " if file else ""
    if errors:
        out.append(f"{head}{len(errors)} problem{'s' if len(errors) != 1 else ''}" + (f", {len(warns)} warning(s)" if warns else "") + "\n", style="bold red")
    for p in errors + warns:
        out.append(f"  {p.line()}\n", style="red" if p.severity == "error" else "yellow")
    return out


def timing_table(nodes: dict[str, dict[str, float]], title: str = "per-node time (last step)") -> Table:
    """seconds, share of the step, rows and tokens/s per node: a pure function of a record."""
    total = sum(t["seconds"] for t in nodes.values()) or 1.0
    table = Table(title=title, title_justify="left", expand=False)
    for col, justify in (("node", "left"), ("seconds", "right"), ("share", "right"), ("rows", "right"), ("tokens/s", "right")):
        table.add_column(col, justify=justify)
    for name, t in nodes.items():
        table.add_row(name, f"{t['seconds']:.3f}", f"{100 * t['seconds'] / total:4.1f}%", str(t["rows"]),
                      f"{t['tokens_per_s']:.0f}" if t.get("tokens_per_s") else "-")
    return table


def _headline(rec: dict[str, Any]) -> str:
    keys = ("reward/mean", "loss/pg", "loss/value", "loss/nll", "loss/dpo", "loss/rm", "kl/mean", "clip_frac", "response_length/mean", "eval/accuracy")
    parts = [f"step {rec['step']}"] + [f"{k}={rec[k]:.4g}" for k in keys if isinstance(rec.get(k), (int, float))]
    parts.append(f"{rec['seconds']:.2f}s")
    return "  ".join(parts)


_EVAL_NAMES = {
    "accuracy": "held-out greedy accuracy",
    "preference_accuracy": "held-out preference accuracy (policy ranks chosen first)",
    "rm_accuracy": "held-out reward-model pairwise accuracy",
}


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"{summary['pipeline']}: {summary['steps']} steps in {summary['seconds']:.1f}s", title_justify="left")
    table.add_column("node")
    table.add_column("total s", justify="right")
    table.add_column("mean s/step", justify="right")
    table.add_column("share", justify="right")
    total = sum(v["total_s"] for v in summary["nodes"].values()) or 1.0
    for name, v in summary["nodes"].items():
        table.add_row(name, f"{v['total_s']:.2f}", f"{v['mean_s']:.3f}", f"{100 * v['total_s'] / total:.1f}%")
    return table


def summary_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    if summary.get("reward/start") is not None:
        out.append(f"reward: {summary['reward/start']:.3f} at the start -> {summary['reward/end']:.3f} at the end")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for key, a in after.items():
        b = before.get(key)
        what = _EVAL_NAMES.get(key.split("/")[1], key)
        if b is not None:
            out.append(f"{what}: {100 * b:.1f}% before -> {100 * a:.1f}% after ({100 * (a - b):+.1f} points)")
    out.append(f"outputs in {summary['out_dir']}")
    return out


class LiveView:
    """The engine's observer for the terminal: live table + progress on a TTY, plain lines otherwise."""

    def __init__(self, console: Optional[Console] = None, *, steps: int, every: int = 0, enabled: bool = True):
        self.console = console or Console()
        self.steps = steps
        self.enabled = enabled
        self.tty = self.console.is_terminal
        self.every = every or (1 if self.tty else max(1, steps // 20))
        self.live: Optional[Live] = None
        self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("steps", total=steps)
        self.last: Optional[dict[str, Any]] = None
        self.t0 = time.perf_counter()

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def start(self, run) -> None:
        if self.enabled and self.tty:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def _render(self):
        parts: list[Any] = [self.progress]
        if self.last:
            parts.append(Text(_headline(self.last)))
            parts.append(timing_table(self.last["nodes"]))
        return Group(*parts)

    def evaluated(self, step: int, figures: dict[str, float]) -> None:
        if self.enabled and figures:
            shown = ", ".join(f"{_EVAL_NAMES.get(k.split('/')[1], k)} {100 * v:.1f}%" for k, v in figures.items())
            line = f"eval at step {step}: {shown}"
            (self.live.console.print(line) if self.live else self.message(line))

    def step(self, step: int, record: dict[str, Any]) -> None:
        self.last = record
        self.progress.update(self.task, completed=step)
        if not self.enabled:
            return
        if self.live:
            self.live.update(self._render())
        elif step % self.every == 0 or step == self.steps:
            self.console.print(_headline(record), markup=False, highlight=False)

    def end(self, summary: dict[str, Any]) -> None:
        if self.live:
            self.live.stop()
            self.live = None
        if self.enabled:
            self.console.print(summary_table(summary))
            for line in summary_lines(summary):
                self.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None
