"""The graph layer: a pipeline's dataflow as a ``networkx.DiGraph``, and its static checks.

Edges follow from the columns each node reads and writes (names wire the graph). The
data source is the node ``data``. Every check runs before any model is loaded, all
problems are reported at once, and each has a stable code. No torch import.

Settings a node takes from the Generate node (the sampling temperature of log-probs,
``max_new_tokens`` as the overlong L_max or a loss constant) are resolved here, once:
``PipelineGraph.pipeline`` is the resolved pipeline, and a setting that cannot be
resolved is a problem like any other.

A ``Filter`` node removes rows: every experience node that does not feed it runs after
it (so work downstream of a filter is done on the kept rows only), and the engine
re-runs the filter's ancestors on fresh prompts when it keeps too few groups.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx

from rlflow.node import RUNNERS
from rlflow.spec import Generate, LossSpec, Node, Pipeline

DATA = "data"


@dataclass(frozen=True)
class Problem:
    """One finding of validation. ``severity`` is "error" or "warning"."""

    code: str
    node: str
    field: str
    message: str
    expected: str = ""
    found: str = ""
    hint: str = ""
    severity: str = "error"

    def line(self) -> str:
        parts = [f"{self.code} {self.severity}: node {self.node!r}, field {self.field!r}: {self.message}"]
        if self.expected or self.found:
            parts.append(f"(expected {self.expected or '-'}, found {self.found or '-'})")
        if self.hint:
            parts.append(self.hint)
        return " ".join(parts)


# The catalogue of codes: the tests assert these, so they never change meaning.
CODES = {
    "RF001": "duplicate node name",
    "RF002": "cycle in the graph",
    "RF003": "column read but never written",
    "RF004": "column written by two nodes",
    "RF005": "model not declared",
    "RF006": "trainable model with no Loss",
    "RF007": "Loss on a frozen model",
    "RF008": "column level mismatch",
    "RF009": "group-based advantage fed by one sample per prompt",
    "RF010": "node output never read",
    "RF011": "model head does not fit the node",
    "RF012": "Generate missing or ambiguous for a node that needs its settings",
    "RF013": "pipeline without nodes",
    "RF014": "node kind without a runner",
    "RF015": "setting that cannot take effect",
    "RF016": "a clip of the ratio that cannot bind (one update per batch)",
    "RF017": "a KL setting that cannot act (a zero KL coefficient, or kl_horizon without kl_target)",
    "RF018": "gae's lam unused beside length_alpha and lambda_critic",
}
# Codes that are warnings: the pipeline runs, but a setting in it does nothing.
WARNINGS = {"RF010", "RF016", "RF017", "RF018"}

# Columns the engine consumes itself (metrics, samples), so writing them unread is fine.
_ENGINE_READS = {"response", "truncated", "rewards", "answer", "prompt", "old_logprobs", "group", "greedy_response",
                 "rollout_logprobs"}  # (the sampler's log-probs: kept for a rollout correction when asked)

_HEAD_OF_NEED = {"logprobs": "lm", "values": "value", "scores": "reward"}


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


@dataclass
class PipelineGraph:
    """The validated shape of a pipeline: graph, order, and the problems found."""

    pipeline: Pipeline
    graph: nx.DiGraph
    problems: list[Problem] = field(default_factory=list)
    writer: dict[str, str] = field(default_factory=dict)  # column -> node that writes it
    levels: dict[str, str] = field(default_factory=dict)  # column -> level

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def order(self) -> list[str]:
        """Node names in execution order (deterministic: declaration order breaks ties)."""
        pos = {n.name: i for i, n in enumerate(self.pipeline.nodes)}
        pos[DATA] = -1
        return [n for n in nx.lexicographical_topological_sort(self.graph, key=lambda n: pos[n]) if n != DATA]

    def experience_order(self) -> list[Node]:
        return [self.node(n) for n in self.order() if self.node(n).stage == "experience"]

    def node(self, name: str) -> Node:
        return self.pipeline.node(name)

    def generate(self) -> Optional[Generate]:
        return _single_generate(self.pipeline)

    def upstream(self, name: str) -> set[str]:
        return nx.ancestors(self.graph, name) - {DATA}

    def stages(self) -> list[list[str]]:
        """Experience nodes grouped by depth (nodes within one stage have no path between
        them, so they could run concurrently); the update (Loss) nodes are not included."""
        g = self.graph.subgraph([n for n in self.graph if n != DATA and self.node(n).stage == "experience"])
        return [sorted(gen) for gen in nx.topological_generations(g)] if nx.is_directed_acyclic_graph(g) else []

    def together(self, stage: list[str]) -> list[str]:
        """The nodes of ``stage`` that the engine runs at the same time: with
        ``Pipeline.concurrent_nodes``, those whose runner says how (``NodeRunner.concurrency``),
        when there are at least two and at most one of them needs the main thread."""
        if not self.pipeline.concurrent_nodes:
            return []
        how = {n: getattr(RUNNERS[self.node(n).kind], "concurrency", None) if self.node(n).kind in RUNNERS else None
               for n in stage}
        names = [n for n in stage if how[n]]
        ok = len(names) >= 2 and sum(how[n] == "main" for n in names) <= 1 and self._separate_modules(names)
        return names if ok else []

    def early_forward(self) -> Optional[int]:
        """The experience stage at whose start the update's first forward can start (rlflow.overlap.
        EarlyForward), or None. With ``concurrent_nodes``, one mini-batch and one epoch (the update's
        first micro-batch is then known before the update), one trained model, no filter that
        refills (its rounds run apart from the stages), and from that stage
        on no filter and no node that writes what the forward reads, nor one that runs the trained
        model's module (or any module under ZeRO-3); the earliest such stage."""
        from rlflow.overlap import FORWARD_COLUMNS

        p = self.pipeline
        losses = self._update_nodes()
        refills = any(n.fact("refills") for n in p.nodes)
        if (not p.concurrent_nodes or p.rollout_ahead or p.mini_batches != 1 or p.ppo_epochs != 1 or refills
                or len({self.node(n).model for n in losses}) != 1):
            return None
        stages, first = self.stages(), None
        for i in range(len(stages) - 1, -1, -1):
            nodes = [self.node(n) for n in stages[i]]
            if any(n.kind == "filter" or set(n.writes()) & set(FORWARD_COLUMNS) for n in nodes):
                break
            if not self._separate_modules([*stages[i], losses[0]]):
                break
            first = i
        return first

    def _update_nodes(self) -> list[str]:
        return [n.name for n in self.pipeline.nodes if n.stage == "update"]

    def _separate_modules(self, names: list[str]) -> bool:
        """Whether the nodes ``names`` run distinct modules, none under ZeRO-3 (whose forwards
        gather shards collectively): a LoRA model and its shared base are one module, whose
        adapter one of them disables (``Worker.forwards``)."""
        p = self.pipeline
        owner = p.shared_bases()
        used = [owner.get(m, m) for n in names for m in self.node(n).model_refs().values()]
        return len(used) == len(set(used)) and not any(p.models[m].zero_stage == 3 for m in used if m in p.models)

    def stage_title(self, i: int, stage: list[str]) -> str:
        """``stage i`` and what in it runs at once; for the update, what overlaps it."""
        p = self.pipeline
        if self.node(stage[0]).stage == "update":
            gen = self.generate()
            ahead = f"  ‖ {gen.name} of the next batch (rollout_ahead=1)" if p.rollout_ahead and gen else ""
            from rlflow.charts import plural

            return f"update: {plural(p.ppo_epochs, 'epoch')} x {plural(p.mini_batches, 'mini-batch', 'mini-batches')}{ahead}"
        together = self.together(stage)
        title = f"stage {i + 1}" + (f"  ({' ‖ '.join(together)} run at once)" if together else "")
        if i == self.early_forward():
            title += f"  ‖ {self.node(self._update_nodes()[0]).model}'s first update forward starts (on a CPU)"
        return title


