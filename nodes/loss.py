"""Loss: every variant as a pure function of one micro-batch, ALGORITHMS.md §0.2–0.4, §1.4, §8, §9.

A variant is ``fn(cols, counts, **params) -> LossTerm``:

* ``cols`` holds the micro-batch's batch columns plus the model output the variant
  ``needs``: ``logprobs`` [B,T] (π_θ at the sampling temperature, grad, 0 on padding),
  ``new_values`` [B,T] (critic, grad) or ``scores`` [B] (reward model, grad). A policy
  loss (declared ``entropy=True``) also gets ``entropy`` [B,T]: the entropy of π_θ(·|s_t)
  over the vocabulary at each response token, from the same logits as ``logprobs`` (0 on
  padding; with gradient only when its ``entropy_coef`` > 0).
* ``counts`` are the denominators of the whole MINI-batch (every micro-batch, every rank),
  computed once by the engine with :func:`masked.count` over the variant's ``mask``.

``LossTerm.loss`` is this micro-batch's *share*: every denominator comes from ``counts``,
so the shares of a mini-batch sum to its loss and their gradients to its gradient,
whatever the micro-batch size or number of ranks (Part A §3; tested). ``metrics`` are this
micro-batch's own values, with local denominators; the engine averages them.

Shapes: B rows of the micro-batch, T response tokens, P pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import Field

from rlflow.dist import Lazy, Mean, Stat
from rlflow.lazy import F, no_grad, torch
from rlflow.node import ModelRunner, packs, runner
from rlflow.spec import LOSSES, loss_variant

from rlflow.dist import all_reduce_sum

from .masked import AggMode, Counts, KlCoef, KlController, KlEstimator, aggregate, aggregate_mean, count, kl_estimate, mean_of

Positive = Annotated[float, Field(gt=0)]
DualClip = Annotated[Optional[float], Field(gt=1, description="dual-clip constant c > 1 (Ye et al. 2019); None: off")]


@dataclass
class LossTerm:
    loss: torch.Tensor  # scalar with grad: this micro-batch's share of the mini-batch loss
    metrics: dict[str, Any]  # micro-batch values as rlflow.dist metrics (Mean: added up over micro-batches and ranks)


# --- helpers -------------------------------------------------------------------------


def _floats(values: dict[str, Any]) -> dict[str, float]:
    """Scalar tensors, and the tensor sums of ``Lazy`` metrics, to floats (Stats for the
    latter, ``rlflow.dist``), with one device sync for all of them."""
    parts = [v.parts if isinstance(v, Lazy) else (v,) for v in values.values()]
    leaves = [x for p in parts for x in p if isinstance(x, torch.Tensor)]
    flat = iter(torch.stack([x.detach().to(torch.float64).reshape(()) for x in leaves]).tolist() if leaves else [])
    out = {}
    for (k, v), p in zip(values.items(), parts):
        nums = [next(flat) if isinstance(x, torch.Tensor) else float(x) for x in p]
        out[k] = v.kind(*nums) if isinstance(v, Lazy) else nums[0]
    return out


def _over_pairs(x: torch.Tensor) -> Lazy:
    """A per-pair metric [P] as a mean over pairs that adds up over micro-batches and ranks."""
    return Lazy(Mean, (x.sum(), float(x.numel())))


def _pairs(group: torch.Tensor, chosen: torch.Tensor, variant: str) -> torch.Tensor:
    """Row order that lays the micro-batch out as [P, 2] = (chosen, rejected) per pair.

    Rows of a pair share ``group`` and need not be adjacent. Raises ValueError unless every
    group has exactly one row with chosen == 1 and one with chosen == 0.
    """
    if not bool(((chosen == 0) | (chosen == 1)).all()):
        raise ValueError(f"{variant}: 'chosen' must be 1 (chosen row) or 0 (rejected row)")
    ids, inv = torch.unique(group, return_inverse=True)  # [P], [B]
    is_w = (chosen == 1).long()  # [B]
    n_w = torch.bincount(inv, weights=is_w.double(), minlength=ids.numel())  # [P]
    n_l = torch.bincount(inv, weights=(1 - is_w).double(), minlength=ids.numel())  # [P]
    bad = (n_w != 1) | (n_l != 1)  # [P]
    if bool(bad.any()):
        shown = ids[bad][:5].tolist()
        raise ValueError(
            f"{variant}: every group needs exactly one chosen and one rejected row; "
            f"{int(bad.sum())} of {ids.numel()} groups do not (e.g. group {shown})"
        )
    # key 2p for the chosen row of pair p, 2p+1 for its rejected row: sorting gives w0,l0,w1,l1,...
    return torch.argsort(2 * inv + (1 - is_w))  # [B] = [2P]


def _by_pair(x: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values [B] -> (chosen [P], rejected [P])."""
    w, l = x[order].view(-1, 2).unbind(-1)
    return w, l


# --- policy gradient: the plumbing every policy loss shares ----------------------------
#
# A policy loss computes its own per-token term ``pg`` [B,T]; :func:`_policy_term` adds
# the KL in the loss and the entropy bonus, aggregates with the mini-batch counts and
# logs what every policy loss logs. Every policy loss is declared with ``entropy=True``:
# the runner then computes the policy's entropy at each response token from the same
# forward as the log-probs (``cols["entropy"]``, with gradient only when entropy_coef > 0).

EntropyCoef = Annotated[float, Field(ge=0, description="weight c of the entropy bonus, ℓ -= c·H per token (0: off)")]
MaybePositive = Annotated[Optional[float], Field(gt=0)]


