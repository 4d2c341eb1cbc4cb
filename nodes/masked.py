"""Masked maths shared by every node: sums, means, whitening, KL estimators, aggregation.

Shapes: ``B`` rows (one per response), ``T`` response tokens (right-padded).
``mask`` is a float or bool tensor ``[B, T]`` with 1 on response tokens (EOS included)
and 0 on padding (ALGORITHMS.md §0.1). Every batch-wide statistic goes through
``rlflow.dist.all_reduce_sum`` so the same code is exact in one process or many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional, get_args

from pydantic import Field

from rlflow.dist import Lazy, Mean, all_reduce_sum
from rlflow.lazy import torch
from rlflow.spec import KlEstimator

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)
# the weight of a KL penalty, a setting of every variant that can put KL in the reward or loss
KlCoef = Annotated[float, Field(ge=0, description="weight β of the KL penalty (0: off)")]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the masked entries (local to this process). An empty mask gives 0."""
    m = mask.to(x.dtype)
    return masked_sum(x, m, dim) / m.sum(dim).clamp(min=1.0) if dim is not None else masked_sum(x, m) / m.sum().clamp(min=1.0)


def mean_of(x: torch.Tensor, mask: torch.Tensor) -> Lazy:
    """The masked mean of ``x`` as a metric, ``Mean(Σ m x, Σ m)`` with the sums still scalar
    tensors (``rlflow.dist``): it adds up exactly over micro-batches and ranks."""
    m = mask.to(x.dtype)
    return Lazy(Mean, ((x * m).sum(), m.sum()))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Token-weighted global whitening, ALGORITHMS.md Part A §5.

    ``(x - μ) / sqrt(σ²_u + eps)`` with μ and the Bessel-corrected σ²_u taken over every
    valid token of the whole batch (all ranks). Padding is set to 0.
    """
    m = mask.to(x.dtype)
    # one all-reduce for the three moments: N, Σx, Σx²
    moments = all_reduce_sum(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()]).to(torch.float64))
    n, s1, s2 = moments.unbind()
    if n <= 1:
        raise ValueError(f"whitening needs at least 2 valid tokens in the batch, found {int(n)}")
    mean = s1 / n
    var_biased = (s2 / n - mean * mean).clamp(min=0.0)
    var = var_biased * n / (n - 1)  # Bessel's correction
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var + eps).to(x.dtype)
    return out * m


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KlEstimator) -> torch.Tensor:
    """Schulman's per-token estimators of KL(π || π_ref), and verl's ``abs``, ALGORITHMS.md §0.3.

    d = lp - lp_ref;  k1 = d;  k2 = d²/2;  k3 = exp(-d) - 1 + d, with -d clamped to ±20
    before the exp and the result clamped to ±10 (as verl does, Part A §6);  abs = |d|
    (verl ``kl_penalty="abs"``, no clamp). As a loss term abs has the gradient sign(d)·∇lp:
    it pulls lp towards lp_ref with a constant force, whichever side it is on.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        neg = (-d).clamp(-20.0, 20.0)
        return (torch.exp(neg) - 1.0 - neg).clamp(-10.0, 10.0)
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


