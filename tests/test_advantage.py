"""Advantage estimators: hand-computed values, loop references, edge cases (ALGORITHMS.md §1–§8)."""

from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

from rlflow.nodes.advantage import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageResult,
    discounted_cumsum,
    gae,
    greedy_baseline,
    group_center,
    group_mean_std,
    group_norm,
    group_weighted_mean,
    gpg,
    last_token,
    length_adaptive_lambda,
    opo,
    reward_to_go,
    rloo,
    sequence_rewards,
    td_residuals,
    token_rewards,
)
from rlflow.nodes.masked import masked_whiten
from rlflow.registry import UnknownName

F64 = torch.float64
ALL_VARIANTS = ADVANTAGES.names()  # the registry is the only list of names
GROUP_VARIANTS = [n for n in ALL_VARIANTS if ADVANTAGES[n].group_based]


def t64(x):
    return torch.tensor(x, dtype=F64)


def mask_of(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)  # [B, T]


def full_inputs(rewards, lengths, T, group=None, **kw):
    """Inputs that satisfy every variant's needs (values, baseline_rewards) unless given."""
    B = len(rewards)
    kw.setdefault("values", torch.zeros(B, T, dtype=F64))
    kw.setdefault("baseline_rewards", torch.zeros(B, dtype=F64))
    group = torch.tensor(group if group is not None else [i // 2 for i in range(B)])
    return AdvantageInputs(rewards=t64(rewards), mask=mask_of(lengths, T), group=group, **kw)


# ---------------------------------------------------------------------------------------
# Registry and contract


def test_declared_reads_writes_and_group_flags():
    from rlflow.spec import Advantage

    extra = {n: set(ADVANTAGES[n].reads(Advantage(n))) for n in ALL_VARIANTS}
    # only gae (a critic) and greedy_baseline (ReMax) read more than rewards, mask and group
    special = {"gae": {"values"}, "greedy_baseline": {"baseline_rewards"}}
    assert extra == {n: special.get(n, set()) for n in ALL_VARIANTS}
    assert set(Advantage("gae").writes()) == {"advantages", "returns"}
    assert {"group_norm", "group_center", "rloo", "opo", "gpg"} <= set(GROUP_VARIANTS)
    assert not set(GROUP_VARIANTS) & {"gae", "reward_to_go", "greedy_baseline"}


def test_unknown_variant_suggests_closest():
    with pytest.raises(UnknownName, match="Did you mean 'rloo'"):
        ADVANTAGES["rlo"]


EXPECTED_PARAMS = {
    "gae": {"gamma": 1.0, "lam": 0.95, "lambda_critic": None, "length_alpha": None, "whiten": True, "kl_coef": 0.0},
    "group_norm": {"eps": 1e-6, "whiten": False, "kl_coef": 0.0},
    "group_center": {"whiten": False, "kl_coef": 0.0},
    "rloo": {"whiten": False, "kl_coef": 0.0},
    "opo": {"whiten": False, "kl_coef": 0.0},
    "gpg": {"whiten": False, "kl_coef": 0.0},
    "greedy_baseline": {"whiten": False, "kl_coef": 0.0},
    "reward_to_go": {"gamma": 1.0, "whiten": True, "kl_coef": 0.0},
}


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_signature_is_one_input_plus_keyword_params(name):
    params = inspect.signature(ADVANTAGES[name].fn).parameters
    first, *rest = params.values()
    assert first.name == "x" and first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    assert {p.name: p.default for p in rest} == EXPECTED_PARAMS[name]


# ---------------------------------------------------------------------------------------
# Helpers, by hand


def test_last_token_and_token_rewards_by_hand():
    mask = mask_of([3, 1, 0], 4)
    assert last_token(mask).tolist() == [[False, False, True, False], [True, False, False, False], [False] * 4]
    kl = t64([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, float("nan")], [float("inf")] * 4])  # padding must not leak
    r = token_rewards(t64([1.0, 2.0, 3.0]), mask, kl, kl_coef=0.5)
    # row 0: -0.5*[0.1, 0.2, 0.3] + [0, 0, 1] = [-0.05, -0.1, 0.85], padding 0
    # row 1: -0.5*0.5 + 2 = 1.75 on its only token; row 2 (empty): all 0, its score lands nowhere
    assert torch.allclose(r, t64([[-0.05, -0.1, 0.85, 0], [1.75, 0, 0, 0], [0, 0, 0, 0]]), atol=1e-12)
    assert torch.equal(token_rewards(t64([1.0, 2.0, 3.0]), mask), t64([[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 0]]))
    # an unscorable empty response (NaN score) puts nothing anywhere, not NaN·0 = NaN
    assert torch.equal(token_rewards(t64([1.0, 2.0, float("nan")]), mask)[2], torch.zeros(4, dtype=F64))


def test_sequence_rewards_subtracts_summed_kl_on_valid_tokens():
    mask = mask_of([3, 1], 3)
    kl = t64([[0.1, 0.2, 0.3], [0.5, 9.0, float("nan")]])
    # R - β Σ_t m k: 1 - 0.5*0.6 = 0.7; 2 - 0.5*0.5 = 1.75
    assert torch.allclose(sequence_rewards(t64([1.0, 2.0]), mask, kl, 0.5), t64([0.7, 1.75]), atol=1e-12)
    with pytest.raises(ValueError, match="no per-token kl"):
        sequence_rewards(t64([1.0, 2.0]), mask, None, 0.5)
    with pytest.raises(ValueError, match="no per-token kl"):
        token_rewards(t64([1.0, 2.0]), mask, None, 0.5)


def test_group_mean_std_by_hand_with_non_contiguous_ids():
    # group 42 = rows 0, 2, 4 with {1, 2, 4}; group 7 = rows 1, 3 with {0, 1}
    st = group_mean_std(t64([1.0, 0.0, 2.0, 1.0, 4.0]), torch.tensor([42, 7, 42, 7, 42]))
    # 42: mean 7/3; Σ dev² = 16/9 + 1/9 + 25/9 = 42/9; var = (42/9)/2 = 7/3; std = 1.527525
    # 7:  mean 1/2; var = (1/4 + 1/4)/1 = 1/2; std = 0.707107
    assert torch.allclose(st.mean, t64([7 / 3, 0.5, 7 / 3, 0.5, 7 / 3]), atol=1e-12)
    assert torch.allclose(st.std, t64([math.sqrt(7 / 3), math.sqrt(0.5), math.sqrt(7 / 3), math.sqrt(0.5), math.sqrt(7 / 3)]), atol=1e-12)
    assert st.size.tolist() == [3, 2, 3, 2, 3]
    # leave-one-out: row 0 → (2+4)/2 = 3, row 2 → (1+4)/2 = 2.5, row 4 → (1+2)/2 = 1.5; pair → the other
    assert torch.allclose(st.loo_mean, t64([3.0, 1.0, 2.5, 0.0, 1.5]), atol=1e-12)


def test_group_mean_std_refuses_every_singleton_by_name():
    with pytest.raises(ValueError, match=r"group\(s\) 5, 9 have a single response") as err:
        group_mean_std(t64([1.0, 2.0, 3.0, 4.0]), torch.tensor([9, 3, 3, 5]), "rloo")
    assert str(err.value).startswith("rloo:")


def test_discounted_cumsum_by_hand():
    x = t64([[1.0, 2.0, 3.0, 7.0], [1.0, 1.0, 0.0, 0.0]])
    mask = mask_of([3, 2], 4)
    # row 0, γ=0.5: y2 = 3; y1 = 2 + 0.5*3 = 3.5; y0 = 1 + 0.5*3.5 = 2.75; padding (7.0) ignored
    # row 1, γ=0.5: y1 = 1; y0 = 1.5
    assert torch.allclose(discounted_cumsum(x, mask, 0.5), t64([[2.75, 3.5, 3, 0], [1.5, 1, 0, 0]]), atol=1e-12)
    # per-row discount: row 0 γ=1 → [6, 5, 3]; row 1 γ=0 → [1, 1]
    assert torch.allclose(discounted_cumsum(x, mask, t64([1.0, 0.0])), t64([[6, 5, 3, 0], [1, 1, 0, 0]]), atol=1e-12)


def test_discounted_cumsum_skips_interior_mask_zeros():
    # mask 1 0 1: the hole is skipped, y0 = 1 + 0.5 * y2 = 1 + 0.5*4 = 3 (verl's carry-through)
    out = discounted_cumsum(t64([[1.0, 100.0, 4.0]]), t64([[1.0, 0.0, 1.0]]), 0.5)
    assert torch.allclose(out, t64([[3.0, 0.0, 4.0]]), atol=1e-12)


def test_td_residuals_bootstrap_zero_and_padding_values_ignored():
    v = t64([[0.5, 1.0, 2.0, 50.0]])  # 50.0 sits on padding and must not be bootstrapped
    r = t64([[0.0, 0.0, 1.0, 0.0]])
    # δ0 = 0 + 0.9*1 - 0.5 = 0.4; δ1 = 0 + 0.9*2 - 1 = 0.8; δ2 = 1 + 0 - 2 = -1
    assert torch.allclose(td_residuals(r, v, mask_of([3], 4), 0.9), t64([[0.4, 0.8, -1.0, 0.0]]), atol=1e-12)


def test_length_adaptive_lambda_vapo_examples_and_clamp():
    lam = length_adaptive_lambda(torch.tensor([100, 10, 1000, 10000, 20, 0]), 0.05)
    # 1 - 1/(0.05*100) = 0.8; 1 - 1/0.5 = -1 → 0; 0.98; 0.998; 1 - 1/1 = 0; empty → 0
    assert torch.allclose(lam, t64([0.8, 0.0, 0.98, 0.998, 0.0, 0.0]), atol=1e-12)


# ---------------------------------------------------------------------------------------
# Variants, by hand


def test_group_norm_two_binary_rewards_is_plus_minus_0_7071():
    x = full_inputs([0.0, 1.0], [2, 3], 3)
    res = group_norm(x)
    # mean 0.5, Bessel std sqrt(0.5) = 0.70711 → A = ±0.5/(0.70711 + 1e-6) = ±0.70711 (population std: ±1)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert torch.allclose(res.advantages, t64([[-a, -a, 0.0], [a, a, a]]), atol=1e-12)
    assert abs(a - 0.70711) < 1e-5
    assert res.returns is None


def test_group_norm_three_rewards_by_hand():
    res = group_norm(full_inputs([1.0, 2.0, 4.0], [1, 1, 1], 1, group=[0, 0, 0]))
    s = math.sqrt(7 / 3)  # see test_group_mean_std_by_hand
    expected = [(-4 / 3) / (s + 1e-6), (-1 / 3) / (s + 1e-6), (5 / 3) / (s + 1e-6)]  # -0.87287, -0.21822, 1.09109
    assert torch.allclose(res.advantages[:, 0], t64(expected), atol=1e-12)
    assert abs(expected[0] + 0.87287) < 1e-5


def test_group_center_and_rloo_by_hand_and_k_over_k_minus_1():
    x = full_inputs([1.0, 2.0, 4.0], [2, 2, 2], 2, group=[0, 0, 0])
    center = group_center(x).advantages[:, 0]
    loo = rloo(x).advantages[:, 0]
    # centre: R - 7/3 = [-4/3, -1/3, 5/3]; LOO: 1-(2+4)/2 = -2, 2-(1+4)/2 = -0.5, 4-(1+2)/2 = 2.5
    assert torch.allclose(center, t64([-4 / 3, -1 / 3, 5 / 3]), atol=1e-12)
    assert torch.allclose(loo, t64([-2.0, -0.5, 2.5]), atol=1e-12)
    assert torch.allclose(loo, 3 / 2 * center, atol=1e-12)  # k/(k-1), k = 3


def test_greedy_baseline_by_hand_kl_not_in_baseline():
    x = full_inputs([1.0, 0.0], [2, 1], 2, baseline_rewards=t64([0.5, 0.5]), kl=t64([[0.2, 0.4], [1.0, 9.0]]))
    assert torch.allclose(greedy_baseline(x).advantages, t64([[0.5, 0.5], [-0.5, 0.0]]), atol=1e-12)
    # with β = 0.5: 1 - 0.5*(0.2+0.4) - 0.5 = 0.2; 0 - 0.5*1.0 - 0.5 = -1.0 (the baseline gets no KL)
    res = greedy_baseline(x, kl_coef=0.5)
    assert torch.allclose(res.advantages, t64([[0.2, 0.2], [-1.0, 0.0]]), atol=1e-12)
    assert res.metrics["rewards/kl_penalty"] == pytest.approx((0.3 + 0.5) / 2)


def test_group_weighted_mean_by_hand():
    # group 5 = rows 0, 2, 3 with v = 1, 0, 0 and w = 2, 4, 6: (2·1 + 0 + 0)/12 = 1/6
    # group 8 = rows 1, 4 with v = 3, 5 and w = 0, 0: no weight → its first value, 3
    got = group_weighted_mean(t64([1.0, 3.0, 0.0, 0.0, 5.0]), t64([2.0, 0.0, 4.0, 6.0, 0.0]), torch.tensor([5, 8, 5, 5, 8]))
    assert torch.allclose(got, t64([1 / 6, 3.0, 1 / 6, 1 / 6, 3.0]), atol=1e-12)
    # equal values: exactly that value, whatever the weights
    assert torch.equal(group_weighted_mean(t64([0.1, 0.1, 0.1]), t64([1.0, 2.0, 7.0]), torch.tensor([0, 0, 0])), t64([0.1] * 3))


def test_opo_length_weighted_baseline_by_hand():
    # one group, R = [1, 0, 0], lengths [2, 4, 6]: b = (2·1 + 4·0 + 6·0)/12 = 1/6
    # A = [5/6, -1/6, -1/6]; the unweighted mean (group_center) would give [2/3, -1/3, -1/3]
    x = full_inputs([1.0, 0.0, 0.0], [2, 4, 6], 6, group=[0, 0, 0])
    adv = opo(x).advantages
    assert torch.allclose(adv, x.mask * t64([[5 / 6], [-1 / 6], [-1 / 6]]), atol=1e-12)
    assert torch.allclose(group_center(x).advantages[:, 0], t64([2 / 3, -1 / 3, -1 / 3]), atol=1e-12)
    # equal lengths: the length weights cancel and OPO is group_center (Dr. GRPO)
    y = full_inputs([1.0, 0.0, 0.0, 2.0], [3, 3, 3, 3], 3, group=[0, 0, 0, 0])
    assert torch.allclose(opo(y).advantages, group_center(y).advantages, atol=1e-12)


def test_opo_empty_row_weighs_nothing():
    # group {R=1 (3 tokens), R=5 (empty)}: b = (3·1 + 0·5)/3 = 1, so A = 0 on the non-empty row
    # (group_center would give 1 - 3 = -2: the empty row's score counts there)
    x = full_inputs([1.0, 5.0], [3, 0], 3, group=[0, 0])
    assert torch.equal(opo(x).advantages, torch.zeros(2, 3, dtype=F64))


def test_gpg_alpha_by_hand():
    # group 0: R = [1, 0, 0, 0] → Â = [0.75, -0.25, -0.25, -0.25]   (4 rows with a signal)
    # group 1: R = [1, 1, 1, 1], one response empty → Â = 0         (3 non-empty rows, no signal)
    # group 2: R = [0, 1] → Â = [-0.5, 0.5]                          (2 rows with a signal)
    # B' = 4 + 3 + 2 = 9 non-empty rows, M = 6 with Â ≠ 0: α = 9/6 = 1.5
    x = full_inputs([1, 0, 0, 0, 1, 1, 1, 1, 0, 1], [2, 2, 2, 2, 2, 2, 0, 2, 2, 2], 2, group=[0] * 4 + [1] * 4 + [2] * 2)
    res = gpg(x)
    assert res.metrics["advantages/gpg_alpha"] == 1.5
    expected = t64([1.125, -0.375, -0.375, -0.375, 0, 0, 0, 0, -0.75, 0.75])  # 1.5·Â
    assert torch.allclose(res.advantages, expected[:, None] * x.mask, atol=1e-12)
    # no signal anywhere: α = 1 and every advantage 0
    none = gpg(full_inputs([1.0, 1.0], [2, 2], 2, group=[0, 0]))
    assert none.metrics["advantages/gpg_alpha"] == 1.0 and torch.equal(none.advantages, torch.zeros(2, 2, dtype=F64))


def test_gpg_is_group_center_times_alpha():
    x, _ = random_batch(5)
    res = gpg(x)
    assert torch.allclose(res.advantages, res.metrics["advantages/gpg_alpha"] * group_center(x).advantages, atol=1e-12)


def test_gae_three_tokens_by_hand():
    # R = 1 on token 3, V = [0.5, 1, 2], γ = 0.9, λ = 0.5 → γλ = 0.45
    # δ = [0.4, 0.8, -1] (test_td_residuals); A3 = -1; A2 = 0.8 + 0.45*(-1) = 0.35;
    # A1 = 0.4 + 0.45*0.35 = 0.5575; Ret = A + V = [1.0575, 1.35, 1.0]
    # second row: the same response padded to T=4 with garbage in the padding of V
    x = AdvantageInputs(
        rewards=t64([1.0, 1.0]),
        mask=mask_of([3, 3], 4),
        group=torch.tensor([0, 1]),
        values=t64([[0.5, 1.0, 2.0, 0.0], [0.5, 1.0, 2.0, 77.0]]),
    )
    res = gae(x, gamma=0.9, lam=0.5, whiten=False)
    assert torch.allclose(res.advantages, t64([[0.5575, 0.35, -1.0, 0.0]] * 2), atol=1e-12)
    assert torch.allclose(res.returns, t64([[1.0575, 1.35, 1.0, 0.0]] * 2), atol=1e-12)
    # metrics: 6 tokens, mean of A = 2*(0.5575+0.35-1)/6 = -0.0308333
    assert res.metrics["advantages/mean"] == pytest.approx(2 * (0.5575 + 0.35 - 1.0) / 6, abs=1e-12)
    assert res.metrics["returns/mean"] == pytest.approx(2 * (1.0575 + 1.35 + 1.0) / 6, abs=1e-12)


def test_gae_whitening_is_masked_whiten_of_raw_and_leaves_returns_alone():
    torch.manual_seed(0)
    x = AdvantageInputs(t64([1.0, -1.0, 0.5]), mask_of([4, 2, 3], 5), torch.tensor([0, 1, 2]), values=torch.randn(3, 5, dtype=F64))
    raw, white = gae(x, whiten=False), gae(x)  # default whiten=True
    assert torch.allclose(white.advantages, masked_whiten(raw.advantages, x.mask), atol=1e-12)
    assert torch.equal(white.returns, raw.returns)
    assert white.metrics["advantages/mean"] == pytest.approx(0.0, abs=1e-12)
    assert white.metrics["advantages/std"] == pytest.approx(1.0, abs=1e-6)


def test_decoupled_gae_critic_lambda_one_returns_reward_to_go_independent_of_v():
    torch.manual_seed(1)
    mask = mask_of([4, 2, 5], 5)
    kl = torch.rand(3, 5, dtype=F64)
    base = dict(rewards=t64([1.0, -1.0, 0.5]), mask=mask, group=torch.tensor([0, 1, 2]), kl=kl)
    r1 = gae(AdvantageInputs(**base, values=torch.randn(3, 5, dtype=F64)), lam=0.95, lambda_critic=1.0, kl_coef=0.1)
    r2 = gae(AdvantageInputs(**base, values=torch.randn(3, 5, dtype=F64)), lam=0.5, lambda_critic=1.0, kl_coef=0.1)
    rtg = discounted_cumsum(token_rewards(base["rewards"], mask, kl, 0.1), mask, 1.0)  # Σ_{s≥t} r_s
    assert torch.allclose(r1.returns, rtg, atol=1e-12)
    assert torch.allclose(r2.returns, rtg, atol=1e-12)  # neither V nor λ_actor changes them
    assert not torch.allclose(r1.advantages, r2.advantages)
    # without KL the critic target is R_i on every valid token (§2.1)
    r3 = gae(AdvantageInputs(**{**base, "kl": None}, values=torch.randn(3, 5, dtype=F64)), lambda_critic=1.0)
    assert torch.allclose(r3.returns, base["rewards"][:, None] * mask, atol=1e-12)


def test_gae_lambda_critic_none_means_lam():
    torch.manual_seed(2)
    x = AdvantageInputs(t64([1.0, 0.0]), mask_of([3, 4], 4), torch.tensor([0, 1]), values=torch.randn(2, 4, dtype=F64))
    a, b = gae(x, lam=0.7, whiten=False), gae(x, lam=0.7, lambda_critic=0.7, whiten=False)
    assert torch.allclose(a.returns, a.advantages + x.values * x.mask, atol=1e-12)
    assert torch.equal(a.returns, b.returns)


def test_gae_length_alpha_uses_per_sequence_lambda():
    # α = 0.5: l=4 → λ = 1 - 1/2 = 0.5; l=2 → 1 - 1/1 = 0. V = 0, γ = 1, R on the last token
    # row 0: δ = [0, 0, 0, 1] → A = [0.125, 0.25, 0.5, 1]; row 1: λ=0 → A = δ = [0, 1]; row 2 empty
    x = AdvantageInputs(t64([1.0, 1.0, 1.0]), mask_of([4, 2, 0], 4), torch.tensor([0, 1, 2]), values=torch.zeros(3, 4, dtype=F64))
    res = gae(x, length_alpha=0.5, lambda_critic=1.0, whiten=False)
    assert torch.allclose(res.advantages, t64([[0.125, 0.25, 0.5, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0] * 4]), atol=1e-12)
    assert torch.allclose(res.returns, t64([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]), atol=1e-12)
    assert res.metrics["advantages/lambda_actor_mean"] == pytest.approx(0.25)  # (0.5 + 0)/2, empty row left out


def test_reward_to_go_by_hand_with_kl():
    # r = -0.5*k + 1[last]*R; row 0 k=[0.2, 0.4, 0.2], R=1 → r = [-0.1, -0.2, 0.9]
    # γ = 0.5: G2 = 0.9; G1 = -0.2 + 0.45 = 0.25; G0 = -0.1 + 0.125 = 0.025
    # row 1 k=[0.2], R=-1 → r = [-1.1] → G = [-1.1]
    x = full_inputs([1.0, -1.0], [3, 1], 3, kl=t64([[0.2, 0.4, 0.2], [0.2, 5.0, 5.0]]))
    res = reward_to_go(x, gamma=0.5, whiten=False, kl_coef=0.5)
    assert torch.allclose(res.advantages, t64([[0.025, 0.25, 0.9], [-1.1, 0.0, 0.0]]), atol=1e-12)
    white = reward_to_go(x, gamma=0.5, kl_coef=0.5)  # default whiten=True, REINFORCE++
    assert torch.allclose(white.advantages, masked_whiten(res.advantages, x.mask), atol=1e-12)


def test_kl_in_reward_token_level_vs_sequence_level_placement():
    # one group of two: R = [1, 0], k = [[0.1, 0.3], [0.2, 0.0]], β = 1
    x = full_inputs([1.0, 0.0], [2, 2], 2, group=[0, 0], kl=t64([[0.1, 0.3], [0.2, 0.0]]))
    # sequence level: scalars 1 - 0.4 = 0.6 and 0 - 0.2 = -0.2; mean 0.2 → centred ±0.4
    assert torch.allclose(group_center(x, kl_coef=1.0).advantages, t64([[0.4, 0.4], [-0.4, -0.4]]), atol=1e-12)
    # rloo: 0.6 - (-0.2) = 0.8, -0.2 - 0.6 = -0.8 (k/(k-1) = 2 times the centred value)
    assert torch.allclose(rloo(x, kl_coef=1.0).advantages, t64([[0.8, 0.8], [-0.8, -0.8]]), atol=1e-12)
    # token level: r = [[-0.1, 0.7], [-0.2, 0.0]] → reward-to-go [[0.6, 0.7], [-0.2, 0.0]]
    assert torch.allclose(reward_to_go(x, whiten=False, kl_coef=1.0).advantages, t64([[0.6, 0.7], [-0.2, 0.0]]), atol=1e-12)
    # the KL changes the answer (so the test above would catch it being ignored)
    assert torch.allclose(group_center(x).advantages, t64([[0.5, 0.5], [-0.5, -0.5]]), atol=1e-12)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_kl_coef_without_kl_raises(name):
    x = full_inputs([1.0, 0.0], [2, 2], 2)
    with pytest.raises(ValueError, match="no per-token kl"):
        ADVANTAGES[name].fn(x, kl_coef=0.1)
    ADVANTAGES[name].fn(x, kl_coef=0.0)  # fine without kl


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_negative_kl_coef_raises(name):
    x = full_inputs([1.0, 0.0], [2, 2], 2, kl=torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        ADVANTAGES[name].fn(x, kl_coef=-0.1)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_whiten_true_whitens_every_variant(name):
    x = full_inputs([1.0, 0.0, 3.0, 2.0], [2, 3, 1, 3], 3, baseline_rewards=t64([0.5, 0.1, 2.0, 0.0]), values=torch.zeros(4, 3, dtype=F64))
    raw = ADVANTAGES[name].fn(x, whiten=False)
    white = ADVANTAGES[name].fn(x, whiten=True)
    assert torch.allclose(white.advantages, masked_whiten(raw.advantages, x.mask), atol=1e-12)
    assert white.metrics["advantages/std"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------
# Loop references over random shapes and seeds


def random_batch(seed: int):
    """Groups of 2..5 rows with arbitrary ids, shuffled; lengths 0..T; garbage on padding."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [rng.randint(2, 5) for _ in range(rng.randint(1, 5))]
    ids = rng.sample(range(-50, 1000), len(sizes))
    group = [g for g, n in zip(ids, sizes) for _ in range(n)]
    rng.shuffle(group)
    B, T = len(group), rng.randint(1, 9)
    lengths = [rng.choice([0, T, rng.randint(1, T)]) for _ in range(B)]
    mask = mask_of(lengths, T)
    rewards = torch.randn(B, generator=gen, dtype=F64)
    if rng.random() < 0.5:
        rewards = torch.randint(0, 2, (B,), generator=gen).to(F64)  # binary, often all-equal groups
    garbage = 1e3 * (1 - mask)
    values = torch.randn(B, T, generator=gen, dtype=F64) * mask + garbage
    kl = torch.rand(B, T, generator=gen, dtype=F64) * mask + garbage
    x = AdvantageInputs(rewards, mask, torch.tensor(group), values=values, kl=kl, baseline_rewards=torch.randn(B, generator=gen, dtype=F64))
    return x, lengths


def loop_scalar(x, lengths, i, beta):
    return x.rewards[i].item() - beta * sum(x.kl[i, t].item() for t in range(lengths[i]))


def loop_sequence_advantage(x, lengths, beta, kind, eps=1e-6):
    B, T = x.mask.shape
    out = torch.zeros(B, T, dtype=F64)
    g = x.group.tolist()
    seq = []
    for i in range(B):
        mates = [j for j in range(B) if g[j] == g[i]]
        s = [loop_scalar(x, lengths, j, beta) for j in mates]
        mean = sum(s) / len(s)
        std = math.sqrt(sum((v - mean) ** 2 for v in s) / (len(s) - 1))
        mine = loop_scalar(x, lengths, i, beta)
        if kind == "group_norm":
            a = (mine - mean) / (std + eps)
        elif kind == "rloo":
            a = mine - (sum(s) - mine) / (len(s) - 1)
        elif kind == "opo":  # b = Σ l R / Σ l over the group (rows of an all-empty group have no tokens)
            ls = [lengths[j] for j in mates]
            a = mine - (sum(l * v for l, v in zip(ls, s)) / sum(ls) if sum(ls) else mean)
        elif kind in ("group_center", "gpg"):
            a = mine - mean
        else:
            raise AssertionError(f"no loop reference for {kind!r}: write one")
        seq.append(a)
    if kind == "gpg":  # α = non-empty rows / non-empty rows with a non-zero advantage, batch-wide
        rows = sum(1 for i in range(B) if lengths[i] > 0)
        signal = sum(1 for i in range(B) if lengths[i] > 0 and seq[i] != 0)
        seq = [a * (rows / signal if signal else 1.0) for a in seq]
    for i in range(B):
        for t in range(lengths[i]):
            out[i, t] = seq[i]
    return out


def loop_gae(x, lengths, gamma, lam_actor, lam_critic, beta):
    """Plain per-row GAE (§1.3) with per-row λ_actor, written from the formulas."""
    B, T = x.mask.shape
    adv, ret = torch.zeros(B, T, dtype=F64), torch.zeros(B, T, dtype=F64)
    for i in range(B):
        L = lengths[i]
        r = [-beta * x.kl[i, t].item() + (x.rewards[i].item() if t == L - 1 else 0.0) for t in range(L)]
        v = [x.values[i, t].item() for t in range(L)]
        delta = [r[t] + gamma * (v[t + 1] if t + 1 < L else 0.0) - v[t] for t in range(L)]
        a_act = a_crit = 0.0
        for t in reversed(range(L)):
            a_act = delta[t] + gamma * lam_actor[i] * a_act
            a_crit = delta[t] + gamma * lam_critic * a_crit
            adv[i, t], ret[i, t] = a_act, a_crit + v[t]
    return adv, ret


def loop_whiten(a, lengths):
    vals = [a[i, t].item() for i in range(a.shape[0]) for t in range(lengths[i])]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    out = torch.zeros_like(a)
    for i in range(a.shape[0]):
        for t in range(lengths[i]):
            out[i, t] = (a[i, t] - mean) / math.sqrt(var + 1e-8)
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", GROUP_VARIANTS)
def test_group_variants_match_loop_reference(seed, kind):
    x, lengths = random_batch(seed)
    beta = 0.0 if seed % 2 else 0.3
    got = ADVANTAGES[kind].fn(x, kl_coef=beta).advantages
    assert torch.allclose(got, loop_sequence_advantage(x, lengths, beta, kind), atol=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_gae_matches_loop_reference(seed):
    x, lengths = random_batch(seed)
    rng = random.Random(1000 + seed)
    gamma, lam, lam_c = rng.choice([1.0, 0.9]), rng.choice([0.95, 0.5, 1.0]), rng.choice([None, 1.0, 0.8])
    alpha = rng.choice([None, 0.3])
    beta = 0.0 if seed % 2 else 0.2
    if alpha is None:
        lam_a = [lam] * len(lengths)
    else:
        lam_a = [min(1.0, max(0.0, 1 - 1 / (alpha * max(L, 1)))) for L in lengths]
    ref_adv, ref_ret = loop_gae(x, lengths, gamma, lam_a, lam if lam_c is None else lam_c, beta)
    res = gae(x, gamma=gamma, lam=lam, lambda_critic=lam_c, length_alpha=alpha, whiten=False, kl_coef=beta)
    assert torch.allclose(res.advantages, ref_adv, atol=1e-9)
    assert torch.allclose(res.returns, ref_ret, atol=1e-9)
    if sum(lengths) >= 2:
        white = gae(x, gamma=gamma, lam=lam, lambda_critic=lam_c, length_alpha=alpha, kl_coef=beta)
        assert torch.allclose(white.advantages, loop_whiten(ref_adv, lengths), atol=1e-9)


# ---------------------------------------------------------------------------------------
# Edge cases (ALGORITHMS.md §0.1, §1.6, §3.4, §4.4, §6.5, Part A §4)


@pytest.mark.parametrize("kind", GROUP_VARIANTS)
def test_all_equal_group_gives_exactly_zero(kind):
    # rewards 0.1 three times: float sums would leave 1e-17 noise; the group shift makes it exact
    x = full_inputs([0.1, 0.1, 0.1, 1.0, 0.0], [2, 2, 2, 2, 2], 2, group=[3, 3, 3, 8, 8])
    adv = ADVANTAGES[kind].fn(x).advantages
    assert torch.equal(adv[:3], torch.zeros(3, 2, dtype=F64))
    assert (adv[3:] != 0).all()  # the other group is not all-equal


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_empty_responses_get_zero_and_do_not_crash(name):
    # row 1 is empty (its score still counts in its group); other rows keep their values
    x = full_inputs([1.0, 5.0, 0.0, 2.0], [3, 0, 2, 1], 3, group=[0, 0, 1, 1], values=torch.randn(4, 3, dtype=F64), kl=torch.rand(4, 3, dtype=F64))
    # opo weighs its baseline by length: the empty row 1 weighs nothing, so row 0, alone with
    # it, is its own baseline and gets 0 (test_opo_empty_row_weighs_nothing); row 2 still learns
    learning = [2] if name == "opo" else [0, 2]
    for whiten in (False, True):
        res = ADVANTAGES[name].fn(x, whiten=whiten, kl_coef=0.1)
        assert torch.isfinite(res.advantages).all()
        assert torch.equal(res.advantages[1], torch.zeros(3, dtype=F64))
        assert all((res.advantages[i, : [3, 0, 2, 1][i]] != 0).any() for i in learning)
        if res.returns is not None:
            assert torch.equal(res.returns[1], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("name", ["gae", "reward_to_go", "greedy_baseline"])
def test_unscorable_empty_row_does_not_leak_nan(name):
    # an empty response scored NaN (unscorable): its row is all padding, so it stays 0
    x = full_inputs([1.0, float("nan"), 0.0], [2, 0, 3], 3, group=[0, 1, 2], values=torch.zeros(3, 3, dtype=F64))
    res = ADVANTAGES[name].fn(x, whiten=False)
    assert torch.isfinite(res.advantages).all()
    assert torch.equal(res.advantages[1], torch.zeros(3, dtype=F64))
    if res.returns is not None:
        assert torch.isfinite(res.returns).all()


@pytest.mark.parametrize("name", ALL_VARIANTS)
@pytest.mark.parametrize("T", [0, 3])
def test_batch_of_only_empty_responses(name, T):
    # every response empty (even T = 0): zeros without whitening; whitening refuses (< 2 tokens)
    x = full_inputs([1.0, 0.0], [0, 0], T, group=[0, 0])
    res = ADVANTAGES[name].fn(x, whiten=False)
    assert res.advantages.shape == (2, T) and torch.equal(res.advantages, torch.zeros(2, T, dtype=F64))
    assert res.metrics["advantages/mean"] == 0.0 and res.metrics["advantages/std"] == 0.0
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        ADVANTAGES[name].fn(x, whiten=True)


def test_empty_row_keeps_its_score_in_the_group_baseline():
    # group {R=1 (3 tokens), R=5 (empty)}: centred 1 - 3 = -2 on the non-empty row
    x = full_inputs([1.0, 5.0], [3, 0], 3, group=[0, 0])
    assert torch.allclose(group_center(x).advantages[0], t64([-2.0, -2.0, -2.0]), atol=1e-12)


def test_truncated_response_reward_on_last_token_and_bootstrap_zero():
    # mask fills all T=3 (no EOS, truncated): reward still on token 3 and V after it is 0
    # γ = λ = 1, V = [0.2, 0.4, 0.6], R = 1: δ = [0.2, 0.2, 0.4]; A = [0.8, 0.6, 0.4] = R - V
    x = AdvantageInputs(t64([1.0]), mask_of([3], 3), torch.tensor([0]), values=t64([[0.2, 0.4, 0.6]]))
    res = gae(x, gamma=1.0, lam=1.0, whiten=False)
    assert torch.allclose(res.advantages, t64([[0.8, 0.6, 0.4]]), atol=1e-12)
    assert torch.allclose(res.returns, t64([[1.0, 1.0, 1.0]]), atol=1e-12)
    rtg = reward_to_go(x, whiten=False)
    assert torch.allclose(rtg.advantages, t64([[1.0, 1.0, 1.0]]), atol=1e-12)


@pytest.mark.parametrize("kind", GROUP_VARIANTS)
def test_singleton_group_raises_naming_the_group(kind):
    x = full_inputs([1.0, 0.0, 1.0], [2, 2, 2], 2, group=[4, 4, 17])
    with pytest.raises(ValueError, match=rf"{kind}: group\(s\) 17 have a single response"):
        ADVANTAGES[kind].fn(x)


@pytest.mark.parametrize("name", ["reward_to_go", "greedy_baseline", "gae"])
def test_non_group_variants_accept_one_row_per_prompt(name):
    x = full_inputs([1.0, 0.0, 1.0], [2, 2, 2], 2, group=[4, 5, 17])
    assert ADVANTAGES[name].fn(x).advantages.shape == (3, 2)


@pytest.mark.parametrize("kind", GROUP_VARIANTS)
def test_non_contiguous_ids_equal_relabelled_and_permuted(kind):
    x, _ = random_batch(3)
    ids = x.group.unique()
    assert ids.numel() > 1 and ids.tolist() != list(range(ids.numel()))  # arbitrary ids, really
    assert (x.group[1:] != x.group[:-1]).sum() > ids.numel() - 1  # and groups interleave
    base = ADVANTAGES[kind].fn(x).advantages
    # relabel ids to 0..G-1 in a different order: same answer
    _, inv = torch.unique(x.group, return_inverse=True)
    relabel = AdvantageInputs(x.rewards, x.mask, (inv.max() - inv), values=x.values, kl=x.kl)
    assert torch.allclose(ADVANTAGES[kind].fn(relabel).advantages, base, atol=1e-12)
    # permute rows: advantages permute with them
    perm = torch.randperm(x.rewards.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = AdvantageInputs(x.rewards[perm], x.mask[perm], x.group[perm])
    assert torch.allclose(ADVANTAGES[kind].fn(shuffled).advantages, base[perm], atol=1e-12)


def test_interleaved_groups_by_hand():
    # groups interleave: ids 9, 2, 9, 2 with R = 1, 10, 3, 20 → centres 2 and 15
    x = full_inputs([1.0, 10.0, 3.0, 20.0], [1, 1, 1, 1], 1, group=[9, 2, 9, 2])
    assert torch.allclose(group_center(x).advantages[:, 0], t64([-1.0, -5.0, 1.0, 5.0]), atol=1e-12)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_padding_stays_zero_with_garbage_inputs(name):
    for seed in range(4):
        x, lengths = random_batch(seed)
        pad = x.mask == 0
        for whiten in (False, True):
            if whiten and sum(lengths) < 2:
                continue
            res = ADVANTAGES[name].fn(x, whiten=whiten, kl_coef=0.1)
            assert torch.equal(res.advantages[pad], torch.zeros(int(pad.sum()), dtype=F64))
            assert torch.isfinite(res.advantages).all()
            if res.returns is not None:
                assert torch.equal(res.returns[pad], torch.zeros(int(pad.sum()), dtype=F64))


@pytest.mark.parametrize("name, missing", [("gae", "values"), ("greedy_baseline", "baseline_rewards")])
def test_missing_required_input_raises(name, missing):
    x = full_inputs([1.0, 0.0], [2, 2], 2)
    setattr(x, missing, None)
    with pytest.raises(ValueError, match=f"needs {missing}"):
        ADVANTAGES[name].fn(x)


def test_shape_errors_are_reported_together():
    x = AdvantageInputs(t64([1.0, 0.0, 2.0]), mask_of([2, 2], 2), torch.tensor([0, 0]), values=torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as err:
        gae(x)
    assert "rewards must be [B]=[2]" in str(err.value) and "values must have the mask's shape" in str(err.value)


@pytest.mark.parametrize(
    "fn, kw, msg",
    [
        (gae, {"lam": 1.5}, "lam must be in"),
        (gae, {"gamma": -0.1}, "gamma must be in"),
        (gae, {"lambda_critic": 2.0}, "lambda_critic must be in"),
        (gae, {"length_alpha": 0.0}, "length_alpha must be > 0"),
        (reward_to_go, {"gamma": 1.1}, "gamma must be in"),
        (group_norm, {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_params_raise(fn, kw, msg):
    with pytest.raises(ValueError, match=msg):
        fn(full_inputs([1.0, 0.0], [2, 2], 2), **kw)


def test_whitening_needs_two_tokens():
    x = full_inputs([1.0, 0.0], [1, 0], 2, group=[0, 1])
    with pytest.raises(ValueError, match="at least 2 valid tokens"):
        reward_to_go(x)


def test_no_gradient_flows_out_and_dtype_is_kept():
    values = torch.randn(2, 3, dtype=F64, requires_grad=True)
    x = AdvantageInputs(t64([1.0, 0.0]), mask_of([3, 2], 3), torch.tensor([0, 1]), values=values)
    res = gae(x)
    assert not res.advantages.requires_grad and not res.returns.requires_grad
    assert res.advantages.dtype == F64
    # bf16 scores are computed in float32
    xb = AdvantageInputs(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 0]))
    out = group_norm(xb)
    assert out.advantages.dtype == torch.float32
    assert torch.allclose(out.advantages, torch.tensor([[0.7071] * 2, [-0.7071] * 2]), atol=1e-4)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_result_type_and_metric_names(name):
    x = full_inputs([1.0, 0.0, 2.0, 2.5], [2, 3, 1, 3], 3, kl=torch.rand(4, 3, dtype=F64))
    res = ADVANTAGES[name].fn(x, kl_coef=0.1)
    assert isinstance(res, AdvantageResult)
    expected = {"advantages/mean", "advantages/std", "rewards/kl_penalty"}
    if name == "gae":
        expected |= {"returns/mean", "returns/std"}
    if name == "gpg":
        expected |= {"advantages/gpg_alpha"}
    assert set(res.metrics) == expected
    assert all(isinstance(v, float) for v in res.metrics.values())
    # the metric is the token-weighted mean of the returned advantages
    assert res.metrics["advantages/mean"] == pytest.approx((res.advantages.sum() / x.mask.sum()).item(), abs=1e-12)