def _pg_reads(spec) -> dict[str, str]:
    out = {"old_logprobs": "token", "advantages": "token"}
    return {**out, "ref_logprobs": "token"} if spec.kl_coef > 0 else out


def _log_ratio(cols: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """log ρ = lp - lp_old, clamped to ±20 before any exp (verl, OpenRLHF; Part A §7). [B,T], grad."""
    return (cols["logprobs"] - cols["old_logprobs"]).clamp(-20.0, 20.0)


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       level: str, mode: str, low: float, high: float) -> tuple[torch.Tensor, dict[str, Lazy]]:
    """Importance weights [B,T] (no grad) for the mismatch between the sampler and the trainer
    (``LossSpec.rollout_is``), and their metrics.

        log r_t = clamp(lp_old_t - lp_rollout_t, -20, 20)       token level
        log r_i = clamp(Σ_t (lp_old_t - lp_rollout_t), -20, 20)   sequence level, broadcast to its tokens
        truncate: w = min(r, high)                     truncated IS (verl rollout_is, TRL's vLLM IS correction)
        mask:     w = r · 1[low <= r <= high]         IcePop (Ling team 2025): tokens far off-policy drop out

    ``lp_old`` is the trainer's recompute of the behaviour policy (Generate(recompute_logprobs=True)),
    ``lp_rollout`` the sampler's own log-probs: with a one-step-ahead rollout or a sampler in
    another precision or engine they differ. Metrics: rollout_is/mean (token mean of w),
    rollout_is/clipped_frac or rollout_is/masked_frac, and rollout_is/kl (token mean of
    lp_rollout - lp_old, the k1 estimate of KL(π_rollout || π_old)).
    """
    with torch.no_grad():
        m = mask.to(old_logprobs.dtype)  # [B,T]
        diff = (old_logprobs - rollout_logprobs) * m  # [B,T]
        log_r = diff if level == "token" else diff.sum(-1, keepdim=True).expand_as(diff)  # [B,T]
        r = torch.exp(log_r.clamp(-20.0, 20.0))  # [B,T]
        if mode == "truncate":
            w, cut, name = r.clamp(max=high), r > high, "rollout_is/clipped_frac"
        else:
            cut = (r < low) | (r > high)
            w, name = torch.where(cut, 0.0, r), "rollout_is/masked_frac"
        w = w * m
        metrics = {"rollout_is/mean": mean_of(w, mask), name: mean_of(cut.to(m.dtype), mask),
                   "rollout_is/kl": mean_of(-diff, mask)}
    return w, metrics


def _ppo_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> Lazy:
    """verl's ``ppo_kl``: the masked mean of lp_old - lp (k1 of the old vs the current policy)."""
    return mean_of(-log_ratio.detach(), mask)


def _policy_term(
    pg: torch.Tensor,
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    kl_coef: float,
    kl: str,
    entropy_coef: float,
    agg: str,
    metrics: dict[str, torch.Tensor],
) -> LossTerm:
    """The rest of every policy loss, ALGORITHMS.md §0.3 placement 2, §0.4, §1.4.

        ℓ    = pg + kl_coef · k(lp, lp_ref) - entropy_coef · H       per token
        loss = aggregate(ℓ, mask, agg) with the mini-batch counts

    ``metrics`` are the variant's own (ratio, clip or gate fractions, ppo_kl); this adds
    loss/pg, entropy/mean (always), loss/entropy (when on) and, with kl_coef > 0, loss/kl
    and kl/mean: the penalised estimate k(lp, lp_ref), its token mean per sequence averaged
    over sequences (the adaptive controller's observed KL, ALGORITHMS.md §0.3). Without a
    KL penalty but with ref_logprobs in the batch (KL in the reward) it logs kl/<estimator>
    instead: the same statistic of the unpenalised estimate, current policy vs reference.
    When the runner put rollout-correction weights in ``cols`` (``LossSpec.rollout_is``,
    :func:`rollout_correction`), the policy term is ``w · pg`` per token (verl and TRL weigh
    the clipped surrogate the same way).
    """
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"]  # [B,T]
    entropy = cols["entropy"]  # [B,T] H(π_θ(·|s_t)); grad only when entropy_coef > 0
    if "rollout_is_weights" in cols:
        pg = pg * cols["rollout_is_weights"]  # [B,T] the sampler/trainer mismatch corrected
    per_token = pg
    if kl_coef > 0.0:
        k = kl_estimate(lp, cols["ref_logprobs"], kl)  # [B,T] grad through lp_θ (§0.3 placement 2)
        per_token = per_token + kl_coef * k
    if entropy_coef > 0.0:
        per_token = per_token - entropy_coef * entropy  # a bonus: minimising ℓ raises H
    loss = aggregate(per_token, mask, agg, counts)

    with torch.no_grad():
        c = counts.constant
        m = {"loss/pg": aggregate_mean(pg, mask, agg, c), **metrics, "entropy/mean": mean_of(entropy, mask)}
        if kl_coef > 0.0:
            m["loss/kl"] = aggregate_mean(kl_coef * k, mask, agg, c)
        if entropy_coef > 0.0:
            m["loss/entropy"] = aggregate_mean(-entropy_coef * entropy, mask, agg, c)
        if kl_coef > 0.0:
            m["kl/mean"] = _sequence_mean(k, mask)
        elif "ref_logprobs" in cols:
            m[f"kl/{kl}"] = _sequence_mean(kl_estimate(lp, cols["ref_logprobs"], kl), mask)
        return LossTerm(loss, _floats(m))


