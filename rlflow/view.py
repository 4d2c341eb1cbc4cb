"""What the terminal shows: the graph, set-up, the live per-node table and step line, the summary.

The terminal observes; it does not steer. The engine emits events to an ``Observer``
(set-up: ``doing``, ``building``, ``message``; then ``start``, ``step``, ``samples``,
``evaluated``, ``end``); these renderers are pure functions from state to a rich
renderable or a line, and ``LiveView`` redraws them. ``Fanout`` passes the events to the
view and the trackers (:mod:`rlflow.trackers`) alike. Only rank 0 prints; output is plain
lines when stdout is not a TTY. docs/watching.md shows what each part means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from rlflow.charts import PALETTE, num, plural
from rlflow.graph import DATA, PipelineGraph, Problem

def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(v) + "}"
    if isinstance(v, float):
        return num(v, 6)
    return str(v)


def node_label(node) -> str:
    model = getattr(node, "model", None)
    return f"{node.name} [{node.label()}]" + (f" @{model}" if model else "")


def _shown_keys(node) -> list[str]:
    """A variant node shows its variant's own settings (read off its declaration) and its
    ``coef``; any other node its fields. ``rlflow graph --all`` shows every field."""
    declared = getattr(node, "declared", None)
    if declared is not None:
        return list(declared.params) + ["kl", "kl_target", "kl_horizon", "coef", "mask", "rollout_is"]
    return list(node.params())


_OFF = {"top_k": 0, "top_p": 1.0, "coef": 1.0, "mask": "response_mask"}  # settings at their neutral value


def _in_effect(k: str, v: Any, params: dict[str, Any]) -> bool:
    """Whether setting ``k = v`` changes anything: not a zero coefficient, a KL estimator without
    a KL penalty, an overlong penalty without its buffer, or a sampling filter that is off."""
    if (k.endswith("_coef") and v == 0) or _OFF.get(k, object()) == v:
        return False
    if k in ("kl", "kl_target", "kl_horizon") and params.get("kl_coef", 1) == 0:
        return False  # a KL estimator or schedule with no KL penalty
    if k == "kl_horizon" and params.get("kl_target") is None:
        return False
    return not (k == "overlong_penalty" and not params.get("overlong_buffer"))


def node_params(node, everything: bool = False) -> str:
    """The node's settings as ``k=v``: those in effect, or every one with ``everything``."""
    params = node.params()
    keys = list(params) if everything else [k for k in dict.fromkeys(_shown_keys(node)) if k in params]
    shown = []
    for k in keys:
        v = params[k]
        if k in ("variant", "model") or v is None or v is False or (isinstance(v, dict) and not v):
            continue
        if everything or _in_effect(k, v, params):
            shown.append(f"{k}={_fmt(v)}")
    return " ".join(shown)


def model_colors(models) -> dict[str, str]:
    """A colour per model name, in declaration order (the graph colours each node by its model)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(models)}


def flow_line(pg: PipelineGraph) -> str:
    """The pipeline in one line: ``generate → {score, ref_logprob} → advantage → loss``; nodes
    of one stage (no path between them) in braces, the update's Loss nodes last."""
    order = {n.name: i for i, n in enumerate(pg.pipeline.nodes)}
    updates = [n.name for n in pg.pipeline.nodes if n.stage == "update"]
    stages = [sorted(names, key=order.get) for names in pg.stages()] + ([updates] if updates else [])
    return " → ".join(names[0] if len(names) == 1 else "{" + ", ".join(names) + "}" for names in stages)


def phase_effects(pipeline) -> dict[str, str]:
    """Loss node name -> what the phases do to it: the steps in which its model does not learn."""
    out = {}
    for n in pipeline.nodes:
        if n.stage != "update":
            continue
        idle = [ph for ph in pipeline.phases if n.model not in ph.train]
        if idle:
            spans = ", ".join(f"{ph.start + 1}-{ph.start + ph.steps}" for ph in idle)
            out[n.name] = f"⏸ idle in steps {spans} (the phase trains only {', '.join(idle[0].train)}); learns after"
    return out


