"""Advantage: every estimator as a pure torch function, ALGORITHMS.md §1–§8.

Tensors in, tensors out: no model, no Batch. Shapes: ``B`` rows (one per response),
``T`` response tokens, right-padded. ``mask`` is 1 on response tokens (EOS included) and
0 on padding (§0.1); the sequence score ``R_i`` sits on the last valid token ``T_i``.

Every variant is one function ``fn(x: AdvantageInputs, *, <settings>) -> AdvantageResult``
declared with ``@advantage_variant`` (:mod:`rlflow.variants`): its keyword-only settings,
their defaults and bounds are its spec; the decorator says which extra columns it reads
(``values``, ``baseline_rewards``) and whether it needs several samples per prompt. Every
variant takes ``kl_coef`` (KL in the reward, §0.3 placement 1; the per-token estimate
``x.kl`` is computed upstream from old vs ref log-probs) and ``whiten`` (global
token-weighted whitening, Part A §5). The table of variants and settings is generated
into docs/nodes.md.

Metrics (floats, over every valid token of the batch, all ranks):
    advantages/mean, advantages/std       the final advantages (after whitening if on)
    returns/mean, returns/std             critic targets (gae only)
    advantages/lambda_actor_mean          mean per-sequence λ_actor over non-empty rows (gae with length_alpha)
    rewards/kl_penalty                    mean over rows of kl_coef·Σ_t m k (only when kl_coef > 0)
    kl/mean, kl/beta                      the runner's, when kl_coef > 0: the penalised estimate k(old, ref),
                                          its token mean per sequence averaged over sequences (the adaptive
                                          controller's observed KL), and the β this batch used
    advantages/gpg_alpha                  gpg's α = B'/M, non-empty rows over those with a non-zero advantage

Group statistics (group_norm, group_center, rloo, opo, gpg) are taken over the rows of this call:
every response of a prompt must be in the same call (the engine keeps groups whole).
A row with an empty mask keeps its score in its group's statistics and gets advantage 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, NamedTuple, Optional

from pydantic import Field

from rlflow.dist import all_reduce_sum
from rlflow.lazy import no_grad, torch
from rlflow.node import NodeRunner, runner
from rlflow.nodes.masked import KlCoef, KlController, kl_estimate, masked_whiten, sequence_mean_kl
from rlflow.spec import ADVANTAGES, advantage_variant

Unit = Annotated[float, Field(ge=0, le=1)]

# ---------------------------------------------------------------------------------------
# Contract


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor  # [B] float, sequence score R_i from Score
    mask: torch.Tensor  # [B, T] response mask (1 on tokens incl. EOS, 0 on padding)
    group: torch.Tensor  # [B] long, prompt id (rows of one prompt share it)
    values: torch.Tensor | None = None  # [B, T] critic values V_{i,t} (gae only)
    kl: torch.Tensor | None = None  # [B, T] per-token KL estimate, old vs ref (KL in reward)
    baseline_rewards: torch.Tensor | None = None  # [B] score of the greedy response (ReMax)


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # [B, T], 0 on padding
    returns: torch.Tensor | None  # [B, T] critic targets (gae), else None
    metrics: dict[str, float]  # namespaced: "advantages/mean", "returns/mean", ...


# ---------------------------------------------------------------------------------------
# Pure helpers (the tests call these directly)


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """1 on the last valid token T_i of each row, 0 elsewhere (all 0 for an empty row)."""
    valid = mask > 0  # [B, T]
    if valid.shape[-1] == 0:
        return valid  # T = 0: no tokens at all
    pos = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    last = torch.where(valid, pos, -1).amax(-1)  # [B] index of T_i, -1 for an empty row
    return pos == last[:, None]  # [B, T] bool


def token_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Per-token rewards, §1.2: ``r_{i,t} = -β·k_{i,t} + 1[t = T_i]·R_i``, 0 on padding.

    The KL term is dropped when ``kl_coef == 0`` (``kl`` may then be None).
    """
    if kl_coef != 0.0 and kl is None:
        raise ValueError(f"kl_coef={kl_coef} puts KL in the reward but no per-token kl was given")
    r = torch.where(last_token(mask), rewards[:, None], 0.0)  # [B, T] score on T_i only
    if kl_coef != 0.0:
        r = r - kl_coef * torch.where(mask > 0, kl.to(rewards.dtype), 0.0)  # [B, T] KL on valid tokens only
    return r