def _sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> Lazy:
    """Mean over non-empty rows of each row's token mean of ``x`` [B,T], as a metric
    ``Mean(Σ row means, rows)`` that adds up over micro-batches and ranks."""
    m = mask.to(x.dtype)
    lengths = m.sum(-1)  # [B]
    per_seq = (x * m).sum(-1) / lengths.clamp(min=1.0)  # [B]
    return Lazy(Mean, (per_seq.sum(), (lengths > 0).sum().to(x.dtype)))


# --- the unified view: each variant's gradient coefficient on ∇log π (DeepSeekMath §5.2.1) ---
#
# Sign: + raises the likelihood of the token. Read off the loss as -∂ℓ/∂lp per token; the
# aggregation's weights (1/|o|, 1/Σ|o|, ...) are not part of it.


def _clip_coefficient(spec) -> str:
    """clip and clip_higher: -∂L/∂lp = Aρ where the unclipped branch is taken, 0 where the clip binds."""
    lo, hi = ("ε", "ε") if hasattr(spec, "eps") else ("ε_low", "ε_high")
    binds = f"A > 0 ∧ ρ > 1+{hi} or A < 0 ∧ ρ < 1-{lo}" + (" or A < 0 ∧ ρ > c" if spec.dual_clip is not None else "")
    return f"A·ρ, 0 where the clip binds ({binds})"


def _cispo_coefficient(spec) -> str:
    return "A·sg(min(ρ, 1+ε_high))" if spec.eps_low is None else "A·sg(clip(ρ, 1-ε_low, 1+ε_high))"


def _dpo_coefficient(spec) -> str:
    """-∂ℓ/∂LP(o+) per pair (the negative of it on o-): sigmoid β·σ(-βh); cDPO
    β·((1-ε)σ(-βh) - εσ(βh)); IPO -2(h - 1/(2β))."""
    if spec.ipo:
        c = "2·(1/(2β) - h)"
    elif spec.label_smoothing > 0:
        c = "β·((1-ε)·σ(-βh) - ε·σ(βh))"
    else:
        c = "β·σ(-βh)"
    return f"±{c}, + on o+ and - on o-; h = LR(o+) - LR(o-), LR = Σ_t log π_θ/π_ref"


# --- PPO clip, clip-higher, dual-clip ---------------------------------------------------


