"""Loss: every variant as a pure function of one micro-batch, ALGORITHMS.md §0.2–0.4, §1.4, §8, §9.

A variant is ``fn(cols, counts, **params) -> LossTerm``:

* ``cols`` holds the micro-batch's batch columns plus the model output the variant
  ``needs``: ``logprobs`` [B,T] (π_θ at the sampling temperature, grad, 0 on padding),
  ``new_values`` [B,T] (critic, grad) or ``scores`` [B] (reward model, grad).
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
from typing import Annotated, Literal, Mapping, Optional

from pydantic import Field

from rlflow.lazy import F, no_grad, torch
from rlflow.node import ModelRunner, runner
from rlflow.spec import LOSSES, loss_variant

from .masked import AggMode, Counts, KlCoef, KlEstimator, aggregate, count, kl_estimate, masked_mean

Positive = Annotated[float, Field(gt=0)]
DualClip = Annotated[Optional[float], Field(gt=1, description="dual-clip constant c > 1 (Ye et al. 2019); None: off")]


@dataclass
class LossTerm:
    loss: torch.Tensor  # scalar with grad: this micro-batch's share of the mini-batch loss
    metrics: dict[str, float]  # micro-batch values; the engine averages them


# --- helpers -------------------------------------------------------------------------


def _local_counts(mask: torch.Tensor, constant: float) -> Counts:
    """This micro-batch's own denominators, for metrics only (no all-reduce)."""
    m = mask.detach().to(torch.float64)
    return Counts(tokens=m.sum().item(), seqs=(m.sum(-1) > 0).sum().item(), rows=float(m.shape[0]), constant=constant)


def _floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors to plain floats, with one device sync for all of them."""
    flat = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, flat))


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


# --- policy gradient: PPO clip, clip-higher, dual-clip, KL in the loss ---------------


def _pg_reads(spec) -> dict[str, str]:
    out = {"old_logprobs": "token", "advantages": "token"}
    return {**out, "ref_logprobs": "token"} if spec.kl_coef > 0 else out


@loss_variant(needs="logprobs", reads=_pg_reads, coefficient="A·ρ·1[ρ inside the clip where it binds]")
def clip_higher(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps_low: Positive = 0.2,
    eps_high: Positive = 0.28,
    dual_clip: DualClip = None,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    agg: AggMode = "token-mean",
) -> LossTerm:
    """PPO clipped surrogate with asymmetric bounds (DAPO clip-higher), ALGORITHMS.md §0.2, §7.2.

        ρ   = exp(clamp(lp - lp_old, -20, 20))
        L   = max(-A ρ, -A clip(ρ, 1-ε_low, 1+ε_high))
        L   = min(L, -c A)  where A < 0, if dual_clip = c  (Ye et al. 2019)
        ℓ   = L + kl_coef · k(lp, lp_ref)                  (KL in the loss, §0.3 / §4.2)
        loss = aggregate(ℓ, mask, agg) with the mini-batch counts (§0.4, Part A §3)

    ``clip`` is this with ε_low = ε_high = eps. Departures: the log-ratio is clamped to ±20
    (verl, OpenRLHF; not in the papers); k3 is clamped to ±10 (verl). No entropy bonus.
    clip_frac counts tokens where the clipped branch is strictly larger (its gradient is
    zero); dual_clip_frac counts tokens where the dual bound -cA is the one taken.
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be a constant c > 1 (ALGORITHMS.md §0.2), got {dual_clip}")
    lp = cols["logprobs"]  # [B,T] grad
    mask = cols["response_mask"]  # [B,T]
    adv = cols["advantages"]  # [B,T]
    ratio = torch.exp((lp - cols["old_logprobs"]).clamp(-20.0, 20.0))  # [B,T]
    unclipped = -adv * ratio  # [B,T]
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B,T]
    pg = torch.maximum(unclipped, clipped)  # [B,T]
    if dual_clip is not None:
        pg_dual = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)  # [B,T]
    else:
        pg_dual = pg
    per_token = pg_dual
    if kl_coef > 0.0:
        k = kl_estimate(lp, cols["ref_logprobs"], kl)  # [B,T] grad through lp_θ (§0.3 placement 2)
        per_token = per_token + kl_coef * k
    loss = aggregate(per_token, mask, agg, counts)

    with torch.no_grad():
        local = _local_counts(mask, counts.constant)
        m = {
            "loss/pg": aggregate(pg_dual, mask, agg, local),
            "clip_frac": masked_mean((clipped > unclipped).to(lp.dtype), mask),
            "ratio/mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            m["dual_clip_frac"] = masked_mean((pg_dual < pg).to(lp.dtype), mask)
        if kl_coef > 0.0:
            m["loss/kl"] = aggregate(kl_coef * k, mask, agg, local)
        if "ref_logprobs" in cols:
            m["kl/mean"] = masked_mean(kl_estimate(lp, cols["ref_logprobs"], kl), mask)
        metrics = _floats(m)
    return LossTerm(loss, metrics)


@loss_variant(needs="logprobs", reads=_pg_reads, coefficient="A·ρ·1[ρ inside the clip where it binds]")
def clip(
    cols: Mapping[str, torch.Tensor],
    counts: Counts,
    *,
    eps: Positive = 0.2,
    dual_clip: DualClip = None,
    kl_coef: KlCoef = 0.0,
    kl: KlEstimator = "k3",
    agg: AggMode = "token-mean",
) -> LossTerm:
    """PPO clipped surrogate, symmetric ε (Schulman et al. 2017), ALGORITHMS.md §0.2, §1.4, §4.2.

    :func:`clip_higher` with ε_low = ε_high = eps; see it for the formula and departures.
    With kl_coef > 0, kl="k3" and agg="seq-mean-token-mean" it is the GRPO objective.
    """
    return clip_higher(cols, counts, eps_low=eps, eps_high=eps, dual_clip=dual_clip, kl_coef=kl_coef, kl=kl, agg=agg)


# --- critic: clipped value loss ------------------------------------------------------


@loss_variant(needs="values", reads={"values": "token", "returns": "token"}, coefficient="(critic) V - Ret")
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
    is 1 - Var(Ret - V_new) / Var(Ret) over the micro-batch's valid tokens (population
    variances; 1e-8 keeps a constant Ret finite).
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
        local = _local_counts(mask, counts.constant)
        resid = ret - v_new  # [B,T]
        var_res = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
        var_ret = masked_mean((ret - masked_mean(ret, mask)) ** 2, mask)
        metrics = _floats(
            {
                "loss/value": aggregate(per_token, mask, agg, local),
                "value/clip_frac": masked_mean((clipped > unclipped).to(v_new.dtype), mask),
                "value/explained_variance": 1.0 - var_res / (var_ret + 1e-8),
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


@loss_variant(needs="logprobs", reads=_nll_reads, mask=_nll_mask, coefficient="1 (on the rows kept)")
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
        local = _local_counts(mask, counts.constant)
        metrics = _floats({"loss/nll": -aggregate(lp, mask, agg, local)})
    return LossTerm(loss, metrics)


# --- preferences: DPO / cDPO / IPO, Bradley–Terry reward model ----------------------


@loss_variant(needs="logprobs", reads={"ref_logprobs": "token", "group": "seq", "chosen": "seq"},
              coefficient="β·σ(-βh)·(+1 chosen, -1 rejected)")
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
                "loss/dpo": per_pair.mean(),
                "dpo/reward_accuracy": (h > 0).to(lp.dtype).mean(),
                "dpo/margin": (beta * h).mean(),
                "dpo/chosen_reward": (beta * (lp_w - ref_w)).mean(),
                "dpo/rejected_reward": (beta * (lp_l - ref_l)).mean(),
            }
        )
    return LossTerm(loss, metrics)