def sequence_rewards(
    rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Sequence scalar with KL in the reward, RLOO paper §3.1: ``R_i - β·Σ_t m_{i,t} k_{i,t}``."""
    if kl_coef == 0.0:
        return rewards
    if kl is None:
        raise ValueError(f"kl_coef={kl_coef} puts KL in the reward but no per-token kl was given")
    return rewards - kl_coef * torch.where(mask > 0, kl.to(rewards.dtype), 0.0).sum(-1)  # [B]


class GroupStats(NamedTuple):
    """Per-row statistics of each row's group (every tensor is [B])."""

    mean: torch.Tensor  # mean of the group's values
    std: torch.Tensor  # Bessel-corrected std of the group's values
    size: torch.Tensor  # number of rows in the group
    loo_mean: torch.Tensor  # mean of the OTHER rows of the group (leave-one-out)


def _groups(group: torch.Tensor, values: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group ids [G], each row's group index [B], group sizes [G] and each group's first
    row's value [G] (the shift that makes sums over a group of equal values exact).

    A group of size 1 has no baseline and raises ValueError naming it (Part A §4).
    """
    ids, inv = torch.unique(group, return_inverse=True)  # [G], [B] in 0..G-1
    n_groups, b = ids.numel(), values.shape[0]
    size = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inv, torch.ones_like(values))  # [G]
    singles = ids[size == 1]
    if singles.numel() > 0:
        named = ", ".join(str(g) for g in singles.tolist())
        raise ValueError(
            f"{variant}: group(s) {named} have a single response; a group needs at least 2 "
            f"responses per prompt for a baseline (ALGORITHMS.md Part A §4)"
        )
    rows = torch.arange(b, device=values.device)
    first = torch.full((n_groups,), b, device=values.device).scatter_reduce_(0, inv, rows, reduce="amin")  # [G]
    return ids, inv, size, values[first]


def group_mean_std(values: torch.Tensor, group: torch.Tensor, variant: str = "group statistics") -> GroupStats:
    """Group mean, Bessel std and leave-one-out mean of ``values`` [B] per ``group`` [B].

    Vectorised with ``index_add_``; group ids need be neither contiguous nor 0..G-1.
    Each group is shifted by its first value before summing, so a group of equal values
    gives a mean equal to that value and a std of exactly 0 (not rounding noise).
    A group of size 1 has no baseline and raises ValueError naming it (Part A §4).
    """
    # shift each group by its first row: exact zeros for equal values, less cancellation
    _, inv, size, shift = _groups(group, values, variant)  # [B], [G], [G]
    d = values - shift[inv]  # [B]
    d_sum = torch.zeros_like(shift).index_add_(0, inv, d)  # [G]
    mean_d = d_sum / size  # [G]
    dev = d - mean_d[inv]  # [B] R_i - mean_g
    ss = torch.zeros_like(shift).index_add_(0, inv, dev * dev)  # [G] Σ (R - mean)²
    std = (ss / (size - 1)).sqrt()  # [G] Bessel
    n = size[inv]  # [B]
    loo_mean = shift[inv] + (d_sum[inv] - d) / (n - 1)  # [B] (Σ_g R - R_i)/(n-1)
    return GroupStats(mean=shift[inv] + mean_d[inv], std=std[inv], size=n, loo_mean=loo_mean)


def group_weighted_mean(values: torch.Tensor, weights: torch.Tensor, group: torch.Tensor,
                        variant: str = "group statistics") -> torch.Tensor:
    """Each row's group mean of ``values`` [B] weighted by ``weights`` [B] ≥ 0: ``Σ_g w v / Σ_g w``, [B].

    Shifted by the group's first value like :func:`group_mean_std`, so a group of equal
    values gives exactly that value. A group whose weights sum to 0 gets its first value.
    A group of size 1 raises ValueError naming it (Part A §4).
    """
    _, inv, _, shift = _groups(group, values, variant)  # [B], [G]
    d = values - shift[inv]  # [B]
    num = torch.zeros_like(shift).index_add_(0, inv, weights * d)  # [G] Σ w (v - shift)
    den = torch.zeros_like(shift).index_add_(0, inv, weights)  # [G] Σ w
    mean_d = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)  # [G]
    return shift[inv] + mean_d[inv]  # [B]


def discounted_cumsum(x: torch.Tensor, mask: torch.Tensor, discount: float | torch.Tensor) -> torch.Tensor:
    """Reverse discounted sum over valid tokens: ``y_t = x_t + d·y_{t'}``, t' the next valid token.

    ``discount`` is a float or a per-row tensor [B]. Returns [B, T], 0 on padding; the sum
    after the last valid token is 0. Interior zeros of the mask (none in rlflow, whose
    masks are right-padded) are skipped, as verl's GAE loop does.
    """
    m = mask > 0  # [B, T]
    d = torch.as_tensor(discount, dtype=x.dtype, device=x.device).expand(x.shape[0])  # [B]
    carry = x.new_zeros(x.shape[0])  # [B] y at the next valid token
    out = []
    for t in reversed(range(x.shape[1])):
        y = x[:, t] + d * carry  # [B]
        carry = torch.where(m[:, t], y, carry)
        out.append(torch.where(m[:, t], y, 0.0))
    return torch.stack(out[::-1], dim=1) if out else torch.zeros_like(x)  # [B, T]


def td_residuals(r: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """TD residuals, §1.3: ``δ_t = r_t + γ·V_{t+1} - V_t`` with ``V_{T_i+1} := 0``; 0 on padding.

    The bootstrap after the last valid token is 0 also for truncated responses (§0.1).
    """
    m = mask > 0  # [B, T]
    carry = values.new_zeros(values.shape[0])  # [B] V at the next valid token (0 after T_i)
    nxt = []
    for t in reversed(range(values.shape[1])):
        nxt.append(carry)
        carry = torch.where(m[:, t], values[:, t], carry)  # only valid tokens are ever read
    v_next = torch.stack(nxt[::-1], dim=1) if nxt else torch.zeros_like(values)  # [B, T]
    return torch.where(m, r + gamma * v_next - values, 0.0)  # [B, T]


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO §8: ``λ_i = clamp(1 - 1/(α·l_i), 0, 1)``; l=100, α=0.05 → 0.8; l ≤ 1/α → 0.

    The clamp is ours: the paper does not say what happens for ``l_i ≤ 1/α`` (λ ≤ 0).
    An empty row (l = 0) gets 0; it has no tokens for λ to act on.
    """
    lengths = lengths.to(torch.float64)
    lam = 1.0 - 1.0 / (alpha * lengths.clamp(min=1.0))  # [B]
    return lam.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------
# Shared plumbing of the variants


def _moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Token-weighted mean and Bessel std of ``x`` over valid tokens of all ranks (0 if too few)."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64)
    n, s1, s2 = all_reduce_sum(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])).tolist()
    if n < 1:
        return 0.0, 0.0
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0) * n / (n - 1) if n > 1 else 0.0
    return mean, var**0.5