@loss_variant(needs="logprobs", reads=_pg_reads, entropy=True, ratio=True, coefficient=_clip_coefficient)
def clip_higher(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps_low: Positive = 0.2,
    eps_high: Positive = 0.28,
    dual_clip: DualClip = None,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    entropy_coef: EntropyCoef = 0.0,
    agg: AggMode = "token-mean",
) -> LossTerm:
    """PPO clipped surrogate with asymmetric bounds (DAPO clip-higher), ALGORITHMS.md §0.2, §7.2.

        ρ   = exp(clamp(lp - lp_old, -20, 20))
        L   = max(-A ρ, -A clip(ρ, 1-ε_low, 1+ε_high))
        L   = min(L, -c A)  where A < 0, if dual_clip = c  (Ye et al. 2019)
        ℓ   = L + kl_coef · k(lp, lp_ref) - entropy_coef · H   (KL in the loss §0.3 / §4.2; bonus §1.4)
        loss = aggregate(ℓ, mask, agg) with the mini-batch counts (§0.4, Part A §3)

    ``clip`` is this with ε_low = ε_high = eps. Departures: the log-ratio is clamped to ±20
    (verl, OpenRLHF; not in the papers); k3 is clamped to ±10 (verl). H is the entropy of
    π_θ(·|s_t) over the whole vocabulary at the sampling temperature, aggregated like the
    loss (verl aggregates it with the loss's mode too). clip_frac counts tokens where the
    clipped branch is strictly larger (its gradient is zero); dual_clip_frac counts tokens
    where the dual bound -cA is the one taken; ppo_kl is the masked mean of lp_old - lp.
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be a constant c > 1 (ALGORITHMS.md §0.2), got {dual_clip}")
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"]  # [B,T]
    adv = cols["advantages"]  # [B,T]
    log_ratio = _log_ratio(cols)  # [B,T]
    ratio = torch.exp(log_ratio)  # [B,T]
    unclipped = -adv * ratio  # [B,T]
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B,T]
    pg = torch.maximum(unclipped, clipped)  # [B,T]
    if dual_clip is not None:
        pg_dual = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)  # [B,T]
    else:
        pg_dual = pg
    with torch.no_grad():
        m = {
            "clip_frac": mean_of((clipped > unclipped).to(lp.dtype), mask),
            "ratio/mean": mean_of(ratio, mask),
            "ppo_kl": _ppo_kl(log_ratio, mask),
        }
        if dual_clip is not None:
            m["dual_clip_frac"] = mean_of((pg_dual < pg).to(lp.dtype), mask)
    return _policy_term(pg_dual, cols, counts, kl_coef=kl_coef, kl=kl, entropy_coef=entropy_coef, agg=agg, metrics=m)


@loss_variant(needs="logprobs", reads=_pg_reads, entropy=True, ratio=True, coefficient=_clip_coefficient)
def clip(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps: Positive = 0.2,
    dual_clip: DualClip = None,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    entropy_coef: EntropyCoef = 0.0,
    agg: AggMode = "token-mean",
) -> LossTerm:
    """PPO clipped surrogate, symmetric ε (Schulman et al. 2017), ALGORITHMS.md §0.2, §1.4, §4.2.

    :func:`clip_higher` with ε_low = ε_high = eps; see it for the formula and departures.
    With kl_coef > 0, kl="k3" and agg="seq-mean-token-mean" it is the GRPO objective.
    """
    return clip_higher(cols, counts, eps_low=eps, eps_high=eps, dual_clip=dual_clip, kl_coef=kl_coef, kl=kl,
                       entropy_coef=entropy_coef, agg=agg)


# --- GSPO: one ratio per sequence -----------------------------------------------------------


@loss_variant(needs="logprobs", reads=_pg_reads, entropy=True, ratio=True,
              coefficient="A_i·s_i, s_i = exp(mean_t log ρ_{i,t}); 0 for the whole sequence where the clip binds "
                          "(A_i > 0 ∧ s_i > 1+ε_high or A_i < 0 ∧ s_i < 1-ε_low)")
def gspo(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps_low: Positive = 3e-4,
    eps_high: Positive = 4e-4,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    entropy_coef: EntropyCoef = 0.0,
    agg: AggMode = "seq-mean-token-mean",
) -> LossTerm:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071), in its
    GSPO-token form (the paper's eq. for s_{i,t}), as verl's ``gspo`` policy loss.

        s_i     = exp( (1/|y_i|) Σ_t (lp_{i,t} - lp_old_{i,t}) )     length-normalised sequence ratio
        s_{i,t} = sg[s_i] · π_θ(y_{i,t}) / sg[π_θ(y_{i,t})]           value s_i, gradient through each token
        A_i     = (1/|y_i|) Σ_t A_{i,t}                               the row's advantage (masked mean)
        L_{i,t} = max(-A_i s_{i,t}, -A_i clip(s_{i,t}, 1-ε_low, 1+ε_high))
        ℓ       = L + kl_coef · k(lp, lp_ref) - entropy_coef · H
        loss    = aggregate(ℓ, mask, agg),  agg = seq-mean-token-mean by default

    With seq-mean-token-mean this is the paper's sequence objective -(1/G) Σ_i min(s_i A_i,
    clip(s_i) A_i): every token of row i has the value s_i and the gradient -A_i s_i ∇lp_t,
    and ∇s_i = s_i (1/|y_i|) Σ_t ∇lp_t. (It holds in every aggregation mode, whose weights
    are constant within a row; only seq-mean-token-mean weighs sequences as the paper does.)
    The clip is decided once per sequence, so it binds for all its tokens or for none.
    Defaults: ε_low = 3e-4, ε_high = 4e-4 (the clipping ranges the paper sets; tiny because
    s_i is a per-token geometric mean); agg = seq-mean-token-mean (the paper's 1/G Σ_i;
    verl's gspo forces it whatever loss_agg_mode says).

    Departures: A_i is the masked mean of the row's token advantages, so a token-level
    advantage (GAE) is averaged to one per sequence; verl uses A_{i,t} per token (the
    paper's GSPO-token with distinct A_{i,t}). With the usual broadcast sequence advantage
    the two are identical. log s_{i,t} is clamped to ±20 (verl clamps it at +10 only);
    beyond the clamp it carries no gradient, as in :func:`clip_higher`. An empty row has
    s_i = 1 and no tokens. clip_frac counts tokens of clipped sequences (the paper reports
    the fraction of clipped tokens); ratio/mean is the token mean of s_i; ppo_kl is the
    masked mean of lp_old - lp over tokens.
    """
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"]  # [B,T]
    m = mask.to(lp.dtype)  # [B,T]
    lengths = m.sum(-1).clamp(min=1.0)  # [B] |y_i| (an empty row: 1, it has no tokens anyway)
    token_log_ratio = lp - cols["old_logprobs"]  # [B,T]
    seq_log_ratio = (token_log_ratio * m).sum(-1) / lengths  # [B] log s_i
    adv = (cols["advantages"] * m).sum(-1) / lengths  # [B] A_i
    log_s = (lp - lp.detach()) + seq_log_ratio.detach()[:, None]  # [B,T] log s_{i,t}: value log s_i, ∇ = ∇lp_t
    ratio = torch.exp(log_s.clamp(-20.0, 20.0))  # [B,T] s_{i,t}
    unclipped = -adv[:, None] * ratio  # [B,T]
    clipped = -adv[:, None] * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B,T]
    pg = torch.maximum(unclipped, clipped)  # [B,T]
    with torch.no_grad():
        metrics = {
            "clip_frac": mean_of((clipped > unclipped).to(lp.dtype), mask),
            "ratio/mean": mean_of(ratio, mask),
            "ppo_kl": _ppo_kl(token_log_ratio.clamp(-20.0, 20.0), mask),
        }
    return _policy_term(pg, cols, counts, kl_coef=kl_coef, kl=kl, entropy_coef=entropy_coef, agg=agg, metrics=metrics)


# --- CISPO: clip the importance weight, keep every token's gradient --------------------------