def _single_generate(pipeline: Pipeline) -> Optional[Generate]:
    gens = [n for n in pipeline.nodes if isinstance(n, Generate)]
    return gens[0] if len(gens) == 1 else None


def resolve(pipeline: Pipeline) -> Pipeline:
    """The pipeline with every unset setting that a node takes from the Generate node filled in
    (unchanged when there is nothing to fill; idempotent)."""
    gen = _single_generate(pipeline)
    nodes = []
    for n in pipeline.nodes:
        updates = n.resolve(gen)
        nodes.append(n.model_copy(update=updates) if updates else n)
    ev = pipeline.eval
    if ev is not None and ev.max_new_tokens is None and gen is not None:
        ev = ev.model_copy(update={"max_new_tokens": gen.max_new_tokens})
    if nodes == pipeline.nodes and ev is pipeline.eval:
        return pipeline
    return pipeline.model_copy(update={"nodes": nodes, "eval": ev})


def build(pipeline: Pipeline) -> PipelineGraph:
    """Resolve ``pipeline``, build its graph and run every static check."""
    pipeline = resolve(pipeline)
    pg = PipelineGraph(pipeline=pipeline, graph=nx.DiGraph())
    pg.graph.add_node(DATA, kind=pipeline.data.kind, source=pipeline.data.source)
    _add_nodes(pipeline, pg)
    _add_writers(pipeline, pg)
    _add_read_edges(pipeline, pg)
    _order_after_filters(pipeline, pg.graph)
    _check_cycle(pg)
    _check_kinds(pipeline, pg)
    _check_models(pipeline, pg)
    _check_settings(pipeline, pg)
    _check_inert(pipeline, pg)
    _check_groups(pipeline, pg)
    _check_resolved(pipeline, pg)
    _check_unused(pipeline, pg)
    return pg


