"""Filter: dynamic sampling (DAPO), overlong filtering, best-vs-worst pairing (online DPO).

The keep rules are pure functions of tensors (tested directly); the runners apply them
to a Batch. Group ids survive every selection, so whole groups are kept or dropped.
"""

from __future__ import annotations

import torch

from rlflow.batch import Batch
from rlflow.node import Context, runner


def group_spread(metric: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Population std of ``metric`` [B] within each row's group, per row [B].

    DAPO keeps a group iff its rewards are not all equal (§7.2); verl tests
    ``np.std(metric) > 0``, the population std. ``std = sqrt(E[x²] - E[x]²)`` per group,
    computed after subtracting the group's first value so equal values give exactly 0.
    """
    _, inv = torch.unique(group, return_inverse=True)  # [B] dense ids
    k = int(inv.max()) + 1 if inv.numel() else 0
    x = metric.double()
    first = torch.zeros(k, dtype=x.dtype).scatter(0, inv.flip(0), x.flip(0))  # a value of each group
    d = x - first[inv]  # shift: exact zeros for equal values
    n = torch.zeros(k, dtype=x.dtype).index_add_(0, inv, torch.ones_like(d))
    s1 = torch.zeros(k, dtype=x.dtype).index_add_(0, inv, d)
    s2 = torch.zeros(k, dtype=x.dtype).index_add_(0, inv, d * d)
    var = (s2 / n - (s1 / n) ** 2).clamp(min=0.0)
    return var.sqrt()[inv]


def dynamic_keep(metric: torch.Tensor, group: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[B] bool: rows of groups whose metric spread exceeds ``tolerance``."""
    return group_spread(metric, group) > tolerance


def best_worst(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Online DPO pairing (§9.2, Part A §11): per group, the index of the best- and of the
    worst-scored row (first one on ties within best or worst). Groups whose best and worst
    scores are equal are dropped. Returns (chosen_idx [P], rejected_idx [P], ties dropped)."""
    chosen, rejected, ties = [], [], 0
    for g in torch.unique(group, sorted=True).tolist():
        rows = (group == g).nonzero(as_tuple=True)[0]
        r = rewards[rows]
        hi, lo = int(torch.argmax(r)), int(torch.argmin(r))
        if r[hi] == r[lo]:
            ties += 1
            continue
        chosen.append(int(rows[hi]))
        rejected.append(int(rows[lo]))
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long), ties


def first_groups(batch: Batch, n: int) -> Batch:
    """The rows of the first ``n`` groups (in order of appearance)."""
    seen: dict[int, None] = {}
    for g in batch["group"].tolist():
        if len(seen) == n and g not in seen:
            break
        seen.setdefault(g)
    keep = torch.tensor([g in seen for g in batch["group"].tolist()])
    return batch.select(keep)


@runner("filter")
class FilterRunner:
    def __init__(self, spec):
        self.spec = spec

    def run(self, batch: Batch, ctx: Context):
        s = self.spec
        if s.variant == "dynamic":
            keep = dynamic_keep(batch[s.metric].float(), batch["group"], s.tolerance)
            n_groups = int(torch.unique(batch["group"]).numel())
            kept = batch.select(keep)
            n_kept = int(torch.unique(kept["group"]).numel()) if len(kept) else 0
            return kept, {"filter/groups_seen": float(n_groups), "filter/keep_frac": n_kept / max(1, n_groups)}
        if s.variant == "overlong":
            m = batch["response_mask"]
            batch["loss_mask"] = m * (~batch["truncated"].bool()).to(m.dtype).unsqueeze(-1)
            return {"filter/truncated_masked": float(batch["truncated"].float().mean())}
        if s.variant == "pairs":
            c, r, ties = best_worst(batch["rewards"].float(), batch["group"])
            order = torch.stack([c, r], dim=1).flatten() if len(c) else torch.zeros(0, dtype=torch.long)
            pairs = batch.select(order)
            pairs["chosen"] = torch.tensor([1.0, 0.0]).repeat(len(c))
            # every group tied: an empty batch, and the engine skips this step's update
            return pairs, {"filter/pairs": float(len(c)), "filter/ties_dropped": float(ties)}
        raise ValueError(f"unknown filter variant {s.variant!r}")

    def truncate(self, batch: Batch, groups: int) -> Batch:
        """Exactly ``groups`` groups (DAPO truncates the accumulated batch to the target)."""
        return first_groups(batch, groups)