@loss_variant(needs="logprobs", reads=_pg_reads, entropy=True, ratio=True, coefficient=_cispo_coefficient)
def cispo(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps_low: MaybePositive = None,
    eps_high: Positive = 0.2,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    entropy_coef: EntropyCoef = 0.0,
    agg: AggMode = "token-mean",
) -> LossTerm:
    """CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, §3.1), as
    verl's ``cispo`` policy loss.

        ρ     = exp(clamp(lp - lp_old, -20, 20))
        r̂     = clip(ρ, 1-ε_low, 1+ε_high)                  no lower bound when eps_low is None
        L     = -sg(r̂) · A · lp                             every token keeps its gradient -r̂ A ∇lp
        ℓ     = L + kl_coef · k(lp, lp_ref) - entropy_coef · H
        loss  = aggregate(ℓ, mask, agg),  agg = token-mean by default

    Unlike PPO's clip, which zeroes the gradient of a token whose ratio left the band,
    CISPO only bounds the token's importance weight: the gradient is REINFORCE weighted by
    the clipped, detached ratio, so rare tokens whose probability jumps still learn.

    Defaults and why: the paper sets ε_low^IS "to a large value" (no lower bound) and tunes
    only ε_high^IS, without stating the value it used; eps_low = None (no lower bound) and
    eps_high = 0.2 follow verl's CISPO example (clip_ratio_low=10, clip_ratio_high=0.2).
    agg = token-mean is the paper's 1/Σ_i|o_i| normalisation. The paper's token mask M_{i,t}
    (its generalised form) is not implemented. Departures: the log-ratio clamp at ±20 (verl).
    The loss VALUE -r̂ A lp is not a surrogate of the objective (it scales with lp itself);
    only its gradient means something, so loss/pg is not comparable to clip's. clip_frac is
    the fraction of tokens whose weight was clipped (either side), ratio/mean the mean ρ.
    """
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"]  # [B,T]
    adv = cols["advantages"]  # [B,T]
    log_ratio = _log_ratio(cols)  # [B,T]
    with torch.no_grad():
        ratio = torch.exp(log_ratio)  # [B,T]
        low = 1.0 - eps_low if eps_low is not None else None
        weight = ratio.clamp(min=low, max=1.0 + eps_high)  # [B,T] sg(r̂)
        out_of_band = ratio > 1.0 + eps_high
        if low is not None:
            out_of_band = out_of_band | (ratio < low)
    pg = -weight * adv * lp  # [B,T]: gradient -r̂ A ∇lp on every valid token
    with torch.no_grad():
        metrics = {
            "clip_frac": mean_of(out_of_band.to(lp.dtype), mask),
            "ratio/mean": mean_of(ratio, mask),
            "ppo_kl": _ppo_kl(log_ratio, mask),
        }
    return _policy_term(pg, cols, counts, kl_coef=kl_coef, kl=kl, entropy_coef=entropy_coef, agg=agg, metrics=metrics)


# --- SAPO: a soft, temperature-controlled gate instead of the clip ---------------------------


@loss_variant(needs="logprobs", reads=_pg_reads, entropy=True, ratio=True,
              coefficient="A·ρ·sech²(τ(ρ-1)/2), τ = τ_pos if A > 0 else τ_neg")
def sapo(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    tau_pos: Positive = 1.0,
    tau_neg: Positive = 1.05,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    entropy_coef: EntropyCoef = 0.0,
    agg: AggMode = "seq-mean-token-mean",
) -> LossTerm:
    """SAPO, Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv 2511.20347), as verl's
    ``sapo`` policy loss.

        ρ     = exp(clamp(lp - lp_old, -20, 20))
        τ     = τ_pos where A > 0, τ_neg elsewhere
        f(ρ)  = σ(τ (ρ - 1)) · 4/τ                          the soft gate
        L     = -f(ρ) · A
        ℓ     = L + kl_coef · k(lp, lp_ref) - entropy_coef · H
        loss  = aggregate(ℓ, mask, agg),  agg = seq-mean-token-mean by default

    The gradient is -A · 4σ(1-σ) · ρ ∇lp = -A ρ sech²(τ(ρ-1)/2) ∇lp: exactly the
    unclipped policy gradient at ρ = 1 (the 4/τ makes the weight 1 there, whatever τ), and
    smoothly smaller as ρ leaves 1 on either side, faster for larger τ. Nothing is cut off.

    Defaults: τ_pos = 1.0, τ_neg = 1.05 (the paper's; τ_neg > τ_pos makes negative-advantage
    tokens, whose updates raise the logits of many unsampled tokens, decay faster);
    agg = seq-mean-token-mean (the paper's 1/G Σ_i 1/|y_i| Σ_t; verl's sapo forces it).
    Departures: the log-ratio clamp at ±20 (verl). A = 0 takes τ_neg (its term is 0 anyway).
    Metrics: gate/mean is the masked mean of the gradient weight 4σ(1-σ) (1: on-policy);
    gate_frac is the fraction of tokens whose gradient the gate cuts by more than half
    (weight < 1/2) — the soft counterpart of clip_frac; ratio/mean and ppo_kl as in clip.
    """
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"]  # [B,T]
    adv = cols["advantages"]  # [B,T]
    log_ratio = _log_ratio(cols)  # [B,T]
    ratio = torch.exp(log_ratio)  # [B,T]
    tau = torch.where(adv > 0, lp.new_tensor(tau_pos), lp.new_tensor(tau_neg))  # [B,T]
    p = torch.sigmoid(tau * (ratio - 1.0))  # [B,T]
    pg = -(4.0 / tau) * p * adv  # [B,T] = -f(ρ)·A
    with torch.no_grad():
        weight = 4.0 * p * (1.0 - p)  # [B,T] gradient weight relative to the unclipped -A ρ ∇lp
        metrics = {
            "gate/mean": mean_of(weight, mask),
            "gate_frac": mean_of((weight < 0.5).to(lp.dtype), mask),
            "ratio/mean": mean_of(ratio, mask),
            "ppo_kl": _ppo_kl(log_ratio, mask),
        }
    return _policy_term(pg, cols, counts, kl_coef=kl_coef, kl=kl, entropy_coef=entropy_coef, agg=agg, metrics=metrics)