def _row_mask(cols: Mapping[str, torch.Tensor], params: dict) -> torch.Tensor:
    """One "token" per row: the Bradley–Terry loss is over whole responses."""
    return torch.ones_like(cols["group"], dtype=torch.float32).unsqueeze(-1)  # [B,1]: one "token" per row


@loss_variant(needs="scores", reads={"group": "seq", "chosen": "seq"}, mask=_row_mask,
              coefficient="(reward model) σ(-(s_w - s_l))")
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
                "loss/rm": per_pair.mean(),
                "rm/accuracy": (margin > 0).to(s.dtype).mean(),
                "rm/margin": margin.mean(),
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

    @property
    def needs(self) -> str:
        return self.variant.needs

    def _cols(self, cols: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The columns the loss sees: its own mask column stands in for ``response_mask``."""
        mask = self.spec.mask
        return cols if mask == "response_mask" else {**cols, "response_mask": cols[mask]}

    def counts(self, mini) -> Counts:
        """Denominators of the whole mini-batch (all ranks), over this loss's effective mask."""
        mask = self.variant.mask(self._cols(mini.tensors()), self.params)
        return count(mask, mini.get("group"), constant=self.spec.agg_constant or 1.0)

    def term(self, cols: Mapping[str, torch.Tensor], counts: Counts) -> LossTerm:
        """This micro-batch's share of ``coef ·`` the loss, and its metrics."""
        t = self.variant.fn(self._cols(cols), counts, **self.params)
        return LossTerm(self.spec.coef * t.loss, t.metrics)

    def outputs(self, worker, micro, needs: set[str]) -> dict[str, torch.Tensor]:
        """One forward of ``worker`` on a micro-batch, with grad: every output in ``needs``."""
        from rlflow.forward import response_logprobs, response_values, sequence_scores

        args = (micro["prompt_ids"], micro["prompt_mask"], micro["response_ids"], micro["response_mask"])
        out: dict[str, torch.Tensor] = {}
        if "logprobs" in needs:
            out["logprobs"] = response_logprobs(worker.engine, *args, temperature=self.spec.temperature or 1.0)
        if "values" in needs:
            out["new_values"] = response_values(worker.engine, *args)
        if "scores" in needs:
            out["scores"] = sequence_scores(worker.engine, *args)
        return out