@dataclass
class KlController:
    """The coefficient β of a KL penalty, as a node runner keeps it (ALGORITHMS.md §0.3).

    Fixed (``target`` None): β stays at its start. Adaptive (Ziegler et al. 2019, arXiv
    1909.08593; TRL's ``AdaptiveKLController``, verl ``kl_ctrl.type=adaptive``): after each
    step, with ``observed`` the step's KL and ``n`` the number of sequences it came from,

        e = clip(observed / target - 1, -0.2, 0.2)
        β ← β · (1 + e · n / horizon)

    ``state_dict`` / ``load_state_dict`` carry β through checkpoints (JSON).
    """

    beta: float
    target: Optional[float] = None
    horizon: int = 10000

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, observed: float, n: float) -> None:
        if self.target is None:
            return
        e = min(max(observed / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + e * n / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


def sequence_mean_kl(kl: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(Σ over non-empty rows of each row's token-mean of ``kl`` [B,T], number of those rows),
    all-reduced: the adaptive controller's observed KL is their ratio (verl's ``current_kl``)."""
    m = mask.to(torch.float64)
    lengths = m.sum(-1)  # [B]
    per_seq = (kl.detach().to(torch.float64) * m).sum(-1) / lengths.clamp(min=1.0)  # [B]
    total, rows = all_reduce_sum(torch.stack([per_seq.sum(), (lengths > 0).sum().to(torch.float64)])).tolist()
    return total, rows


@dataclass(frozen=True)
class Counts:
    """Denominators of one mini-batch, summed over its micro-batches and all ranks.

    tokens: Σ mask;  seqs: sequences with a non-empty mask (B');  rows: every row (B);
    groups: distinct prompt groups (pairs, for DPO); constant: C of seq-mean-token-sum-norm.
    """

    tokens: float
    seqs: float
    rows: float
    groups: float = 0.0
    constant: float = 1.0


def count(mask: torch.Tensor, group: torch.Tensor | None = None, constant: float = 1.0) -> Counts:
    """The :class:`Counts` of a whole mini-batch given its full mask (all-reduced)."""
    m = mask.to(torch.float64)
    n_groups = float(torch.unique(group).numel()) if group is not None else 0.0
    t = all_reduce_sum(torch.tensor([m.sum().item(), (m.sum(-1) > 0).sum().item(), float(m.shape[0]), n_groups], dtype=torch.float64))
    return Counts(tokens=t[0].item(), seqs=t[1].item(), rows=t[2].item(), groups=t[3].item(), constant=constant)


def aggregate_mean(per_token: torch.Tensor, mask: torch.Tensor, mode: AggMode, constant: float = 1.0) -> Lazy:
    """:func:`aggregate` of this micro-batch alone as a metric, ``Mean(numerator, denominator)``
    (scalar tensors): added up over the micro-batches (and ranks) of a mini-batch it is the
    mini-batch's value, so a logged loss does not depend on how the batch was cut."""
    m = mask.to(per_token.dtype)
    seqs = (m.sum(-1) > 0).sum().to(per_token.dtype)  # B' of this micro-batch
    if mode == "token-mean":
        return Lazy(Mean, ((per_token * m).sum(), m.sum()))
    if mode == "seq-mean-token-mean":
        return Lazy(Mean, (((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum(), seqs))
    if mode == "seq-mean-token-sum":
        return Lazy(Mean, ((per_token * m).sum(), seqs))
    if mode == "seq-mean-token-sum-norm":
        return Lazy(Mean, ((per_token * m).sum(), seqs * constant))
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: AggMode, counts: Counts) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss, ALGORITHMS.md §0.4 and Part A §3.

    Summing the results over the micro-batches of a mini-batch gives exactly the loss of
    the whole mini-batch, because every denominator comes from ``counts`` (the whole
    mini-batch, all ranks), never from the micro-batch itself.

    token-mean               Σ_{i,t} m ℓ / Σ m
    seq-mean-token-mean      (1/B') Σ_i (Σ_t m ℓ) / L_i
    seq-mean-token-sum       (1/B') Σ_i Σ_t m ℓ
    seq-mean-token-sum-norm  Σ_{i,t} m ℓ / (B' · C)     (Dr. GRPO, TRL; not verl's form without 1/B)
    B' counts only sequences whose mask is not empty (Part A §3: an empty sequence, e.g.
    one masked by overlong filtering, counts in no sequence mean; TRL's dr_grpo would
    count it in B).
    """
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * m).sum() / max(counts.tokens, 1.0)
    if mode == "seq-mean-token-mean":
        lengths = m.sum(-1)  # [B]
        per_seq = (per_token * m).sum(-1) / lengths.clamp(min=1.0)  # empty rows contribute 0
        return per_seq.sum() / max(counts.seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return (per_token * m).sum() / max(counts.seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return (per_token * m).sum() / (max(counts.seqs, 1.0) * counts.constant)
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {', '.join(AGG_MODES)}")
