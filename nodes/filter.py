"""Filter: dynamic sampling (DAPO), overlong filtering, preference pairing (online DPO),
rejection sampling (RFT: keep the correct responses).

Every variant is one function ``fn(cols, *, <settings>) -> Kept`` declared with
``@filter_variant``: ``cols`` holds the columns it reads; it says which rows to keep (a
bool mask or an index order, None for all) and the new columns of the kept rows. The
runner applies that to the Batch. Group ids survive every selection, so whole groups
are kept or dropped. A variant declared with ``refills=True`` makes the engine re-run
the nodes upstream of it on fresh prompts until ``target_groups`` groups are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import Field

from rlflow.dist import Mean, Sum
from rlflow.lazy import torch
from rlflow.node import Context, NodeRunner, runner
from rlflow.spec import FILTERS, filter_variant


@dataclass
class Kept:
    """What a filter decided: rows to keep, the kept rows' new columns, metrics."""

    keep: Optional[torch.Tensor]  # [B] bool, or [K] long row order; None keeps every row as it is
    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # new columns, one row per kept row
    metrics: dict[str, Any] = field(default_factory=dict)  # rlflow.dist metrics: Mean, Sum or float


def group_spread(metric: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Population std of ``metric`` [B] within each row's group, per row [B].

    DAPO keeps a group iff its rewards are not all equal (§7.2); verl tests
    ``np.std(metric) > 0``, the population std. ``std = sqrt(E[x²] - E[x]²)`` per group,
    computed after subtracting the group's first value so equal values give exactly 0.
    """
    _, inv = torch.unique(group, return_inverse=True)  # [B] dense ids
    k = int(inv.max()) + 1 if inv.numel() else 0
    x = metric.double()
    first = torch.zeros(k, dtype=x.dtype, device=x.device).scatter(0, inv.flip(0), x.flip(0))  # a value of each group
    d = x - first[inv]  # shift: exact zeros for equal values
    n = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(d))
    s1 = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, d)
    s2 = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inv, d * d)
    var = (s2 / n - (s1 / n) ** 2).clamp(min=0.0)
    return var.sqrt()[inv]


def dynamic_keep(metric: torch.Tensor, group: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[B] bool: rows of groups whose metric spread exceeds ``tolerance``."""
    return group_spread(metric, group) > tolerance


def best_worst(rewards: torch.Tensor, group: torch.Tensor, drop_ties: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Online DPO pairing (§9.2, Part A §11): per group, the index of the best- and of the
    worst-scored row (the first one on ties within best or worst). A group whose best and
    worst scores are equal (a tie) is dropped with ``drop_ties``; otherwise the tie is
    broken as TRL's OnlineDPOTrainer does: its first row is chosen, its second rejected.
    Returns (chosen_idx [P], rejected_idx [P], number of tied groups)."""
    chosen, rejected, ties = [], [], 0
    for g in torch.unique(group, sorted=True).tolist():
        rows = (group == g).nonzero(as_tuple=True)[0]
        r = rewards[rows]
        hi, lo = int(torch.argmax(r)), int(torch.argmin(r))
        if r[hi] == r[lo]:
            ties += 1
            if drop_ties or len(rows) < 2:
                continue
            hi, lo = 0, 1
        chosen.append(int(rows[hi]))
        rejected.append(int(rows[lo]))
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long), ties


def first_groups(batch, n: int):
    """The rows of the first ``n`` groups (in order of appearance)."""
    seen: dict[int, None] = {}
    for g in batch["group"].tolist():
        if len(seen) == n and g not in seen:
            break
        seen.setdefault(g)
    keep = torch.tensor([g in seen for g in batch["group"].tolist()])
    return batch.select(keep)



# --- the variants ------------------------------------------------------------------------


def _dynamic_reads(spec) -> dict[str, str]:
    return {spec.metric: "seq", "group": "seq"}


@filter_variant(reads=_dynamic_reads, refills=True, coefficient=lambda spec: f"1[std_g({spec.metric}) > {spec.tolerance:g}]")
def dynamic(
    cols: Mapping[str, Any],
    *,
    metric: str = "rewards",
    tolerance: Annotated[float, Field(ge=0)] = 1e-6,
    target_groups: Annotated[Optional[int], Field(ge=1, description="default: the data batch size")] = None,
    max_rounds: Annotated[int, Field(ge=1)] = 10,
    allow_short: bool = False,
) -> Kept:
    """DAPO dynamic sampling (§7.2): keep a group iff the spread (population std) of its
    ``metric`` exceeds ``tolerance``.

    The engine re-runs the nodes upstream on fresh prompts until ``target_groups`` groups
    are kept (default: the data batch size), at most ``max_rounds`` rounds, then truncates
    to the target. Running out of rounds is an error that names the counts, or with
    ``allow_short=True`` a short batch that is logged.
    """
    group = cols["group"]  # [B]
    keep = dynamic_keep(cols[metric].float(), group, tolerance)  # [B] bool
    n_groups = int(torch.unique(group).numel())
    n_kept = int(torch.unique(group[keep]).numel()) if bool(keep.any()) else 0
    return Kept(keep, metrics={"filter/groups_seen": Sum(float(n_groups)), "filter/keep_frac": Mean(float(n_kept), float(n_groups))})


@filter_variant(reads={"response_mask": "token", "truncated": "seq"}, writes={"loss_mask": "token"}, drops_rows=False,
                coefficient="1[not truncated] (on a Loss with mask='loss_mask')")
def overlong(cols: Mapping[str, Any]) -> Kept:
    """Overlong filtering (DAPO §3.4, TRL ``mask_truncated_completions``): truncated
    responses keep their rows (and their place in group statistics) but are masked out of
    the loss: writes ``loss_mask`` = response_mask with truncated rows zeroed. Point a
    Loss at it with ``Loss(..., mask="loss_mask")``."""
    m, truncated = cols["response_mask"], cols["truncated"]  # [B,T], [B]
    loss_mask = m * (~truncated.bool()).to(m.dtype).unsqueeze(-1)  # [B,T]
    return Kept(None, {"loss_mask": loss_mask}, {"filter/truncated_masked": Mean(float(truncated.float().sum()), float(truncated.numel()))})


def _pairs_coefficient(spec) -> str:
    return "1[o is its group's best or worst" + (", and they differ]" if spec.ties == "drop" else "]")


@filter_variant(reads={"rewards": "seq", "group": "seq"}, writes={"chosen": "seq"}, group_based=True,
                coefficient=_pairs_coefficient)
def pairs(cols: Mapping[str, Any], *, ties: Literal["first", "drop"] = "first") -> Kept:
    """Online DPO pairing (§9.2): per group, the best-scored response is chosen and the
    worst-scored one rejected; with Generate(n=2) the rule simply picks the preferred of the
    two samples (the paper's form), with n > 2 it pairs the best against the worst of n.

    ``ties``: what a group whose best and worst scores are equal gives. "first" (default)
    breaks the tie as TRL does, its first sample chosen and its second rejected (a
    judge in the paper always prefers one). "drop" drops the group (no pair) and counts it;
    every group dropped is an empty batch, and the engine skips that step's update.
    """
    rewards = cols["rewards"]
    c, r, n_ties = best_worst(rewards.float().cpu(), cols["group"].cpu(), drop_ties=ties == "drop")
    order = torch.stack([c, r], dim=1).flatten() if len(c) else torch.zeros(0, dtype=torch.long)  # [2P]
    chosen = torch.tensor([1.0, 0.0], device=rewards.device).repeat(len(c))  # [2P]
    tied = "filter/ties_dropped" if ties == "drop" else "filter/ties_broken"
    return Kept(order, {"chosen": chosen}, {"filter/pairs": Sum(float(len(c))), tied: Sum(float(n_ties))})


def _metric_reads(spec) -> dict[str, str]:
    return {spec.metric: "seq"}


@filter_variant(reads=_metric_reads, coefficient=lambda spec: f"1[{spec.metric} > {spec.threshold:g}]")
def correct(cols: Mapping[str, Any], *, metric: str = "rewards", threshold: float = 0.5) -> Kept:
    """Rejection sampling (RFT, Yuan et al. 2023; DeepSeekMath §5.2.1): keep the rows whose
    ``metric`` (a sequence column, default the reward) exceeds ``threshold``, drop the rest.

    With ``Loss("nll")`` after it this is RFT's gradient coefficient 1[o correct]: the
    likelihood of the correct samples only. ``threshold = 0.5`` fits a 0/1 rule (and ±1). A
    step that keeps no row has no update (the engine skips it). Rows are independent: a group
    may lose some of its rows, so no group-based node may run after it.
    """
    value = cols[metric].float()  # [B]
    keep = value > threshold  # [B] bool
    return Kept(keep, metrics={"filter/keep_frac": Mean(float(keep.sum()), float(keep.numel()))})


# --- the node runner ------------------------------------------------------------------------


@dataclass(frozen=True)
class Refill:
    """How the engine refills a filter that drops groups (``refills=True`` variants)."""

    target_groups: int
    max_rounds: int
    allow_short: bool


@runner("filter")
class FilterRunner(NodeRunner):
    def __init__(self, spec):
        super().__init__(spec)
        self.variant = FILTERS[spec.variant]

    def refill(self, batch_size: int) -> Optional[Refill]:
        """The refill contract of this filter, or None when it does not refill."""
        if not self.variant.refills:
            return None
        s = self.spec
        return Refill(s.target_groups or batch_size, s.max_rounds, s.allow_short)

    def run(self, batch, ctx: Context):
        cols = {c: batch[c] for c in self.spec.reads()}
        out = self.variant.fn(cols, **self.variant.arguments(self.spec))
        kept = batch if out.keep is None else batch.select(out.keep)
        for name, value in out.columns.items():
            kept[name] = value
        return kept, out.metrics

    def truncate(self, batch, groups: int):
        """Exactly ``groups`` groups (DAPO truncates the accumulated batch to the target)."""
        return first_groups(batch, groups)
