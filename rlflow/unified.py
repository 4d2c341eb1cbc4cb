"""The unified view of post-training methods (DeepSeekMath §5.2.1; ALGORITHMS.md §10),
read off a pipeline's nodes.

Every method's gradient is ``E_{(q,o) ~ D}[ Σ_t GC(q, o, t) · ∇log π_θ(o_t | q, o_<t) ]``;
methods differ in the data source ``D``, the reward function and the gradient coefficient
``GC``. Each part is declared once, where it is implemented: the data source by the data
spec's and Generate's ``data_source`` (``rlflow/spec.py``), the reward function by the
Score node's rules and model (and a KL in the reward, by the Advantage node), the
gradient coefficient by the Filter, Advantage and Loss variants' ``coefficient`` and the
KL estimators' ``KL_GRADIENT``. Nothing here is written per pipeline, and nothing here
names a variant. ``rlflow compare`` opens with this table; docs/algorithms.md has it for
every shipped pipeline (generated). No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rlflow.spec import KL_GRADIENT, Generate, Node, Pipeline

NONE = "—"


@dataclass(frozen=True)
class UnifiedView:
    """One pipeline in the unified view; every field is a formula or phrase for a reader."""

    data_source: str
    reward_function: str
    gradient_coefficient: str
    kl: str  # the KL penalty actually in effect (where, estimator, β), or "—"


def _g(x: float) -> str:
    return f"{x:g}"


def policy_models(pipeline: Pipeline) -> list[str]:
    """The trained models whose likelihood the losses move: trained language models, else
    every trained model (a reward model trained alone)."""
    trained = [name for name, m in pipeline.models.items() if m.train]
    lms = [name for name in trained if pipeline.models[name].head == "lm"]
    return lms or trained


def data_source(pipeline: Pipeline) -> str:
    """The data kind of the data spec, then what each Generate samples (on-policy or not)."""
    parts = [pipeline.data.data_source]
    policies = policy_models(pipeline)
    for n in pipeline.nodes:
        if isinstance(n, Generate):
            own = n.model in policies and pipeline.models[n.model].train
            what = n.data_source if own else f"{n.data_source_frozen} ({n.model!r})"
            parts.append(f"{what}, n={n.n}" + (" + one greedy response" if n.greedy_baseline else ""))
    return "; ".join(parts)


def _kl_in_reward(pipeline: Pipeline) -> Optional[Node]:
    return next((n for n in pipeline.nodes if n.kind == "advantage" and getattr(n, "kl_coef", 0) > 0), None)


def _beta(n: Node) -> str:
    beta = f"β={_g(n.kl_coef)}"
    return beta + (f", adaptive to KL {_g(n.kl_target)} (horizon {n.kl_horizon})" if n.kl_target is not None else "")


def reward_function(pipeline: Pipeline) -> str:
    """The Score node's weighted rules, reward model and overlong shaping, minus a KL in the reward."""
    terms = []
    for n in pipeline.nodes:
        if n.kind != "score":
            continue
        terms += [name if r.weight == 1 else f"{_g(r.weight)}·{name}" for name, r in n.rules.items()]
        terms += [f"reward model {n.model!r}"] * (n.model is not None)
        terms += [f"overlong punishment (L_cache={n.overlong_buffer})"] * (n.overlong_buffer is not None)
    adv = _kl_in_reward(pipeline)
    if adv is not None:
        where = "per token" if adv.declared.token_rewards else "summed per sequence"
        terms.append(f"- β·{adv.kl}(π_old, π_ref) {where}")
    if not terms:
        return "preference labels" if pipeline.data.kind == "pairs" else NONE
    return " + ".join(terms).replace("+ -", "-")


def _reads_of(losses: list[Node]) -> set[str]:
    return {c for n in losses for c in n.reads()} | {getattr(n, "mask", "") for n in losses}


def _term(n: Node) -> str:
    """One Loss node's coefficient: its variant's, weighted by ``coef``, plus its KL and entropy."""
    gc = n.declared.gradient_coefficient(n)
    if getattr(n, "kl_coef", 0) > 0:
        gc += f" + {KL_GRADIENT[n.kl]}"  # β and the estimator: the KL column
    if getattr(n, "entropy_coef", 0) > 0:
        gc += f" + entropy bonus {_g(n.entropy_coef)}·∇H"
    return gc if n.coef == 1 else f"{_g(n.coef)}·({gc})"


def gradient_coefficient(pipeline: Pipeline) -> str:
    """The Loss terms on the policy, then the Filters that select or mask their rows (as
    indicators) and the Advantage their ``A`` comes from."""
    policies = policy_models(pipeline)
    losses = [n for n in pipeline.nodes if n.stage == "update" and n.model in policies]
    if not losses:
        return NONE
    reads = _reads_of(losses)
    gc = " + ".join(_term(n) for n in losses).replace("+ -", "- ")
    filters = [n for n in pipeline.nodes if n.kind == "filter" and (n.drops_rows or set(n.writes()) & reads)]
    if filters:
        indicators = "·".join(f.declared.gradient_coefficient(f) for f in filters)
        gc = indicators if gc == "1" else f"{indicators} · ({gc})"
    adv = next((n for n in pipeline.nodes if n.kind == "advantage"), None)
    if adv is not None and "advantages" in reads:
        gc += "; " + adv.declared.gradient_coefficient(adv) + (", whitened over the batch" if getattr(adv, "whiten", False) else "")
    return gc


def kl_in_effect(pipeline: Pipeline) -> str:
    """Where a KL penalty acts, with which estimator and β; "—" when none does (an estimator
    set next to a zero coefficient is not in effect)."""
    out = []
    adv = _kl_in_reward(pipeline)
    if adv is not None:
        out.append(f"in the reward: {adv.kl}(π_old, π_ref), {_beta(adv)}")
    for n in pipeline.nodes:
        if n.stage == "update" and getattr(n, "kl_coef", 0) > 0:
            out.append(f"in the loss{'' if n.name == 'loss' else f' {n.name!r}'}: {n.kl}(π_θ, π_ref), {_beta(n)}")
    return "; ".join(out) or NONE


def not_in_effect(pipeline: Pipeline, path: str) -> Optional[str]:
    """Why the KL setting at ``path`` (``nodes.<name>.kl``, ``.kl_target``, ``.kl_horizon``)
    does nothing in ``pipeline``, or None: compare marks such a value instead of showing it
    as if it acted."""
    parts = path.split(".")
    if len(parts) != 3 or parts[0] != "nodes" or parts[2] not in ("kl", "kl_target", "kl_horizon"):
        return None
    node = next((n for n in pipeline.nodes if n.name == parts[1]), None)
    if node is None:
        return None
    if not getattr(node, "kl_coef", 0):
        return "off: kl_coef=0" if hasattr(node, "kl_coef") else "off: no KL penalty"
    if parts[2] == "kl_horizon" and node.kl_target is None:
        return "off: no kl_target"
    return None


def unified_view(pipeline: Pipeline) -> UnifiedView:
    return UnifiedView(data_source(pipeline), reward_function(pipeline), gradient_coefficient(pipeline),
                       kl_in_effect(pipeline))


def markdown(pipelines: list[tuple[str, Any]]) -> str:
    """A markdown table of the unified view, one row per (label, pipeline)."""
    lines = ["| pipeline | data source | reward function | gradient coefficient GC | KL penalty |",
             "| --- | --- | --- | --- | --- |"]
    for label, p in pipelines:
        v = unified_view(p)
        cells = [label, v.data_source, v.reward_function, v.gradient_coefficient, v.kl]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