def model_line(name: str, m, base_of: Optional[str] = None) -> str:
    """One model of the graph's models section (a LoRA model's adapter goes on a line of
    its own, below); ``base_of`` names the LoRA model whose module this frozen model
    shares (its adapter disabled)."""
    if base_of is not None:
        return f"{name}: {base_of}'s base (adapter disabled, shared)  {m.path}  head={m.head} frozen"
    flags = f"trainable lr={m.lr:g}" if m.train else "frozen"
    head = f"{m.head}({m.reward_from})" if m.head == "reward" else m.head
    return f"{name}: {m.path}  head={head} {flags} ZeRO-{m.zero_stage} {m.precision}"


def render_graph(pg: PipelineGraph, everything: bool = False) -> Tree:
    """The DAG as a tree of stages: a one-line flow first, then each node (coloured by its
    model) with its kind, key parameters, and the columns on its incoming edges
    (``col ← producer``); the columns read from the data source only with ``everything``."""
    p = pg.pipeline
    colors = model_colors(p.models)
    root = Tree(Text.assemble((p.name, "bold"), f"  {plural(len(p.nodes), 'node')}, {plural(len(p.models), 'model')}"
                              + (f" — {p.description}" if p.description else "")))
    root.add(Text(flow_line(pg), style="bold"))
    models = root.add(Text("models", style="bold"))
    shared = p.shared_bases()
    for name, m in p.models.items():
        line = models.add(Text(model_line(name, m, shared.get(name)), style=colors[name]))
        if m.train and m.lora is not None:
            targets = m.lora.target_modules
            line.add(f"LoRA r={m.lora.r} alpha={m.lora.alpha:g} dropout={m.lora.dropout:g} on "
                     + (targets if isinstance(targets, str) else ", ".join(targets)))
    data = root.add(Text.assemble(("data", "bold"), f" [{p.data.kind}] {p.data.source} batch_size={p.data.batch_size}"))
    data.add(Text("writes " + ", ".join(p.data.writes()), style="dim"))
    stages = pg.stages()
    updates = [n.name for n in p.nodes if n.stage == "update"]
    effects = phase_effects(p)
    for i, names in enumerate(stages + ([updates] if updates else [])):
        branch = root.add(Text(pg.stage_title(i, names), style="bold"))
        for name in names:
            _add_node(branch, pg, name, everything, colors, effects.get(name))
    if p.phases:
        ph = root.add(Text("phases", style="bold"))
        for phase in p.phases:
            ph.add(f"steps {phase.start + 1}-{phase.start + phase.steps}: trains only {', '.join(phase.train)}")
    return root


def _add_node(branch: Tree, pg: PipelineGraph, name: str, everything: bool, colors: dict[str, str],
              effect: Optional[str]) -> None:
    """One node of :func:`render_graph`: label in its model's colour, edges, refill loop, phases."""
    node, p = pg.node(name), pg.pipeline
    model = next(iter(node.model_refs().values()), None)
    t = branch.add(Text.assemble((node_label(node), colors.get(model, "default") if model else "bold"), "  ",
                                 node_params(node, everything)))
    for src, _, d in sorted(pg.graph.in_edges(name, data=True)):
        if src != DATA or everything:
            t.add(Text(f"← {src}: {', '.join(d['columns'])}", style="dim"))
    if node.fact("refills"):
        up = sorted(pg.upstream(name))
        target = node.target_groups or p.data.batch_size
        t.add(Text(f"↺ refills: re-runs {', '.join(up)} on fresh prompts until {target} groups are kept "
                   f"(at most {node.max_rounds} rounds)", style="yellow"))
    if effect:
        t.add(Text(effect, style="yellow"))


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


def node_models(config: dict[str, Any]) -> dict[str, str]:
    """Node name -> the model it runs, from a pipeline config (``Pipeline.to_config()`` or a
    run's config.json); nodes that run no model are left out."""
    out = {}
    for n in config.get("nodes") or []:
        if isinstance(n, dict) and isinstance(n.get("model"), str):
            out[n.get("name") or n.get("kind")] = n["model"]
    return out


def mfu_by_node(names, figures: dict[str, Any], models: dict[str, str]) -> dict[str, float]:
    """Node (or ``a+b`` update) name -> the MFU of its model, where ``figures`` has a
    ``perf/mfu/<model>`` for it."""
    out = {}
    for name in names:
        model = models.get(name.split("+")[0])
        v = figures.get(f"perf/mfu/{model}") if model else None
        if isinstance(v, (int, float)):
            out[name] = float(v)
    return out