# --- vanilla policy gradient -----------------------------------------------------------------


def _plain_pg_reads(spec) -> dict[str, str]:
    out = {"old_logprobs": "token", "advantages": "token"}  # old log-probs for ppo_kl only
    return {**out, "ref_logprobs": "token"} if spec.kl_coef > 0 else out


@loss_variant(needs="logprobs", reads=_plain_pg_reads, entropy=True, coefficient="A")
def pg(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    entropy_coef: EntropyCoef = 0.0,
    agg: AggMode = "token-mean",
) -> LossTerm:
    """Vanilla policy gradient (REINFORCE, Williams 1992): no ratio, no clip; the loss of GPG
    (Chu et al. 2025, arXiv 2504.02546) and verl's ``gpg`` policy loss.

        L     = -A · lp
        ℓ     = L + kl_coef · k(lp, lp_ref) - entropy_coef · H
        loss  = aggregate(ℓ, mask, agg),  agg = token-mean by default (verl's gpg)

    The gradient is -A ∇lp whatever policy sampled the tokens: it is on-policy REINFORCE,
    exact only for the first update on a batch. :func:`clip` at ρ = 1 has the same gradient
    there, but not after the first update (ρ ≠ 1 rescales it and the clip can zero it),
    which is why this is its own variant. Its old log-probs serve only ``ppo_kl`` (no ratio,
    no clip_frac). Departures: none in the loss; GPG's scaling of the advantage is the
    ``gpg`` Advantage variant's job.
    """
    pg_term = -cols["advantages"] * cols["logprobs"]  # [B,T]
    metrics = {"ppo_kl": _ppo_kl(_log_ratio(cols), cols["response_mask"])}
    return _policy_term(pg_term, cols, counts, kl_coef=kl_coef, kl=kl, entropy_coef=entropy_coef, agg=agg, metrics=metrics)


# --- critic: clipped value loss ------------------------------------------------------