def _dtype(x: AdvantageInputs) -> torch.dtype:
    return torch.promote_types(x.rewards.dtype, torch.float32)  # bf16 in → float32 maths


def _check(x: AdvantageInputs, variant: str, needs: frozenset[str], kl_coef: float, whiten: bool) -> None:
    """Shapes, required inputs and KL settings, all problems in one ValueError."""
    problems = []
    if x.mask.ndim != 2:
        problems.append(f"mask must be [B, T], found shape {tuple(x.mask.shape)}")
    b = x.mask.shape[0] if x.mask.ndim >= 1 else -1
    for name in ("rewards", "group", "baseline_rewards"):
        t = getattr(x, name)
        if t is not None and tuple(t.shape) != (b,):
            problems.append(f"{name} must be [B]=[{b}], found shape {tuple(t.shape)}")
    for name in ("values", "kl"):
        t = getattr(x, name)
        if t is not None and t.shape != x.mask.shape:
            problems.append(f"{name} must have the mask's shape {tuple(x.mask.shape)}, found {tuple(t.shape)}")
    for name in sorted(needs):
        if getattr(x, name) is None:
            problems.append(f"needs {name}, which was not given")
    if kl_coef < 0:
        problems.append(f"kl_coef must be >= 0, found {kl_coef}")
    if kl_coef > 0 and x.kl is None:
        problems.append(f"kl_coef={kl_coef} puts KL in the reward but no per-token kl was given")
    if not isinstance(whiten, bool):
        problems.append(f"whiten must be a bool, found {whiten!r}")
    if problems:
        raise ValueError(f"advantage {variant!r}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))


def _in_unit(name: str, value: float, variant: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"advantage {variant!r}: {name} must be in [0, 1], found {value}")


def _finish(
    adv: torch.Tensor, x: AdvantageInputs, whiten: bool, kl_coef: float, returns: torch.Tensor | None = None
) -> AdvantageResult:
    """Optional global whitening and the metrics; ``adv`` is already 0 on padding."""
    m = x.mask > 0
    if whiten:
        adv = masked_whiten(adv, x.mask)  # [B, T] Part A §5: global, token-weighted, Bessel
    metrics = {}
    metrics["advantages/mean"], metrics["advantages/std"] = _moments(adv, x.mask)
    if returns is not None:
        metrics["returns/mean"], metrics["returns/std"] = _moments(returns, x.mask)
    if kl_coef > 0:
        penalty = kl_coef * torch.where(m, x.kl.to(torch.float64), 0.0).sum(-1)  # [B]
        total, rows = all_reduce_sum(torch.stack([penalty.sum(), penalty.new_tensor(float(penalty.numel()))])).tolist()
        metrics["rewards/kl_penalty"] = total / max(rows, 1.0)
    return AdvantageResult(advantages=adv, returns=returns, metrics=metrics)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence advantage [B] on every valid token, 0 on padding: [B, T]."""
    return torch.where(mask > 0, seq_adv[:, None], 0.0)  # where, not *: a non-finite score stays off padding


# ---------------------------------------------------------------------------------------
# Token-level variants: a critic (gae) or the reward-to-go (reward_to_go)


@advantage_variant(reads={"values": "token"}, writes={"returns": "token"}, token_rewards=True, coefficient=lambda spec: "A = GAE(δ; γ, λ), δ = r + γ·V_{t+1} - V_t from the critic"
                   + (", λ = 1 - 1/(α·|o|) per sequence" if spec.length_alpha is not None else ""))
@no_grad
def gae(
    x: AdvantageInputs,
    *,
    gamma: Unit = 1.0,
    lam: Unit = 0.95,
    lambda_critic: Optional[Unit] = None,
    length_alpha: Annotated[Optional[float], Field(gt=0)] = None,
    whiten: bool = True,
    kl_coef: KlCoef = 0.0,
) -> AdvantageResult:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv 1506.02438), as in PPO
    for LLMs (§1.3), with VC-PPO's decoupled λ (arXiv 2503.01491, §2.2) and VAPO's
    length-adaptive λ (arXiv 2504.05118, §8).

        r_{i,t}  = -β·k_{i,t} + 1[t = T_i]·R_i                   (§1.2)
        δ_{i,t}  = r_{i,t} + γ·V_{i,t+1} - V_{i,t},   V_{i,T_i+1} := 0
        A_{i,t}  = δ_{i,t} + γ·λ_actor,i · A_{i,t+1}              → advantages (whitened if on)
        Ret_{i,t} = GAE(δ; γ, λ_critic)_{i,t} + V_{i,t}           → returns (critic targets)

    λ_actor,i is ``lam`` or, with ``length_alpha`` set, ``clamp(1 - 1/(α·l_i), 0, 1)`` per
    sequence; λ_critic is ``lambda_critic`` or, when None, ``lam`` (never length-adaptive).

    Departures and choices:
      * The bootstrap after the last valid token is 0, also for truncated responses
        (every framework does this; the papers treat the episode as ended).
      * VAPO's λ is clamped to [0, 1]; the paper leaves l_i ≤ 1/α (λ ≤ 0) open.
      * Returns come from the un-whitened GAE; whitening (Part A §5: global, token-weighted,
        Bessel, as verl) applies to the advantages only. The papers do not fix the flavour.
      * KL enters the reward per token (k from old vs ref log-probs, computed upstream).
    """
    _check(x, "gae", frozenset({"values"}), kl_coef, whiten)
    _in_unit("gamma", gamma, "gae")
    _in_unit("lam", lam, "gae")
    lam_c = lam if lambda_critic is None else lambda_critic
    _in_unit("lambda_critic", lam_c, "gae")
    if length_alpha is not None and not length_alpha > 0:
        raise ValueError(f"advantage 'gae': length_alpha must be > 0, found {length_alpha}")
    dt = _dtype(x)
    m = x.mask > 0  # [B, T]
    r = token_rewards(x.rewards.to(dt), x.mask, x.kl, kl_coef)  # [B, T]
    v = torch.where(m, x.values.to(dt), 0.0)  # [B, T]
    delta = td_residuals(r, v, x.mask, gamma)  # [B, T] computed once, used twice
    if length_alpha is None:
        lam_a = torch.full((r.shape[0],), lam, dtype=dt, device=r.device)  # [B]
    else:
        lam_a = length_adaptive_lambda(m.sum(-1), length_alpha).to(dt)  # [B]
    adv = discounted_cumsum(delta, x.mask, gamma * lam_a)  # [B, T]
    if length_alpha is None and lam_c == lam:
        returns = adv + v  # same λ: one GAE serves both
    else:
        returns = discounted_cumsum(delta, x.mask, gamma * lam_c) + v  # [B, T]
    out = _finish(adv, x, whiten, kl_coef, returns=returns)
    if length_alpha is not None:
        nonempty = m.any(-1)
        out.metrics["advantages/lambda_actor_mean"] = lam_a[nonempty].mean().item() if nonempty.any() else 0.0
    return out


@advantage_variant(token_rewards=True, coefficient="A = Σ_{s≥t} γ^{s-t} r_s (reward-to-go)")
@no_grad
def reward_to_go(x: AdvantageInputs, *, gamma: Unit = 1.0, whiten: bool = True, kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """REINFORCE++ (Hu et al. 2025, arXiv 2501.03262, §6.2): reward-to-go, globally whitened.

        r_{i,t} = -β·k_{i,t} + 1[t = T_i]·R_i
        G_{i,t} = Σ_{s≥t} γ^{s-t} r_{i,s}
        Â_{i,t} = (G_{i,t} - μ) / sqrt(σ² + 1e-8)      over all valid tokens of the batch

    Departures: σ² is Bessel-corrected with eps inside the sqrt (Part A §5, as verl); the
    paper's code (OpenRLHF) uses the population variance floored at 1e-8. No baseline:
    REINFORCE++-baseline is ``group_center`` with ``whiten=True``.
    """
    _check(x, "reward_to_go", frozenset(), kl_coef, whiten)
    _in_unit("gamma", gamma, "reward_to_go")
    dt = _dtype(x)
    r = token_rewards(x.rewards.to(dt), x.mask, x.kl, kl_coef)  # [B, T]
    g = discounted_cumsum(r, x.mask, gamma)  # [B, T]
    return _finish(g, x, whiten, kl_coef)


# ---------------------------------------------------------------------------------------
# Sequence-level variants: a scalar per response minus a baseline, broadcast to tokens


@advantage_variant(group_based=True, coefficient="A = (R - mean_g R) / (std_g R + ε)")
@no_grad
def group_norm(x: AdvantageInputs, *, eps: Annotated[float, Field(gt=0)] = 1e-6, whiten: bool = False,
               kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """GRPO outcome supervision (DeepSeekMath, arXiv 2402.03300, §4.1.2; ALGORITHMS.md §4.1).

        Â_{i,t} = (R_i - mean_{g(i)} R) / (std_{g(i)} R + eps)    for t ≤ T_i, 0 on padding

    Departures and choices:
      * std is Bessel-corrected and eps = 1e-6 is added to it (Part A §4, as verl); the
        paper specifies neither. G=2 with rewards {0, 1} gives ±0.7071.
      * A group of size 1 raises (verl would return the raw reward).
      * The paper's KL is k3 in the loss (a Loss node's job). With ``kl_coef > 0`` a
        sequence KL ``β·Σ_t m k`` is subtracted from R before the group statistics.
    """
    _check(x, "group_norm", frozenset(), kl_coef, whiten)
    if not eps > 0:
        raise ValueError(f"advantage 'group_norm': eps must be > 0, found {eps}")
    score = sequence_rewards(x.rewards.to(_dtype(x)), x.mask, x.kl, kl_coef)  # [B]
    st = group_mean_std(score, x.group, "group_norm")
    seq_adv = (score - st.mean) / (st.std + eps)  # [B]
    return _finish(_broadcast(seq_adv, x.mask), x, whiten, kl_coef)


@advantage_variant(group_based=True, coefficient="A = R - mean_g R")
@no_grad
def group_center(x: AdvantageInputs, *, whiten: bool = False, kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, §5): the group mean as baseline, no std.

        Â_{i,t} = R_i - mean_{g(i)} R        for t ≤ T_i, 0 on padding

    With ``whiten=True`` this is REINFORCE++-baseline (arXiv 2501.03262, §6.3): the centred
    scalar broadcast to tokens, then token-weighted global whitening.

    Departures: a group of size 1 raises (the formula gives 0). Dr. GRPO's constant loss
    normaliser and REINFORCE++-baseline's k2 loss KL belong to the Loss node. With
    ``kl_coef > 0`` a sequence KL ``β·Σ_t m k`` is subtracted from R before the mean.
    """
    _check(x, "group_center", frozenset(), kl_coef, whiten)
    score = sequence_rewards(x.rewards.to(_dtype(x)), x.mask, x.kl, kl_coef)  # [B]
    st = group_mean_std(score, x.group, "group_center")
    return _finish(_broadcast(score - st.mean, x.mask), x, whiten, kl_coef)


@advantage_variant(group_based=True, coefficient="A = R - mean of the other samples' R")
@no_grad
def rloo(x: AdvantageInputs, *, whiten: bool = False, kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740, §3.1): leave-one-out baseline.

        R_i = r(x, y_i) - β·Σ_t m_{i,t} k_{i,t}                       (sequence KL in reward)
        A_i = R_i - (1/(k-1)) Σ_{j≠i, g(j)=g(i)} R_j  =  k/(k-1) · (R_i - mean_g R)

    Departures: the paper treats the response as one action; here ``A_i`` is broadcast to
    every valid token, and the paper's gradient is recovered by the Loss node with
    ``seq-mean-token-sum`` at ratio 1 (Part A §12). A group of size 1 raises (verl gives
    the raw reward or 0 depending on the variant). ``whiten`` is off in the paper.
    """
    _check(x, "rloo", frozenset(), kl_coef, whiten)
    score = sequence_rewards(x.rewards.to(_dtype(x)), x.mask, x.kl, kl_coef)  # [B]
    st = group_mean_std(score, x.group, "rloo")
    return _finish(_broadcast(score - st.loo_mean, x.mask), x, whiten, kl_coef)


@advantage_variant(group_based=True, coefficient="A = R - Σ_g |o|·R / Σ_g |o| (length-weighted group mean)")
@no_grad
def opo(x: AdvantageInputs, *, whiten: bool = False, kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """OPO, On-Policy RL with Optimal reward baseline (Hao et al. 2025, arXiv 2505.23585), as
    verl's ``opo`` estimator: the length-weighted group mean as baseline.

        l_i = Σ_t m_{i,t}                                    response length (tokens)
        b_g = Σ_{j∈g} l_j R_j / Σ_{j∈g} l_j
        A_i = R_i - b_{g(i)}                                 broadcast to every valid token

    The variance-minimising baseline is E[‖∇log π(y)‖² R] / E[‖∇log π(y)‖²]; the paper
    approximates ‖∇log π(y)‖² by the length |y|, which gives b_g. With equal lengths it is
    :func:`group_center` (Dr. GRPO).

    Departures and choices: a group of size 1 raises (verl gives it the baseline 0, A = R).
    An empty response has weight 0 in its group's baseline (and no tokens); a group of only
    empty responses gets its first score as baseline (it has no tokens either). The paper's
    other half, strictly on-policy training (one gradient step per batch), is the
    pipeline's setting (ppo_epochs = mini_batches = 1), not this node's. With
    ``kl_coef > 0`` a sequence KL ``β·Σ_t m k`` is subtracted from R before the baseline.
    """
    _check(x, "opo", frozenset(), kl_coef, whiten)
    score = sequence_rewards(x.rewards.to(_dtype(x)), x.mask, x.kl, kl_coef)  # [B]
    lengths = (x.mask > 0).to(score.dtype).sum(-1)  # [B] l_i
    baseline = group_weighted_mean(score, lengths, x.group, "opo")  # [B] b_{g(i)}
    return _finish(_broadcast(score - baseline, x.mask), x, whiten, kl_coef)


@advantage_variant(group_based=True, coefficient="A = (R - mean_g R)·B'/M, M the rows with R ≠ mean_g R")
@no_grad
def gpg(x: AdvantageInputs, *, whiten: bool = False, kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """GPG, Group Policy Gradient (Chu et al. 2025, arXiv 2504.02546): the group-centred
    advantage, rescaled so that rows without a learning signal do not dilute the batch.

        Â_i = R_i - mean_{g(i)} R                         (F_norm = 1: no std)
        α   = B' / M                                      over the whole batch, all ranks
        A_i = α · Â_i                                     broadcast to every valid token

    B' counts the rows with a non-empty response and M those of them whose Â_i ≠ 0 (e.g.
    every row of a group whose rewards are all equal has Â = 0 and no gradient). Mean-type
    loss aggregations divide by all B' rows; α turns that into a mean over the M rows that
    carry a gradient (the paper's "accurate gradient estimation", α = B/(B - M_invalid)).
    α = 1 when M = 0 (every advantage is 0 then). GPG's loss is the plain ``pg`` Loss
    (-A·lp, no ratio, no clip).

    Departures and choices: α counts non-empty rows only, so an empty response (e.g. masked
    by an overlong filter) is neither signal nor dilution; verl's ``gpg`` instead divides the
    batch size by the number of non-zero *rewards* (not advantages), which differs, e.g.
    with 0/1 rewards it counts the correct answers. The paper's option of dividing Â by the
    group std (F_norm = std) is not offered: ``group_norm`` is that without α. A group of
    size 1 raises (verl gives it mean 0, std 1). With ``kl_coef > 0`` a sequence KL
    ``β·Σ_t m k`` is subtracted from R before the mean. Logs advantages/gpg_alpha.
    """
    _check(x, "gpg", frozenset(), kl_coef, whiten)
    score = sequence_rewards(x.rewards.to(_dtype(x)), x.mask, x.kl, kl_coef)  # [B]
    centred = score - group_mean_std(score, x.group, "gpg").mean  # [B] Â_i (exactly 0 for equal rewards)
    nonempty = (x.mask > 0).any(-1)  # [B]
    n_rows, n_signal = all_reduce_sum(torch.stack([nonempty.sum(), (nonempty & (centred != 0)).sum()]).to(torch.float64)).tolist()
    alpha = n_rows / n_signal if n_signal > 0 else 1.0
    out = _finish(_broadcast(alpha * centred, x.mask), x, whiten, kl_coef)
    out.metrics["advantages/gpg_alpha"] = alpha
    return out


@advantage_variant(reads={"baseline_rewards": "seq"}, coefficient="A = R - R(greedy response)")
@no_grad
def greedy_baseline(x: AdvantageInputs, *, whiten: bool = False, kl_coef: KlCoef = 0.0) -> AdvantageResult:
    """ReMax (Li et al. 2023, arXiv 2310.10505, §6.5): the greedy response's score as baseline.

        b_i = r(x_i, ȳ_i),  ȳ_i greedy           (score only, no KL, no gradient)
        A_i = R_i - β·Σ_t m_{i,t} k_{i,t} - b_i   broadcast to every valid token

    Departures: the paper form (a scalar per response). verl's ``remax`` instead uses the
    per-token reward-to-go minus b_i, which differs from this only when the KL is in the
    reward (the per-token KL then weighs later tokens less). All samples of one prompt
    share the baseline the engine gives them; rows are independent (not group-based).
    """
    _check(x, "greedy_baseline", frozenset({"baseline_rewards"}), kl_coef, whiten)
    dt = _dtype(x)
    score = sequence_rewards(x.rewards.to(dt), x.mask, x.kl, kl_coef)  # [B]
    seq_adv = score - x.baseline_rewards.to(dt)  # [B]
    return _finish(_broadcast(seq_adv, x.mask), x, whiten, kl_coef)


# ---------------------------------------------------------------------------------------
# The node runner: batch columns in, advantages (and returns) out


@runner("advantage")
class AdvantageRunner(NodeRunner):
    """Builds :class:`AdvantageInputs` from the batch and calls the registered variant.

    With ``kl_coef > 0`` the per-token KL estimate (``kl`` estimator, old vs reference
    log-probs, no gradient) is computed here and passed in; the variant puts it into the
    reward (ALGORITHMS.md §0.3, placement 1).
    """

    def __init__(self, spec):
        super().__init__(spec)
        self.variant = ADVANTAGES[spec.variant]
        # β of the KL in the reward: the node's kl_coef, adapted after each batch when kl_target is set
        self.kl = KlController(getattr(spec, "kl_coef", 0.0), spec.kl_target, spec.kl_horizon)

    def run(self, batch, ctx) -> dict[str, float]:
        s = self.spec
        mask = batch["response_mask"]
        beta = self.kl.beta
        kl = kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], s.kl) * mask if beta > 0 else None
        x = AdvantageInputs(rewards=batch["rewards"].float(), mask=mask, group=batch["group"], values=batch.get("values"),
                            kl=kl, baseline_rewards=batch.get("baseline_rewards"))
        args = self.variant.arguments(s)
        result = self.variant.fn(x, **({**args, "kl_coef": beta} if "kl_coef" in args else args))
        batch["advantages"] = result.advantages
        if result.returns is not None:
            batch["returns"] = result.returns
        metrics = result.metrics
        if kl is not None:  # the penalised estimate, as the adaptive controller observes it (verl's current_kl)
            total, seqs = sequence_mean_kl(kl, mask)
            metrics = {**metrics, "kl/mean": total / max(seqs, 1.0), "kl/beta": beta}
            self.kl.update(total / max(seqs, 1.0), seqs)
        return metrics

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps of this runner: an adaptive β ({} otherwise)."""
        return self.kl.state_dict() if self.kl.adaptive else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl.load_state_dict(state)