def _mfu(v: Optional[float]) -> str:
    return f"{100 * v:.1f}%" if v is not None else "-"


def timing_table(nodes: dict[str, dict[str, float]], title: str = "per-node time (last step)",
                 mfu: Optional[dict[str, float]] = None) -> Table:
    """Seconds, share of the step, rows, tokens/s and MFU per node, the slowest first: a pure
    function of a record (MFU where the record has ``perf/mfu/<model>``, else ``-``)."""
    total = sum(t["seconds"] for t in nodes.values()) or 1.0
    table = Table(title=title, title_justify="left", expand=False)
    for col in ("node", "seconds", "share", "rows", "tokens/s", "MFU"):
        table.add_column(col, justify="left" if col == "node" else "right")
    for name, t in sorted(nodes.items(), key=lambda kv: -kv[1]["seconds"]):
        table.add_row(name, f"{t['seconds']:.3f}", f"{100 * t['seconds'] / total:4.1f}%", str(t["rows"]),
                      f"{t['tokens_per_s']:.0f}" if t.get("tokens_per_s") else "-", _mfu((mfu or {}).get(name)))
    return table


# --- the step line ---------------------------------------------------------------------------

# metric -> its short name in the step line, in the order shown
_LINE = {
    "reward/mean": "reward", "kl/mean": "kl", "rewards/kl_penalty": "kl_pen", "loss/pg": "pg", "loss/value": "vf",
    "value/explained_variance": "ev", "loss/nll": "nll", "loss/dpo": "dpo", "dpo/reward_accuracy": "pref_acc",
    "loss/rm": "rm", "rm/accuracy": "rm_acc", "clip_frac": "clip", "entropy/mean": "entropy",
    "filter/keep_frac": "keep", "filter/rounds": "rounds", "response_length/mean": "len", "eval/accuracy": "eval_acc",
}
# metrics of the policy ratio, which cannot move with one epoch of one mini-batch (ratio = 1)
_RATIO_METRICS = ("clip_frac",)


@dataclass
class StepLine:
    """What the step line of a pipeline shows: its metrics (short names; the KL estimator in
    effect named) and its phases."""

    labels: dict[str, str] = field(default_factory=lambda: dict(_LINE))
    phases: list[tuple[int, int, str]] = field(default_factory=list)  # (first step, last step, trained models)
    steps: Optional[int] = None

    @classmethod
    def of(cls, pipeline) -> "StepLine":
        """The step line of ``pipeline``: no ratio metric with one epoch of one mini-batch, the
        KL named by its estimator and where it acts (loss, or reward as a penalty)."""
        labels = dict(_LINE)
        if pipeline.ppo_epochs == 1 and pipeline.mini_batches == 1:
            for k in _RATIO_METRICS:
                labels.pop(k)
        for n in pipeline.nodes:
            if getattr(n, "kl_coef", 0) and n.kind == "loss":
                labels["kl/mean"] = f"kl({n.kl})"
            elif getattr(n, "kl_coef", 0) and n.kind == "advantage":
                labels["rewards/kl_penalty"] = f"kl_pen({n.kl})"
        phases = [(ph.start + 1, ph.start + ph.steps, "+".join(ph.train)) for ph in pipeline.phases]
        return cls(labels, phases, pipeline.steps)

    def phase(self, step: int) -> Optional[str]:
        """Which phase ``step`` is in (``critic only`` or ``all``), None without phases."""
        if not self.phases:
            return None
        return next((f"{who} only" for a, b, who in self.phases if a <= step <= b), "all")

    def render(self, rec: dict[str, Any]) -> str:
        step = f"step {rec['step']}" + (f"/{self.steps}" if self.steps else "")
        parts = [step] + ([f"phase={self.phase(rec['step'])}"] if self.phases else [])
        parts += [f"{label}={num(rec[k])}" for k, label in self.labels.items() if isinstance(rec.get(k), (int, float))]
        parts.append(f"{rec['seconds']:.2f}s")
        return "  ".join(parts)


_EVAL_NAMES = {
    "accuracy": "held-out greedy accuracy",
    "preference_accuracy": "held-out preference accuracy (policy ranks chosen first)",
    "rm_accuracy": "held-out reward-model pairwise accuracy",
}