class ExplainedVariance(Stat):
    """1 - Var(Ret - V) / Var(Ret) kept as its sums (n, Σres, Σres², Σret, Σret²), so that it
    adds up over micro-batches and ranks (``rlflow.dist``); population variances."""

    @staticmethod
    def compute(n: float, s_res: float, ss_res: float, s_ret: float, ss_ret: float) -> float:
        n = max(n, 1.0)
        var_res = ss_res / n - (s_res / n) ** 2
        var_ret = ss_ret / n - (s_ret / n) ** 2
        return 1.0 - var_res / (var_ret + 1e-8)

    @staticmethod
    def of(ret: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> Lazy:
        m = mask.to(torch.float64)
        res, r = (ret - v).to(torch.float64) * m, ret.to(torch.float64) * m  # [B,T]
        return Lazy(ExplainedVariance, (m.sum(), res.sum(), (res * res).sum(), r.sum(), (r * r).sum()))


@loss_variant(needs="values", reads={"values": "token", "returns": "token"}, coefficient="(critic, on ∇V) Ret - V, 0 where the value clip binds")
def value(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps_v: Positive = 0.5,
    agg: AggMode = "token-mean",
) -> LossTerm:
    """Clipped value loss, ALGORITHMS.md §1.4 (PPO2 baselines; verl, OpenRLHF).

        V_clip = V_old + clamp(V_new - V_old, -ε_v, ε_v)
        ℓ      = 1/2 · max((V_new - Ret)², (V_clip - Ret)²)
        loss   = aggregate(ℓ, mask, agg) with the mini-batch counts

    No vf_coef: the critic has its own optimizer (verl, OpenRLHF). value/explained_variance
    is 1 - Var(Ret - V_new) / Var(Ret) over the valid tokens of every micro-batch and rank
    of the step (population variances; 1e-8 keeps a constant Ret finite).
    """
    v_new = cols["new_values"]  # [B,T] grad
    v_old = cols["values"]  # [B,T]
    ret = cols["returns"]  # [B,T]
    mask = cols["response_mask"]  # [B,T]
    v_clip = v_old + (v_new - v_old).clamp(-eps_v, eps_v)  # [B,T]
    unclipped = (v_new - ret) ** 2  # [B,T]
    clipped = (v_clip - ret) ** 2  # [B,T]
    per_token = 0.5 * torch.maximum(unclipped, clipped)  # [B,T]
    loss = aggregate(per_token, mask, agg, counts)

    with torch.no_grad():
        metrics = _floats(
            {
                "loss/value": aggregate_mean(per_token, mask, agg, counts.constant),
                "value/clip_frac": mean_of((clipped > unclipped).to(v_new.dtype), mask),
                "value/explained_variance": ExplainedVariance.of(ret, v_new, mask),
            }
        )
    return LossTerm(loss, metrics)


# --- likelihood: SFT and VAPO's positive-example LM loss ------------------------------


def _nll_mask(cols: Mapping[str, torch.Tensor], params: dict) -> torch.Tensor:
    """The rows the likelihood is taken over: every row, or the correct ones only."""
    mask = cols["response_mask"]  # [B,T]
    if params.get("where", "all") == "correct":
        return mask * (cols["rewards"] > 0).to(mask.dtype).unsqueeze(-1)  # [B,T]: correct rows only
    return mask


def _nll_reads(spec) -> dict[str, str]:
    return {"rewards": "seq"} if spec.where == "correct" else {}


@loss_variant(needs="logprobs", reads=_nll_reads, mask=_nll_mask,
              coefficient=lambda spec: "1[R > 0]" if spec.where == "correct" else "1")
def nll(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    agg: AggMode = "token-mean",
    where: Literal["all", "correct"] = "all",
) -> LossTerm:
    """Negative log-likelihood of the responses: SFT, and VAPO's L_NTP (ALGORITHMS.md §8, item 6).

        loss = -aggregate(lp, mask', agg)
        mask' = response_mask                      where="all"
              = response_mask · 1[rewards > 0]     where="correct"  (VAPO: N = tokens of correct samples)

    With where="correct" and token-mean this is VAPO's -(1/N) Σ_{o∈𝒯} Σ_t lp; its weight
    μ is the node's ``coef``. A mini-batch with no correct sample gives 0 (N is clamped to 1).
    """
    mask = _nll_mask(cols, {"where": where})  # [B,T]
    lp = cols["logprobs"]  # [B,T] grad
    loss = -aggregate(lp, mask, agg, counts)
    with torch.no_grad():
        metrics = _floats({"loss/nll": aggregate_mean(-lp, mask, agg, counts.constant)})
    return LossTerm(loss, metrics)


# --- preferences: DPO / cDPO / IPO, Bradley–Terry reward model ----------------------


@loss_variant(needs="logprobs", reads={"ref_logprobs": "token", "group": "seq", "chosen": "seq"},
              coefficient=_dpo_coefficient)
def dpo(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    beta: Positive = 0.1,
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0,
    ipo: bool = False,
) -> LossTerm:
    """DPO (Rafailov et al. 2023), cDPO label smoothing and IPO, ALGORITHMS.md §9.1, Part A §11.

        LP(y) = Σ_t m_t lp_t                           (sums, not means)
        h     = (LP_θ(y_w) - LP_θ(y_l)) - (LP_ref(y_w) - LP_ref(y_l))
        ℓ     = -(1-ε) log σ(βh) - ε log σ(-βh)       sigmoid / cDPO (ε = label_smoothing)
        ℓ     = (h - 1/(2β))²                          ipo=True (Azar et al. 2023)
        loss  = Σ_pairs ℓ / counts.groups              (mean over the mini-batch's pairs)

    A pair is the two rows sharing ``group``, chosen = 1 and chosen = 0; they need not be
    adjacent but must sit in the same micro-batch. Departures: IPO uses summed log-probs
    (TRL now divides by the completion length); label_smoothing with ipo is refused rather
    than ignored. Metrics report the implicit rewards r̂ = β (LP_θ - LP_ref), means over pairs.
    """
    if ipo and label_smoothing != 0.0:
        raise ValueError("dpo: label_smoothing applies to the sigmoid loss only, not ipo=True")
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"].to(lp.dtype)  # [B,T]
    order = _pairs(cols["group"], cols["chosen"], "dpo")  # [2P]
    seq = (lp * mask).sum(-1)  # [B] LP_θ
    seq_ref = (cols["ref_logprobs"] * mask).sum(-1)  # [B] LP_ref
    lp_w, lp_l = _by_pair(seq, order)  # [P], [P]
    ref_w, ref_l = _by_pair(seq_ref, order)  # [P], [P]
    h = (lp_w - lp_l) - (ref_w - ref_l)  # [P]
    if ipo:
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2  # [P]
    else:
        per_pair = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)  # [P]
    loss = per_pair.sum() / max(counts.groups, 1.0)

    with torch.no_grad():
        metrics = _floats(
            {
                "loss/dpo": _over_pairs(per_pair),
                "dpo/reward_accuracy": _over_pairs((h > 0).to(lp.dtype)),
                "dpo/margin": _over_pairs(beta * h),
                "dpo/chosen_reward": _over_pairs(beta * (lp_w - ref_w)),
                "dpo/rejected_reward": _over_pairs(beta * (lp_l - ref_l)),
            }
        )
    return LossTerm(loss, metrics)


def _row_mask(cols: Mapping[str, torch.Tensor], params: dict) -> torch.Tensor:
    """One "token" per row: the Bradley–Terry loss is over whole responses."""
    return torch.ones_like(cols["group"], dtype=torch.float32).unsqueeze(-1)  # [B,1]: one "token" per row


@loss_variant(needs="scores", reads={"group": "seq", "chosen": "seq"}, mask=_row_mask,
              coefficient="(reward model, on ∇s) ±σ(-(s_w - s_l)), + on o+ and - on o-")