def _add_nodes(pipeline: Pipeline, pg: PipelineGraph) -> None:
    seen: set[str] = set()
    for n in pipeline.nodes:
        if n.name in seen:
            pg.problems.append(Problem("RF001", n.name, "name", "two nodes have this name", "unique names", n.name,
                                       f"pass name='{n.name}_2' (or another) to one of them"))
        seen.add(n.name)
        pg.graph.add_node(n.name, kind=n.kind, stage=n.stage)


def _add_writers(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """Who writes each column (the data source is the writer ``data``); one writer per column."""
    writes: dict[str, list[tuple[str, str]]] = {}
    for col, lvl in pipeline.data.writes().items():
        writes.setdefault(col, []).append((DATA, lvl))
    for n in pipeline.nodes:
        for col, lvl in n.writes().items():
            writes.setdefault(col, []).append((n.name, lvl))
    for col, ws in writes.items():
        pg.writer[col], pg.levels[col] = ws[0]
        if len(ws) > 1:
            names = [w for w, _ in ws]
            pg.problems.append(Problem("RF004", names[1], col, f"column {col!r} is written by {', '.join(names)}",
                                       "one writer per column", ", ".join(names)))


def _add_read_edges(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """An edge writer -> reader for every column read, labelled with the columns."""
    g = pg.graph
    for n in pipeline.nodes:
        for col, lvl in n.reads().items():
            if col not in pg.writer:
                pg.problems.append(Problem("RF003", n.name, col, f"reads column {col!r} that no node writes",
                                           f"a node writing {col!r}", "none", _did_you_mean(col, pg.writer)))
                continue
            src = pg.writer[col]
            if pg.levels[col] != lvl:
                pg.problems.append(Problem("RF008", n.name, col, f"reads {col!r} at level {lvl!r} but {src!r} writes it "
                                           f"at level {pg.levels[col]!r}", lvl, pg.levels[col]))
            if src == n.name:
                continue
            if g.has_edge(src, n.name):
                g.edges[src, n.name]["columns"].append(col)
            else:
                g.add_edge(src, n.name, columns=[col])


def _order_after_filters(pipeline: Pipeline, g: nx.DiGraph) -> None:
    """A Filter that drops rows runs before every experience node that does not feed it."""
    for f in pipeline.nodes:
        if not getattr(f, "drops_rows", False) or f.name not in g:
            continue
        feeds = nx.ancestors(g, f.name) if nx.is_directed_acyclic_graph(g) else set()
        for n in pipeline.nodes:
            if n.name != f.name and n.stage == "experience" and n.name not in feeds and not g.has_edge(f.name, n.name):
                g.add_edge(f.name, n.name, columns=["(rows)"])


def _check_cycle(pg: PipelineGraph) -> None:
    g = pg.graph
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    cols = sorted({c for u, v in cycle for c in g.edges[u, v].get("columns", [])})
    pg.problems.append(Problem("RF002", cycle[0][0], ",".join(cols), f"cycle: {path}", "a DAG", path))


def _check_unused(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """Columns written that nothing reads (warnings)."""
    reads = set().union(*(n.reads() for n in pipeline.nodes)) if pipeline.nodes else set()
    for n in pipeline.nodes:
        for col in n.writes():
            if col.startswith("rewards_"):  # per-rule parts: there to be read when wanted
                continue
            if col not in reads and col not in _ENGINE_READS and pg.writer.get(col) == n.name:
                pg.problems.append(Problem("RF010", n.name, col, f"writes {col!r} that no node reads", severity="warning"))


def _check_kinds(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """A pipeline has nodes, and every node kind has a runner (``@runner(kind)``, rlflow.node)."""
    if not pipeline.nodes:
        pg.problems.append(Problem("RF013", "pipeline", "nodes", "the pipeline has no nodes", "at least one node", "[]",
                                   "list the nodes, e.g. nodes=[Generate(...), Score(...), Advantage(...), Loss(...)]"))
    for n in pipeline.nodes:
        if n.kind not in RUNNERS:
            pg.problems.append(Problem("RF014", n.name, "kind", f"node kind {n.kind!r} has no runner", f"one of {RUNNERS.names()}",
                                       n.kind, f"register one with @runner({n.kind!r}) from rlflow.node"))


def _check_settings(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """Settings that would be silently ignored: optimizer offload without ZeRO, parameter
    offload without ZeRO-3, more
    mini-batches than groups, a phase that trains a frozen model, a second held-out split."""
    add = pg.problems.append
    bases = pipeline.shared_bases()
    for name, m in pipeline.models.items():  # (a frozen model has no optimizer: its optimizer settings are moot)
        if m.offload and m.train and m.zero_stage == 0:
            add(Problem("RF015", name, "offload", "offload moves the optimizer state to the CPU, which needs ZeRO stage >= 1",
                        "zero_stage >= 1", "zero_stage=0"))
        if m.lora is not None and not m.train and name not in bases:
            add(Problem("RF015", name, "lora", "a frozen model would get a fresh LoRA adapter, which changes nothing, and "
                        "it is no trained LoRA model's base (same path, head and precision)", "lora=None", "lora=LoRA(...)",
                        "declare the reference as actor.frozen() of the LoRA actor, or drop lora"))
        if m.offload_params and m.zero_stage != 3:
            add(Problem("RF015", name, "offload_params", "offload_params keeps the parameters' shards on the CPU, "
                        "which needs ZeRO stage 3", "zero_stage=3", f"zero_stage={m.zero_stage}"))
    groups = max([pipeline.data.batch_size] + [getattr(n, "target_groups", None) or 0 for n in pipeline.nodes])
    if pipeline.mini_batches > groups:
        add(Problem("RF015", "pipeline", "mini_batches", f"{pipeline.mini_batches} mini-batches of whole groups, but a batch "
                    f"has {groups} groups (data.batch_size)", f"<= {groups}", str(pipeline.mini_batches)))
    for i, phase in enumerate(pipeline.phases):
        for ref in phase.train:
            if ref in pipeline.models and not pipeline.models[ref].train:
                add(Problem("RF015", f"phases[{i}]", "train", f"phase trains model {ref!r}, which is frozen",
                            "a model with train=True", "train=False"))
    _check_rollout(pipeline, pg)
    d = pipeline.data
    if d.eval_source and d.source.startswith("builtin:"):
        add(Problem("RF015", "data", "eval_source", f"{d.source} has its own held-out split", "eval_source=None", repr(d.eval_source)))
    if pipeline.eval is not None and pipeline.eval.pairs and pipeline.data.kind == "pairs":
        add(Problem("RF015", "eval", "pairs", "the data are Pairs, so evaluation uses their own held-out split",
                    "pairs=None", repr(pipeline.eval.pairs)))


def _is_set(node: Node, name: str) -> bool:
    """Whether a setting was chosen: its value is not the default, or it was given by hand
    (a node read back from config.json has every field given, so there only the value counts)."""
    f = type(node).model_fields[name]
    if getattr(node, name) != f.default:
        return True
    given = node.model_fields_set
    return name in given and not set(type(node).model_fields) <= given


def _ratio_is_one(pipeline: Pipeline, loss: Node) -> bool:
    """Whether ρ = π_θ/π_old is 1 at every update of ``loss``: one optimizer step per batch, old
    log-probs from the model it trains, computed by the same forward (recomputed, or fp32,
    where the sampling pass agrees with it to ~1e-6; in bf16/fp16 the two passes differ)."""
    gen = _single_generate(pipeline)
    if pipeline.ppo_epochs * pipeline.mini_batches != 1 or gen is None or gen.model != loss.model:
        return False
    return gen.recompute_logprobs or pipeline.models[gen.model].precision == "fp32"


def _check_inert(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """Settings that do nothing (warnings): a clip of a ratio that is always 1, a KL estimator
    or target with no KL coefficient, gae's lam when both λs are set otherwise."""
    add = pg.problems.append
    for n in pipeline.nodes:
        decl = getattr(n, "declared", None)
        if decl is not None and decl.facts.get("ratio") and n.model in pipeline.models and _ratio_is_one(pipeline, n):
            what = "clip and dual-clip" if getattr(n, "dual_clip", None) is not None else "clip"
            add(Problem("RF016", n.name, "variant", f"{n.label()}'s {what} cannot bind: with one optimizer step per batch "
                        "(ppo_epochs × mini_batches = 1) the ratio ρ is 1, so the update is the plain policy gradient",
                        "ppo_epochs × mini_batches > 1", "1", "set pipeline.mini_batches > 1 to make it act, or use "
                        "Loss('pg') to say it", severity="warning"))
        coef = getattr(n, "kl_coef", None)
        for name in ("kl", "kl_target"):
            if name in type(n).model_fields and _is_set(n, name) and not coef:
                add(Problem("RF017", n.name, name, f"{name}={getattr(n, name)!r} has no effect: "
                            + ("kl_coef is 0" if coef is not None else f"{n.label()} has no KL penalty"),
                            "kl_coef > 0", str(coef or 0), severity="warning"))
        if "kl_horizon" in type(n).model_fields and coef and n.kl_target is None and _is_set(n, "kl_horizon"):
            add(Problem("RF017", n.name, "kl_horizon", f"kl_horizon={n.kl_horizon} has no effect without kl_target "
                        "(β stays kl_coef)", "kl_target set", "kl_target=None", severity="warning"))
        if getattr(n, "length_alpha", None) is not None and getattr(n, "lambda_critic", None) is not None and _is_set(n, "lam"):
            add(Problem("RF018", n.name, "lam", f"lam={n.lam:g} has no effect: λ_actor is length-adaptive (length_alpha) "
                        "and λ_critic is lambda_critic", "lam unset", f"lam={n.lam:g}", severity="warning"))


def _check_rollout(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """A rollout correction on a loss that is not a policy loss; rollout_ahead without what it needs."""
    add = pg.problems.append
    for n in pipeline.nodes:
        if isinstance(n, LossSpec) and n.rollout_is and not n.fact("entropy"):
            add(Problem("RF015", n.name, "rollout_is", f"{n.label()} is not a policy loss; the rollout correction weighs "
                        "a policy gradient", "rollout_is=None", repr(n.rollout_is)))
    if not pipeline.rollout_ahead:
        return
    gen = _single_generate(pipeline)
    if gen is None:
        add(Problem("RF015", "pipeline", "rollout_ahead", "rollout_ahead generates the next batch ahead, which needs "
                    "exactly one Generate node", "one Generate node", "none or several"))
        return
    if pipeline.models.get(gen.model) is not None and pipeline.models[gen.model].train and not gen.recompute_logprobs:
        add(Problem("RF015", gen.name, "recompute_logprobs", "with rollout_ahead=1 the samples come from the weights "
                    "before the last update; the ratio needs old log-probs from the weights being trained",
                    "recompute_logprobs=True", "False"))
    for f in pipeline.nodes:
        if f.fact("refills"):
            add(Problem("RF015", f.name, "variant", f"{f.label()} refills: it draws more batches within a step, "
                        "which rollout_ahead cannot generate ahead", "a filter that does not refill, or rollout_ahead=0",
                        f.label()))


def _check_models(pipeline: Pipeline, pg: PipelineGraph) -> None:
    problems = pg.problems
    declared = pipeline.models
    trained_by_loss: set[str] = set()
    for n in pipeline.nodes:
        for fld, ref in n.model_refs().items():
            if ref not in declared:
                problems.append(Problem("RF005", n.name, fld, f"uses model {ref!r}, which the pipeline does not declare",
                                        f"one of {sorted(declared)}", ref, _did_you_mean(ref, declared)))
                continue
            spec = declared[ref]
            if isinstance(n, LossSpec):
                trained_by_loss.add(ref)
                if not spec.train:
                    problems.append(Problem("RF007", n.name, fld, f"Loss on model {ref!r}, which is frozen",
                                            "a model with train=True", "train=False",
                                            f"declare Model(..., train=True) for {ref!r}, or point the loss at a trainable model"))
                need = _HEAD_OF_NEED[n.needs]
                if spec.head != need:
                    problems.append(Problem("RF011", n.name, fld, f"{n.label()} needs {n.needs} from a model with head={need!r}",
                                            f"head={need!r}", f"head={spec.head!r}"))
            elif n.kind in ("generate", "ref_logprob") and spec.head != "lm":
                problems.append(Problem("RF011", n.name, fld, f"{n.kind} needs a language model", "head='lm'", f"head={spec.head!r}"))
            elif n.kind == "value" and spec.head != "value":
                problems.append(Problem("RF011", n.name, fld, "Value needs a critic", "head='value'", f"head={spec.head!r}",
                                        "declare it as actor.critic() or Model(..., head='value')"))
            elif n.kind == "score" and spec.head != "reward":
                problems.append(Problem("RF011", n.name, fld, "Score with a model needs a reward model", "head='reward'", f"head={spec.head!r}"))
    for i, phase in enumerate(pipeline.phases):
        for ref in phase.train:
            if ref not in declared:
                problems.append(Problem("RF005", f"phases[{i}]", "train", f"phase trains model {ref!r}, which the pipeline does not declare",
                                        f"one of {sorted(declared)}", ref, _did_you_mean(ref, declared)))
    for name, spec in declared.items():
        if spec.train and name not in trained_by_loss:
            problems.append(Problem("RF006", name, "train", f"model {name!r} is trainable but no Loss node trains it",
                                    f"a Loss(..., model={name!r})", "none", "add a Loss node or declare it frozen"))


def _check_groups(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """Group baselines and pairings need more than one sample per prompt (ALGORITHMS.md Part A §4)."""
    for n in pipeline.nodes:
        if not n.fact("group_based"):
            continue
        for a in _ancestors(pg, n.name):
            gen = pipeline.node(a)
            if isinstance(gen, Generate) and gen.n < 2:
                pg.problems.append(Problem("RF009", n.name, "variant",
                                           f"{n.label()} needs several samples per prompt, but {gen.name!r} samples n={gen.n}",
                                           "n >= 2", f"n={gen.n}", f"set {gen.name}.n >= 2, or use a variant without a group baseline"))


def _check_resolved(pipeline: Pipeline, pg: PipelineGraph) -> None:
    """Settings taken from the Generate node that could not be taken (RF012)."""
    n_gens = sum(isinstance(n, Generate) for n in pipeline.nodes)
    for n in pipeline.nodes:
        if isinstance(n, LossSpec) and getattr(n, "agg", None) == "seq-mean-token-sum-norm" and n.agg_constant is None:
            field, what, hint = "agg_constant", "seq-mean-token-sum-norm takes C from Generate.max_new_tokens", "one Generate node or agg_constant=C"
        elif n.kind == "score" and n.overlong_buffer and n.max_new_tokens is None:
            field, what, hint = "overlong_buffer", "the overlong punishment takes L_max from Generate.max_new_tokens", "one Generate node or max_new_tokens=L"
        elif n.kind == "score" and n.overlong_buffer and n.overlong_buffer >= n.max_new_tokens:
            pg.problems.append(Problem("RF012", n.name, "overlong_buffer", "the overlong buffer must be shorter than max_new_tokens",
                                       f"< {n.max_new_tokens}", str(n.overlong_buffer)))
            continue
        else:
            continue
        pg.problems.append(Problem("RF012", n.name, field, f"{what}, but there is no single Generate node", hint, f"{n_gens} Generate nodes"))


def _ancestors(pg: PipelineGraph, name: str) -> set[str]:
    try:
        return pg.upstream(name)
    except nx.NetworkXError:
        return set()