def summary_table(summary: dict[str, Any], mfu: Optional[dict[str, float]] = None) -> Table:
    """Per node over the run, the slowest first: total and mean seconds, share, tokens/s, MFU."""
    table = Table(title=f"{summary['pipeline']}: {plural(summary['steps'], 'step')} in {summary['seconds']:.1f}s",
                  title_justify="left")
    for col in ("node", "total s", "mean s/step", "share", "tokens/s", "MFU"):
        table.add_column(col, justify="left" if col == "node" else "right")
    total = sum(v["total_s"] for v in summary["nodes"].values()) or 1.0
    for name, v in sorted(summary["nodes"].items(), key=lambda kv: -kv[1]["total_s"]):
        table.add_row(name, f"{v['total_s']:.2f}", f"{v['mean_s']:.3f}", f"{100 * v['total_s'] / total:.1f}%",
                      f"{v['tokens_per_s']:.0f}" if v.get("tokens_per_s") else "-", _mfu((mfu or {}).get(name)))
    return table


def summary_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    if summary.get("reward/start") is not None:
        out.append(f"reward: {num(summary['reward/start'])} at the start -> {num(summary['reward/end'])} at the end"
                   f" (mean of the first and last {plural(summary.get('reward/window', 1), 'step')})")
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    for key, a in after.items():
        b = before.get(key)
        what = _EVAL_NAMES.get(key.split("/")[1], key)
        if b is not None:
            out.append(f"{what}: {100 * b:.1f}% before -> {100 * a:.1f}% after ({100 * (a - b):+.1f} points)")
    out.append(f"outputs in {summary['out_dir']}")
    return out


def wall_line(setup_s: Optional[float], train_s: float, total_s: float) -> str:
    """``set-up 12.3s + training 45.6s = 58.0s wall`` (the rest: final evaluation, saving)."""
    head = f"set-up {setup_s:.1f}s, " if setup_s is not None else ""
    return f"{head}training {train_s:.1f}s, total wall time {total_s:.1f}s"


# --- the live view ---------------------------------------------------------------------------