def bradley_terry(cols: Mapping[str, torch.Tensor], counts: Counts) -> LossTerm:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1).

        ℓ    = -log σ(s_w - s_l)                  s = scores [B], one scalar per response
        loss = Σ_pairs ℓ / counts.groups          (mean over the mini-batch's pairs)

    Pairs as in :func:`dpo`. InstructGPT's K-choose-2 comparisons per prompt are not
    supported: a group holds exactly one chosen and one rejected row. No margin term. DPO
    (ALGORITHMS.md §9.1) is the same likelihood with r = β (LP_θ - LP_ref) in place of s.
    """
    s = cols["scores"]  # [B] grad
    s_w, s_l = _by_pair(s, _pairs(cols["group"], cols["chosen"], "bradley_terry"))  # [P], [P]
    margin = s_w - s_l  # [P]
    per_pair = F.softplus(-margin)  # [P] = -log σ(margin), stable
    loss = per_pair.sum() / max(counts.groups, 1.0)
    with torch.no_grad():
        metrics = _floats(
            {
                "loss/rm": _over_pairs(per_pair),
                "rm/accuracy": _over_pairs((margin > 0).to(s.dtype)),
                "rm/margin": _over_pairs(margin),
            }
        )
    return LossTerm(loss, metrics)


# --- the node runner: what the engine's update loop asks of each Loss node ------------------


@runner("loss")
class LossRunner(ModelRunner):
    """A Loss node in the update loop. The engine, per mini-batch and model, asks every
    runner on that model for its :meth:`counts` (denominators of the whole mini-batch),
    runs one forward per micro-batch with :meth:`outputs` (the union of what the terms
    need), and sums the runners' :meth:`term` s into the model's loss."""

    def __init__(self, spec):
        super().__init__(spec)
        self.variant = LOSSES[spec.variant]
        self.params = self.variant.arguments(spec)
        # β of the KL in the loss: the node's kl_coef, adapted after each step when kl_target is set
        self.kl = KlController(self.params.get("kl_coef", 0.0), spec.kl_target, spec.kl_horizon)
        self._observed = [0.0, 0.0]  # Σ over sequences of their token-mean KL, sequences: this step's update

    @property
    def needs(self) -> str:
        """The model outputs of this term, for the engine's one forward, joined by "+".

        The variant's ``needs`` ("logprobs", "values" or "scores"); a policy loss (fact
        ``entropy``) adds "entropy" (the per-token entropy as a metric, no gradient) or,
        when its ``entropy_coef`` > 0 puts it in the loss, "entropy_grad".
        """
        need = self.variant.needs
        if self.variant.entropy:
            need += "+entropy_grad" if self.params.get("entropy_coef", 0.0) > 0 else "+entropy"
        return need

    def _cols(self, cols: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The columns the loss sees: its own mask column stands in for ``response_mask``."""
        mask = self.spec.mask
        return cols if mask == "response_mask" else {**cols, "response_mask": cols[mask]}

    def counts(self, mini) -> Counts:
        """Denominators of the whole mini-batch (all ranks), over this loss's effective mask."""
        mask = self.variant.mask(self._cols(mini.tensors()), self.params)
        return count(mask, mini.get("group"), constant=self.spec.agg_constant or 1.0)

    def term(self, cols: Mapping[str, torch.Tensor], counts: Counts) -> LossTerm:
        """This micro-batch's share of ``coef ·`` the loss, and its metrics (with the KL
        penalty's current β as kl/beta, and the rollout correction's weights and metrics when
        ``rollout_is`` is set)."""
        cols, extra = self._cols(cols), {}
        s = self.spec
        if s.rollout_is:
            w, extra = rollout_correction(cols["old_logprobs"], cols["rollout_logprobs"], cols["response_mask"],
                                          level=s.rollout_is, mode=s.rollout_is_mode, low=s.rollout_is_min,
                                          high=s.rollout_is_max)
            cols = {**cols, "rollout_is_weights": w}
        beta = self.kl.beta
        params = {**self.params, "kl_coef": beta} if "kl_coef" in self.params else self.params
        t = self.variant.fn(cols, counts, **params)
        if beta > 0.0:
            t.metrics["kl/beta"] = beta
            if self.kl.adaptive and "kl/mean" in t.metrics:  # Mean(Σ sequence means, sequences)
                self._observed = [a + b for a, b in zip(self._observed, t.metrics["kl/mean"].sums)]
        return LossTerm(s.coef * t.loss, {**t.metrics, **(_floats(extra) if extra else {})})

    def after_update(self, batch) -> dict[str, float]:
        """The end of a step's update: an adaptive β moves towards its target KL, observed over
        every micro-batch of the update (all ranks), n = the batch's sequences (all ranks)."""
        if self.kl.adaptive:
            total, seqs, rows = all_reduce_sum(torch.tensor([*self._observed, float(len(batch))], dtype=torch.float64)).tolist()
            if seqs > 0:
                self.kl.update(total / seqs, rows)
        self._observed = [0.0, 0.0]
        return {}

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps of this runner: an adaptive β ({} otherwise)."""
        return self.kl.state_dict() if self.kl.adaptive else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl.load_state_dict(state)

    def outputs(self, worker, micro, needs: set[str], positions=None) -> dict[str, torch.Tensor]:
        """One forward of ``worker`` on a micro-batch, with grad: every output in ``needs``
        (the :attr:`needs` of every term on this model). Entropy comes from the same
        forward as the log-probs; it carries gradient if any term asks "entropy_grad".
        The batch is packed without padding when the model does (``rlflow.node.packs``);
        ``positions`` (rlflow.packing.Positions) counts what the forward computed."""
        from rlflow.forward import response_logprobs, response_logprobs_and_entropy, response_values, sequence_scores

        wanted = {part for need in needs for part in need.split("+")}
        args = (micro["prompt_ids"], micro["prompt_mask"], micro["response_ids"], micro["response_mask"])
        temperature = self.spec.temperature or 1.0
        kw = {"padding_free": packs(worker.spec), "positions": positions}
        out: dict[str, torch.Tensor] = {}
        if wanted & {"entropy", "entropy_grad"}:
            out["logprobs"], out["entropy"] = response_logprobs_and_entropy(
                worker.engine, *args, temperature=temperature, entropy_grad="entropy_grad" in wanted, **kw)
        elif "logprobs" in wanted:
            out["logprobs"] = response_logprobs(worker.engine, *args, temperature=temperature, **kw)
        if "values" in wanted:
            out["new_values"] = response_values(worker.engine, *args, **kw)
        if "scores" in wanted:
            out["scores"] = sequence_scores(worker.engine, *args, **kw)
        return out