class LiveView:
    """The engine's observer for the terminal.

    Set-up as it happens (what is being imported or placed, a progress bar for a built-in
    model that is built by training), timed apart from training; then a live per-node table
    and progress bar on a TTY, with a step line kept in the scrollback every ``every`` steps
    (plain step lines when not a TTY); at the end the per-node totals and the wall times.
    """

    def __init__(self, console: Optional[Console] = None, *, steps: int, every: int = 0, enabled: bool = True):
        self.console = console or Console()
        self.steps = steps
        self.enabled = enabled
        self.tty = self.console.is_terminal
        self.every = every or max(1, steps // 20)
        self.live: Optional[Live] = None
        self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("steps", total=steps)
        self.setup = _SetupDisplay(self.console, enabled and self.tty)
        self.last: Optional[dict[str, Any]] = None
        self.line = StepLine(steps=steps)
        self.models: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.setup_s: Optional[float] = None

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def doing(self, text: str) -> None:
        """Set-up is doing ``text`` now (a spinner on a terminal)."""
        if self.enabled:
            self.setup.doing(text)

    def done(self, text: str) -> None:
        """Set-up finished what :meth:`doing` announced: ``text in 1.2s``."""
        if self.enabled:
            self.message(f"{text} in {self.setup.lap():.1f}s")

    def building(self, name: str, steps: int) -> "_BuildView":
        """The observer of a training run that builds a model (its own progress bar)."""
        return _BuildView(self, name, steps)

    def samples(self, step: int, lines: list[dict[str, Any]]) -> None: ...

    def start(self, run) -> None:
        self.setup.stop()
        self.setup_s = time.perf_counter() - self.t0
        self.progress.reset(self.task, total=self.steps)  # its clock counts training, not set-up
        if run is not None:
            self.line = StepLine.of(run.pipeline)
            self.models = node_models(run.pipeline.to_config())
        if self.enabled:
            self.message(f"set-up done in {self.setup_s:.1f}s; training")
        if self.enabled and self.tty:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def _render(self):
        parts: list[Any] = [self.progress]
        if self.last:
            parts.append(Text(self.line.render(self.last)))
            parts.append(timing_table(self.last["nodes"], mfu=mfu_by_node(self.last["nodes"], self.last, self.models)))
        return Group(*parts)

    def evaluated(self, step: int, figures: dict[str, float]) -> None:
        if self.enabled and figures:
            shown = ", ".join(f"{_EVAL_NAMES.get(k.split('/')[1], k)} {100 * v:.1f}%" for k, v in figures.items())
            self.message(f"eval at step {step}: {shown}")

    def step(self, step: int, record: dict[str, Any]) -> None:
        self.last = record
        self.progress.update(self.task, completed=step)
        if not self.enabled:
            return
        if self.live:
            self.live.update(self._render())
        if step % self.every == 0 or step == self.steps:  # kept in the scrollback, above the live table
            self.console.print(self.line.render(record), markup=False, highlight=False)

    def end(self, summary: dict[str, Any]) -> None:
        self.close()
        if self.enabled:
            self.console.print(summary_table(summary, mfu_by_node(summary["nodes"], summary.get("mfu") or {}, self.models)))
            for line in summary_lines(summary):
                self.message(line)
            self.message(wall_line(self.setup_s, summary["seconds"], time.perf_counter() - self.t0))

    def close(self) -> None:
        self.setup.stop()
        if self.live:
            self.live.stop()
            self.live = None


class _SetupDisplay:
    """A spinner with what set-up is doing and the progress bars of models being built (on a
    terminal; nothing otherwise)."""

    def __init__(self, console: Console, on: bool):
        self.console, self.on = console, on
        self.text, self.since = "", time.perf_counter()
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=console)
        self.live: Optional[Live] = None

    def lap(self) -> float:
        return time.perf_counter() - self.since

    def _render(self):
        return Group(Spinner("dots", Text(self.text)), self.bars) if self.bars.tasks else Spinner("dots", Text(self.text))

    def doing(self, text: str) -> None:
        self.text, self.since = text, time.perf_counter()
        self.refresh()

    def refresh(self) -> None:
        if not self.on:
            return
        if self.live is None:
            self.live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)
            self.live.start()
        else:
            self.live.update(self._render())

    def stop(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None


class _BuildView:
    """Observes the training run that builds a model: a progress bar of its steps on a terminal,
    a line every quarter of the run otherwise, and its held-out figures when it ends."""

    def __init__(self, view: LiveView, name: str, steps: int):
        self.view, self.name, self.steps = view, name, steps
        self.task = view.setup.bars.add_task(f"building {name}", total=steps) if view.setup.on else None
        self.quarter = max(1, steps // 4)

    def message(self, text: str) -> None: ...
    def doing(self, text: str) -> None: ...
    def samples(self, step: int, lines: list[dict[str, Any]]) -> None: ...
    def evaluated(self, step: int, figures: dict[str, float]) -> None: ...

    def building(self, name: str, steps: int) -> "_BuildView":
        return _BuildView(self.view, name, steps)

    def start(self, run) -> None:
        self.view.setup.refresh()

    def step(self, step: int, record: dict[str, Any]) -> None:
        if self.task is not None:
            self.view.setup.bars.update(self.task, completed=step)
            self.view.setup.refresh()
        elif step % self.quarter == 0:
            self.view.message(f"building {self.name}: step {step}/{self.steps}")

    def end(self, summary: dict[str, Any]) -> None:
        if self.task is not None:
            self.view.setup.bars.remove_task(self.task)
            self.view.setup.refresh()
        shown = ", ".join(f"{_EVAL_NAMES.get(k.split('/')[1], k)} {100 * v:.1f}%" for k, v in summary["eval_after"].items())
        self.view.message(f"built {self.name} ({plural(summary['steps'], 'step')} in {summary['seconds']:.1f}s"
                          + (f"; {shown}" if shown else "") + ")")


class Fanout:
    """One observer that passes every event to several (the live view and the trackers)."""

    EVENTS = ("message", "doing", "done", "start", "step", "samples", "evaluated", "end", "close")

    def __init__(self, *observers):
        self.observers = [o for o in observers if o is not None]

    def __getattr__(self, event: str):
        if event not in self.EVENTS:
            raise AttributeError(event)

        def send(*args, **kw):
            for o in self.observers:
                fn = getattr(o, event, None)
                if fn is not None:
                    fn(*args, **kw)

        return send

    def building(self, name: str, steps: int):
        return Fanout(*(o.building(name, steps) for o in self.observers if hasattr(o, "building")))
