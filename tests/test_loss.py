"""Loss variants: hand-computed values, gradients, and the micro-batch invariant (Part A §3).

Everything is float64. Hand numbers carry their arithmetic in a comment; σ is the
logistic function, logσ(x) = -log(1 + e^-x).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlflow.nodes.loss import LOSSES, LossTerm
from rlflow.spec import Loss
from rlflow.variants import Variant
from rlflow.nodes.masked import AGG_MODES, Counts, count

F64 = torch.float64
OUTPUT = {"logprobs": "logprobs", "values": "new_values", "scores": "scores"}  # needs -> column
POLICY = [n for n in LOSSES if LOSSES[n].entropy]  # the policy losses, from the registry: they get the entropy
RATIO = [n for n in POLICY if "old_logprobs" in LOSSES[n].reads(Loss(n))]  # and those with a ratio to π_old


def outputs_of(v: Variant) -> set[str]:
    """The model outputs the runner puts into the columns of variant ``v``."""
    return {OUTPUT[v.needs]} | ({"entropy"} if v.entropy else set())


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def run(name: str, cols: dict, params: dict | None = None, constant: float = 1.0) -> LossTerm:
    """Counts over the variant's own mask (as the engine does), then the loss."""
    params = params or {}
    v = LOSSES[name]
    if v.entropy and "entropy" not in cols:  # the runner always supplies it; cases that ignore it get zeros
        cols = {**cols, "entropy": torch.zeros_like(cols["logprobs"])}
    counts = count(v.mask(cols, params), group=cols.get("group"), constant=constant)
    return v.fn(cols, counts, **params)


def grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


# --- contract --------------------------------------------------------------------------


def test_registry_needs_and_policy_facts():
    # the registry is the only list of names; every variant declares the one model output it needs
    assert all(isinstance(LOSSES[n], Variant) for n in LOSSES)
    assert {LOSSES[n].needs for n in LOSSES} == {"logprobs", "values", "scores"}
    assert {"clip", "clip_higher", "gspo", "cispo", "sapo", "pg"} <= set(POLICY) and "nll" not in POLICY
    for n in LOSSES:
        # a policy loss is exactly one that weighs log-probs by advantages: it gets the entropy
        # (entropy/mean, entropy_coef) and takes KL in the loss like clip does
        v = LOSSES[n]
        assert v.entropy == ("advantages" in v.reads(Loss(n))), n
        if v.entropy:
            assert v.needs == "logprobs" and {"entropy_coef", "kl_coef", "kl", "agg"} <= set(v.params), n


class Recording(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


READS = [
    ("clip", {}, {"response_mask", "old_logprobs", "advantages"}),
    ("clip", {"kl_coef": 0.1}, {"response_mask", "old_logprobs", "advantages", "ref_logprobs"}),
    ("clip_higher", {"dual_clip": 3.0}, {"response_mask", "old_logprobs", "advantages"}),
    ("clip_higher", {"kl_coef": 0.1, "kl": "k2"}, {"response_mask", "old_logprobs", "advantages", "ref_logprobs"}),
    ("gspo", {}, {"response_mask", "old_logprobs", "advantages"}),
    ("gspo", {"kl_coef": 0.1, "entropy_coef": 0.01}, {"response_mask", "old_logprobs", "advantages", "ref_logprobs"}),
    ("cispo", {}, {"response_mask", "old_logprobs", "advantages"}),
    ("cispo", {"kl_coef": 0.1, "kl": "abs"}, {"response_mask", "old_logprobs", "advantages", "ref_logprobs"}),
    ("sapo", {}, {"response_mask", "old_logprobs", "advantages"}),
    ("sapo", {"kl_coef": 0.1}, {"response_mask", "old_logprobs", "advantages", "ref_logprobs"}),
    ("pg", {}, {"response_mask", "old_logprobs", "advantages"}),
    ("pg", {"kl_coef": 0.1, "entropy_coef": 0.01}, {"response_mask", "old_logprobs", "advantages", "ref_logprobs"}),
    ("value", {}, {"response_mask", "values", "returns"}),
    ("nll", {}, {"response_mask"}),
    ("nll", {"where": "correct"}, {"response_mask", "rewards"}),
    ("dpo", {}, {"response_mask", "ref_logprobs", "group", "chosen"}),
    ("bradley_terry", {}, {"group", "chosen"}),
]


@pytest.mark.parametrize("name,params,expected", READS)
def test_reads_is_exactly_what_the_variant_reads(name, params, expected):
    v = LOSSES[name]
    spec = Loss(name, **params)
    assert set(v.reads(spec)) == expected - {"response_mask"}  # the kind itself reads the mask
    assert expected <= set(spec.reads())  # the node declares (as graph edges) all the maths reads
    full = random_batch(0, pairs=True)
    outs = outputs_of(v)
    # the engine may pass only the declared columns plus the model outputs: that must suffice
    cols = Recording({k: full[k] for k in expected | outs})
    term = run(name, cols, params)
    assert cols.read - outs == expected
    assert term.loss.dim() == 0 and term.loss.requires_grad
    assert term.metrics and all(isinstance(x, float) for x in term.metrics.values())  # floats (Stats add up over ranks)


def test_masks():
    cols = {
        "response_mask": t([[1, 1], [1, 0], [1, 1]]),
        "rewards": t([1.0, -1.0, 0.5]),
        "group": torch.tensor([4, 4, 9]),
    }
    assert torch.equal(LOSSES["clip"].mask(cols, {}), cols["response_mask"])
    assert torch.equal(LOSSES["nll"].mask(cols, {"where": "all"}), cols["response_mask"])
    # correct = rewards > 0: rows 0 and 2
    assert torch.equal(LOSSES["nll"].mask(cols, {"where": "correct"}), t([[1, 1], [0, 0], [1, 1]]))
    bt = LOSSES["bradley_terry"].mask(cols, {})
    assert bt.shape == (3, 1) and bool((bt == 1).all())
    assert count(bt, group=cols["group"]).groups == 2.0


# --- clip / clip_higher: one token at a time ---------------------------------------------


def one_token(name: str, ratio: float, adv: float, **params):
    """Loss, d loss / d lp and metrics of one valid token with lp - lp_old = log ratio."""
    lp = t([[math.log(ratio)]]).requires_grad_()
    cols = {"logprobs": lp, "old_logprobs": t([[0.0]]), "advantages": t([[adv]]), "response_mask": t([[1.0]])}
    term = run(name, cols, params)
    return term.loss.item(), grad(term.loss, lp).item(), term.metrics


# (ratio, A, loss, dloss/dlp, clip active); unclipped loss -Aρ has gradient -Aρ (dρ/dlp = ρ)
CLIP_CASES = [
    (1.1, 1.0, -1.1, -1.1, 0.0),  # inside [0.8, 1.2]: max(-1.1, -1.1)
    (1.5, 1.0, -1.2, 0.0, 1.0),  # A>0, ρ above: max(-1.5, -1.2) = -1.2, clipped, no gradient
    (0.5, 1.0, -0.5, -0.5, 0.0),  # A>0, ρ below: max(-0.5, -0.8) = -0.5, not clipped
    (1.5, -2.0, 3.0, 3.0, 0.0),  # A<0, ρ above: max(3.0, 2.4) = 3.0, not clipped
    (0.5, -2.0, 1.6, 0.0, 1.0),  # A<0, ρ below: max(1.0, 1.6) = 1.6, clipped
    (0.9, -2.0, 1.8, 1.8, 0.0),  # inside: max(1.8, 1.8)
    (4.0, -1.0, 4.0, 4.0, 0.0),  # no dual-clip: max(4.0, 1.2) = 4.0, unbounded
]


@pytest.mark.parametrize("ratio,adv,loss,dlp,clipped", CLIP_CASES)
def test_clip_token(ratio, adv, loss, dlp, clipped):
    value, g, m = one_token("clip", ratio, adv, eps=0.2)
    assert value == pytest.approx(loss, abs=1e-12)
    assert g == pytest.approx(dlp, abs=1e-12)
    assert m["clip_frac"] == clipped
    assert m["ratio/mean"] == pytest.approx(ratio, abs=1e-12)
    assert m["loss/pg"] == pytest.approx(loss, abs=1e-12)


# dual-clip c = 3, only for A < 0: L = min(max(-Aρ, -A clip(ρ)), -cA)
DUAL_CASES = [
    (4.0, -1.0, 3.0, 0.0, 1.0),  # min(4.0, 3.0) = 3.0, bounded, no gradient
    (2.0, -1.0, 2.0, 2.0, 0.0),  # min(2.0, 3.0) = 2.0, untouched
    (4.0, 1.0, -1.2, 0.0, 0.0),  # A>0: max(-4, -1.2) = -1.2, dual-clip not applied (min(-1.2, -3) would be -3)
    (0.5, -1.0, 0.8, 0.0, 0.0),  # A<0, ρ below: ordinary clip, 0.8
]


@pytest.mark.parametrize("ratio,adv,loss,dlp,dual", DUAL_CASES)
def test_dual_clip_token(ratio, adv, loss, dlp, dual):
    value, g, m = one_token("clip", ratio, adv, eps=0.2, dual_clip=3.0)
    assert value == pytest.approx(loss, abs=1e-12)
    assert g == pytest.approx(dlp, abs=1e-12)
    assert m["dual_clip_frac"] == dual


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_constant_must_exceed_one(c):
    with pytest.raises(ValueError, match="dual_clip"):
        one_token("clip", 1.0, -1.0, dual_clip=c)


# clip_higher, band [1-0.2, 1+0.28] = [0.8, 1.28]
HIGHER_CASES = [
    (1.25, 1.0, -1.25, -1.25),  # inside the higher band (symmetric 0.2 would give -1.2)
    (1.5, 1.0, -1.28, 0.0),  # max(-1.5, -1.28)
    (0.75, -1.0, 0.8, 0.0),  # max(0.75, 0.8): the low bound is still 0.8
    (0.85, -1.0, 0.85, 0.85),  # inside
]


@pytest.mark.parametrize("ratio,adv,loss,dlp", HIGHER_CASES)
def test_clip_higher_token(ratio, adv, loss, dlp):
    value, g, _ = one_token("clip_higher", ratio, adv, eps_low=0.2, eps_high=0.28)
    assert value == pytest.approx(loss, abs=1e-12)
    assert g == pytest.approx(dlp, abs=1e-12)


def test_clip_is_clip_higher_with_equal_bounds():
    assert one_token("clip", 1.25, 1.0, eps=0.2)[0] == pytest.approx(-1.2, abs=1e-12)  # min(1.25, 1.2)
    assert one_token("clip_higher", 1.25, 1.0, eps_low=0.2, eps_high=0.2)[0] == pytest.approx(-1.2, abs=1e-12)


def test_log_ratio_clamped_at_20():
    # lp - old = 1000 would overflow exp; the clamp gives ρ = e^20 and no gradient
    lp = t([[1000.0]]).requires_grad_()
    cols = {"logprobs": lp, "old_logprobs": t([[0.0]]), "advantages": t([[-1.0]]), "response_mask": t([[1.0]])}
    term = run("clip", cols)
    assert term.loss.item() == pytest.approx(math.exp(20.0), rel=1e-12)  # max(e^20, 1.2)
    assert grad(term.loss, lp).item() == 0.0


def test_clip_masks_padding_and_reports_fractions():
    # row 0: ρ = 1.5, 1.0, [pad]; row 1: ρ = 0.5, [pad], [pad]; A = +1 everywhere.
    # valid tokens: ρ 1.5 (clipped), 1.0, 0.5 (not clipped for A>0) -> clip_frac 1/3
    # token losses -1.2, -1.0, -0.5 -> token-mean -2.7/3 = -0.9; padding carries garbage
    lp = t([[math.log(1.5), 0.0, 50.0], [math.log(0.5), -50.0, 7.0]]).requires_grad_()
    cols = {
        "logprobs": lp,
        "old_logprobs": t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "advantages": t([[1.0, 1.0, 1e6], [1.0, 1e6, 1e6]]),
        "response_mask": t([[1, 1, 0], [1, 0, 0]]),
    }
    term = run("clip", cols)
    assert term.loss.item() == pytest.approx(-0.9, abs=1e-12)
    assert term.metrics["clip_frac"] == pytest.approx(1 / 3, abs=1e-12)
    assert term.metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-12)  # (1.5 + 1 + 0.5)/3
    # d/dlp: -Aρ/3 on unclipped tokens: [0, -1/3, 0], [-0.5/3, 0, 0]
    assert torch.allclose(grad(term.loss, lp), t([[0.0, -1 / 3, 0.0], [-0.5 / 3, 0.0, 0.0]]), atol=1e-12)
    assert "kl/mean" not in term.metrics and "loss/kl" not in term.metrics


# --- KL in the loss ------------------------------------------------------------------


# d = lp - ref = 0.5, ratio 1, A = 0, kl_coef = 0.1: loss = 0.1·k, d loss/d lp = 0.1·dk/dd
KL_CASES = [
    ("k1", 0.5, 0.1 * 0.5, 0.1 * 1.0),  # k1 = d, dk/dd = 1
    ("k2", 0.5, 0.1 * 0.125, 0.1 * 0.5),  # k2 = d²/2 = 0.125, dk/dd = d
    ("k3", 0.5, 0.1 * 0.10653065971263342, 0.1 * 0.3934693402873666),  # k3 = e^-0.5 - 1 + 0.5, dk/dd = 1 - e^-0.5
    ("k3", -15.0, 0.1 * 10.0, 0.0),  # e^15 - 1 - 15 = 3.27e6, clamped to 10: no gradient
    ("k3", -25.0, 0.1 * 10.0, 0.0),  # -d clamped to 20 before exp, then to 10
    ("abs", 0.5, 0.1 * 0.5, 0.1 * 1.0),  # |d| = 0.5, d|d|/dd = sign(d) = 1
    ("abs", -0.5, 0.1 * 0.5, 0.1 * -1.0),  # |d| = 0.5, sign(d) = -1: pulled up towards lp_ref
]


@pytest.mark.parametrize("est,d,loss,dlp", KL_CASES)
def test_kl_in_loss(est, d, loss, dlp):
    lp = t([[-1.0]]).requires_grad_()
    cols = {
        "logprobs": lp,
        "old_logprobs": t([[-1.0]]),
        "ref_logprobs": t([[-1.0 - d]]),
        "advantages": t([[0.0]]),
        "response_mask": t([[1.0]]),
    }
    term = run("clip", cols, {"kl_coef": 0.1, "kl": est})
    assert term.loss.item() == pytest.approx(loss, abs=1e-12)
    assert grad(term.loss, lp).item() == pytest.approx(dlp, abs=1e-12)
    assert term.metrics["loss/kl"] == pytest.approx(loss, abs=1e-12)
    assert term.metrics["kl/mean"] == pytest.approx(loss / 0.1, abs=1e-12)
    assert term.metrics["loss/pg"] == 0.0


def test_kl_estimators_are_listed_once():
    # spec.KlEstimator (Advantage's kl field) is the list; masked and every Loss variant use it
    import rlflow.nodes.masked as masked
    import rlflow.spec as spec

    assert masked.KlEstimator is spec.KlEstimator and masked.KL_ESTIMATORS == ("k1", "k2", "k3", "abs")
    for est in masked.KL_ESTIMATORS:  # every listed estimator is implemented
        masked.kl_estimate(t([0.3]), t([0.1]), est)
    with pytest.raises(ValueError, match="expected one of k1, k2, k3, abs"):
        masked.kl_estimate(t([0.3]), t([0.1]), "k4")
    # and the specs accept the whole list: KL in the reward (Advantage) and in the loss
    assert spec.Advantage("group_norm", kl="abs", kl_coef=0.1).kl == "abs"
    assert Loss("clip", kl="abs", kl_coef=0.1).kl == "abs"


@pytest.mark.parametrize("agg,expected", [("token-mean", 1.6 / 3), ("seq-mean-token-mean", 0.65)])
def test_kl_uses_the_loss_aggregation(agg, expected):
    # k1, coef 1, A = 0: d = [1.0, pad], [0.2, 0.4]
    # token-mean (1.0 + 0.2 + 0.4)/3;  seq-mean-token-mean (1.0/1 + 0.6/2)/2 = 0.65
    lp = t([[0.0, 0.0], [0.0, 0.0]]).requires_grad_()
    cols = {
        "logprobs": lp,
        "old_logprobs": t([[0.0, 0.0], [0.0, 0.0]]),
        "ref_logprobs": t([[-1.0, 9.0], [-0.2, -0.4]]),
        "advantages": t([[0.0, 0.0], [0.0, 0.0]]),
        "response_mask": t([[1, 0], [1, 1]]),
    }
    term = run("clip", cols, {"kl_coef": 1.0, "kl": "k1", "agg": agg})
    assert term.loss.item() == pytest.approx(expected, abs=1e-12)


# --- aggregation modes -----------------------------------------------------------------


# ℓ = -lp: row 0 ℓ = 1, 2, 3; row 1 ℓ = 4, 5; row 2 empty (B = 3, B' = 2); C = 4.
AGG_CASES = [
    # mode, loss, d loss/d lp on row 0, on row 1
    ("token-mean", 15 / 5, -1 / 5, -1 / 5),  # (1+2+3+4+5)/5 = 3
    ("seq-mean-token-mean", (6 / 3 + 9 / 2) / 2, -1 / 6, -1 / 4),  # (2 + 4.5)/2 = 3.25
    ("seq-mean-token-sum", (6 + 9) / 2, -1 / 2, -1 / 2),  # 15/B' = 7.5
    ("seq-mean-token-sum-norm", 15 / (2 * 4), -1 / 8, -1 / 8),  # 15/(B'·C) = 1.875: the empty row does not count (Part A §3)
]


@pytest.mark.parametrize("mode,loss,g0,g1", AGG_CASES)
def test_aggregation_modes(mode, loss, g0, g1):
    x = 123.0  # garbage on padding
    lp = t([[-1.0, -2.0, -3.0, x], [-4.0, -5.0, x, x], [x, x, x, x]]).requires_grad_()
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    counts = count(mask, constant=4.0)
    assert (counts.tokens, counts.seqs, counts.rows) == (5.0, 2.0, 3.0)
    term = LOSSES["nll"].fn({"logprobs": lp, "response_mask": mask}, counts, agg=mode)
    assert term.loss.item() == pytest.approx(loss, abs=1e-12)
    assert torch.allclose(grad(term.loss, lp), mask * t([[g0], [g1], [0.0]]), atol=1e-12)


def test_unknown_aggregation_mode_raises():
    cols = {"logprobs": t([[0.0]]).requires_grad_(), "response_mask": t([[1.0]])}
    with pytest.raises(ValueError, match="aggregation mode"):
        run("nll", cols, {"agg": "token-sum"})


# --- value ---------------------------------------------------------------------------


# ε_v = 0.5, V_old = 0: (V_new, Ret, loss, d loss/d V_new, clip active)
VALUE_CASES = [
    (0.2, 1.0, 0.32, -0.8, 0.0),  # V_clip = 0.2: ½·max(0.64, 0.64); grad V_new - Ret
    (2.0, 1.0, 0.5, 1.0, 0.0),  # V_clip = 0.5: ½·max(1, 0.25) = 0.5, unclipped wins
    (2.0, 3.0, 3.125, 0.0, 1.0),  # V_clip = 0.5: ½·max(1, 6.25) = 3.125, clipped wins, no gradient
    (-1.0, 0.0, 0.5, -1.0, 0.0),  # V_clip = -0.5: ½·max(1, 0.25)
    (-1.0, 1.0, 2.0, -2.0, 0.0),  # V_clip = -0.5: ½·max(4, 2.25) = 2
]


@pytest.mark.parametrize("v_new,ret,loss,dv,clipped", VALUE_CASES)
def test_value_token(v_new, ret, loss, dv, clipped):
    v = t([[v_new]]).requires_grad_()
    cols = {"new_values": v, "values": t([[0.0]]), "returns": t([[ret]]), "response_mask": t([[1.0]])}
    term = run("value", cols, {"eps_v": 0.5})
    assert term.loss.item() == pytest.approx(loss, abs=1e-12)
    assert grad(term.loss, v).item() == pytest.approx(dv, abs=1e-12)
    assert term.metrics["value/clip_frac"] == clipped
    assert term.metrics["loss/value"] == pytest.approx(loss, abs=1e-12)


def test_value_explained_variance_and_masking():
    # valid Ret = 1, 2, 3, 4 (Var = 1.25), V_new = 1, 2, 3, 5: residual 0, 0, 0, -1 (Var = 0.1875)
    # EV = 1 - 0.1875/1.25 = 0.85. V_old = V_new: no clipping; loss ½·(0+0+0+1)/4 = 0.125
    v = t([[1.0, 2.0, 99.0], [3.0, 5.0, -99.0]]).requires_grad_()
    cols = {
        "new_values": v,
        "values": t([[1.0, 2.0, 0.0], [3.0, 5.0, 0.0]]),
        "returns": t([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]),
        "response_mask": t([[1, 1, 0], [1, 1, 0]]),
    }
    term = run("value", cols)
    assert term.metrics["value/explained_variance"] == pytest.approx(0.85, abs=1e-7)
    assert term.loss.item() == pytest.approx(0.125, abs=1e-12)
    assert torch.allclose(grad(term.loss, v), t([[0.0, 0.0, 0.0], [0.0, 0.25, 0.0]]), atol=1e-12)


# --- nll -------------------------------------------------------------------------------


def test_nll_correct_rows_only():
    # correct rows (rewards > 0): 0 and 2, tokens lp = -1, -2, -5, N = 3
    # loss = -(-8/3) = 2.66667; d/dlp = -1/3 on those tokens, 0 elsewhere
    lp = t([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]).requires_grad_()
    cols = {"logprobs": lp, "response_mask": t([[1, 1], [1, 1], [1, 0]]), "rewards": t([1.0, -1.0, 0.5])}
    params = {"where": "correct"}
    assert count(LOSSES["nll"].mask(cols, params)).tokens == 3.0
    term = run("nll", cols, params)
    assert term.loss.item() == pytest.approx(8 / 3, abs=1e-12)
    assert term.metrics["loss/nll"] == pytest.approx(8 / 3, abs=1e-12)
    assert torch.allclose(grad(term.loss, lp), t([[1, 1], [0, 0], [1, 0]]) * (-1 / 3), atol=1e-12)
    # where="all": all five valid tokens, (1+2+3+4+5)/5 = 3
    assert run("nll", cols, {}).loss.item() == pytest.approx(3.0, abs=1e-12)


def test_the_node_coef_weights_the_term():
    # VAPO's μ is the Loss node's coef: the runner scales the variant's loss by it (0.1 · 8/3)
    from rlflow.nodes.loss import LossRunner

    lp = t([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]).requires_grad_()
    cols = {"logprobs": lp, "response_mask": t([[1, 1], [1, 1], [1, 0]]), "rewards": t([1.0, -1.0, 0.5])}
    r = LossRunner(Loss("nll", where="correct", coef=0.1))
    term = r.term(cols, count(LOSSES["nll"].mask(cols, r.params)))
    assert term.loss.item() == pytest.approx(0.8 / 3, abs=1e-12)
    assert torch.allclose(grad(term.loss, lp), t([[1, 1], [0, 0], [1, 0]]) * (-0.1 / 3), atol=1e-12)


def test_nll_no_correct_sample_is_zero():
    lp = t([[-1.0, -2.0]]).requires_grad_()
    cols = {"logprobs": lp, "response_mask": t([[1, 1]]), "rewards": t([0.0])}
    term = run("nll", cols, {"where": "correct"})
    assert term.loss.item() == 0.0
    assert bool((grad(term.loss, lp) == 0).all())


# --- DPO -------------------------------------------------------------------------------


def dpo_batch():
    """Two pairs, rows interleaved: group 7 rows 2 (chosen) and 0; group 3 rows 1 (chosen) and 3.

    pair 7: LP_θ(w) = -1-2 = -3, LP_ref(w) = -1.5-2.5 = -4, LP_θ(l) = -2-1-1 = -4, LP_ref(l) = -3
            h = (-3 - -4) - (-4 - -3) = 1 + 1 = 2
    pair 3: LP_θ(w) = -2, LP_ref(w) = -1.5, LP_θ(l) = -1-0.5 = -1.5, LP_ref(l) = -2
            h = (-2 - -1.5) - (-1.5 - -2) = -0.5 - 0.5 = -1
    """
    x = 77.0  # garbage on padding
    lp = t([[-2.0, -1.0, -1.0], [-2.0, x, x], [-1.0, -2.0, x], [-1.0, -0.5, x]]).requires_grad_()
    cols = {
        "logprobs": lp,
        "ref_logprobs": t([[-1.0, -1.0, -1.0], [-1.5, x, x], [-1.5, -2.5, x], [-1.0, -1.0, x]]),
        "response_mask": t([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]),
        "group": torch.tensor([7, 3, 7, 3]),
        "chosen": t([0.0, 1.0, 1.0, 0.0]),
    }
    return lp, cols


DPO_CASES = [
    # β = 0.1: -logσ(0.2) = 0.5981388694, -logσ(-0.1) = 0.7443966601, mean 0.6712677647
    ({}, (0.5981388693815918 + 0.744396660073571) / 2),
    # ε = 0.1: -(0.9)logσ(βh) - 0.1·logσ(-βh) = -logσ(βh) + 0.1·βh  (logσ(x) - logσ(-x) = x)
    # pair 7: 0.5981388694 + 0.02 = 0.6181388694; pair 3: 0.7443966601 - 0.01 = 0.7343966601
    ({"label_smoothing": 0.1}, (0.6181388693815918 + 0.734396660073571) / 2),
    # IPO: (h - 1/(2·0.1))² = (2-5)² = 9 and (-1-5)² = 36, mean 22.5
    ({"ipo": True}, 22.5),
]


@pytest.mark.parametrize("params,expected", DPO_CASES)
def test_dpo_values(params, expected):
    lp, cols = dpo_batch()
    counts = count(cols["response_mask"], group=cols["group"])
    assert counts.groups == 2.0
    term = LOSSES["dpo"].fn(cols, counts, beta=0.1, **params)
    assert term.loss.item() == pytest.approx(expected, abs=1e-10)
    m = term.metrics
    assert m["dpo/reward_accuracy"] == 0.5  # h = 2 > 0, h = -1 < 0
    assert m["dpo/margin"] == pytest.approx(0.05, abs=1e-12)  # 0.1·(2 - 1)/2
    assert m["dpo/chosen_reward"] == pytest.approx(0.025, abs=1e-12)  # 0.1·(1.0 + -0.5)/2
    assert m["dpo/rejected_reward"] == pytest.approx(-0.025, abs=1e-12)  # 0.1·(-1.0 + 0.5)/2
    assert m["loss/dpo"] == pytest.approx(expected, abs=1e-10)


def test_dpo_single_pair_h2():
    # β = 0.1, h = 2 -> -logσ(0.2) = log(1 + e^-0.2) = 0.598139
    lp = t([[-1.0], [-3.0]]).requires_grad_()
    cols = {
        "logprobs": lp,
        "ref_logprobs": t([[0.0], [0.0]]),
        "response_mask": t([[1.0], [1.0]]),
        "group": torch.tensor([0, 0]),
        "chosen": t([1.0, 0.0]),
    }
    assert run("dpo", cols).loss.item() == pytest.approx(0.598138869381592, abs=1e-12)


def test_dpo_gradient():
    # ∇L = -β σ(-βh)/P on every valid token of y_w, the opposite on y_l (P = 2)
    # pair 7: 0.1·σ(-0.2)/2 = 0.1·0.4501660027/2 = 0.0225083001
    # pair 3: 0.1·σ(0.1)/2  = 0.1·0.5249791875/2 = 0.0262489594
    lp, cols = dpo_batch()
    term = run("dpo", cols, {"beta": 0.1})
    g7, g3 = 0.1 * 0.45016600268752216 / 2, 0.1 * 0.52497918747894 / 2
    expected = t([[g7, g7, g7], [-g3, 0, 0], [-g7, -g7, 0], [g3, g3, 0]])
    assert torch.allclose(grad(term.loss, lp), expected, atol=1e-12)


def test_dpo_identical_pair_has_zero_parameter_gradient():
    # y_w == y_l: both rows are the same tokens under the same policy θ [T, V]
    torch.manual_seed(0)
    theta = torch.randn(4, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([1, 3, 0, 2])
    row = torch.log_softmax(theta, -1)[torch.arange(4), y]  # [T]
    lp = torch.stack([row, row])  # [2, T]
    ref = torch.randn(4, dtype=F64).expand(2, 4)
    cols = {
        "logprobs": lp,
        "ref_logprobs": ref,
        "response_mask": torch.ones(2, 4, dtype=F64),
        "group": torch.tensor([5, 5]),
        "chosen": t([0.0, 1.0]),
    }
    term = run("dpo", cols, {"beta": 0.1})
    assert term.loss.item() == pytest.approx(math.log(2.0), abs=1e-12)  # h = 0: -logσ(0)
    g_rows = torch.autograd.grad(term.loss, lp, retain_graph=True)[0]
    assert torch.allclose(g_rows, t([[0.05] * 4, [-0.05] * 4]), atol=1e-12)  # each row alone: ±β σ(0)
    assert grad(term.loss, theta).abs().max().item() < 1e-15  # they cancel in θ


def test_dpo_refuses_label_smoothing_with_ipo():
    _, cols = dpo_batch()
    with pytest.raises(ValueError, match="label_smoothing"):
        run("dpo", cols, {"ipo": True, "label_smoothing": 0.1})


BAD_PAIRS = [
    ([0, 0, 0], [1.0, 0.0, 0.0], "1 of 1 groups"),  # three rows
    ([0, 0], [1.0, 1.0], "1 of 1 groups"),  # two chosen
    ([0, 1], [1.0, 0.0], "2 of 2 groups"),  # singletons
    ([0, 0, 4, 4], [1.0, 0.0, 0.0, 0.0], "1 of 2 groups"),  # one good pair, one with no chosen row
    ([0, 0], [1.0, 0.5], "must be 1"),  # not a label
]


@pytest.mark.parametrize("name", ["dpo", "bradley_terry"])
@pytest.mark.parametrize("group,chosen,msg", BAD_PAIRS)
def test_pair_losses_refuse_malformed_pairs(name, group, chosen, msg):
    n = len(group)
    cols = {
        "logprobs": torch.zeros(n, 2, dtype=F64, requires_grad=True),
        "ref_logprobs": torch.zeros(n, 2, dtype=F64),
        "response_mask": torch.ones(n, 2, dtype=F64),
        "scores": torch.zeros(n, dtype=F64, requires_grad=True),
        "group": torch.tensor(group),
        "chosen": t(chosen),
    }
    with pytest.raises(ValueError, match=msg):
        run(name, cols)


# --- Bradley-Terry ---------------------------------------------------------------------


def test_bradley_terry():
    # group 1: s_w = 2.0 (row 2), s_l = 0.5 (row 0), margin 1.5: -logσ(1.5) = log(1+e^-1.5) = 0.2014132780
    # group 2: s_w = 1.0 (row 1), s_l = 1.5 (row 3), margin -0.5: log(1+e^0.5) = 0.9740769842
    # loss = mean = 0.5877451311; d/ds_w = -σ(-margin)/2: σ(-1.5) = 0.1824255238, σ(0.5) = 0.6224593312
    s = t([0.5, 1.0, 2.0, 1.5]).requires_grad_()
    cols = {"scores": s, "group": torch.tensor([1, 2, 1, 2]), "chosen": t([0.0, 1.0, 1.0, 0.0])}
    term = run("bradley_terry", cols)
    assert term.loss.item() == pytest.approx((0.2014132779827524 + 0.9740769841801067) / 2, abs=1e-12)
    a, b = 0.18242552380635635 / 2, 0.6224593312018546 / 2
    assert torch.allclose(grad(term.loss, s), t([a, -b, -a, b]), atol=1e-12)
    assert term.metrics["rm/accuracy"] == 0.5
    assert term.metrics["rm/margin"] == pytest.approx(0.5, abs=1e-12)  # (1.5 - 0.5)/2
    assert term.metrics["loss/rm"] == pytest.approx(term.loss.item(), abs=1e-12)


# --- REINFORCE at ratio 1 (Part A §12) -------------------------------------------------


def test_clip_at_ratio_one_is_reinforce():
    # lp_old = lp.detach(): ρ = 1, no clip is active, and with seq-mean-token-sum
    # ∇loss = -(1/B') Σ_i A_i Σ_t m ∇lp  (REINFORCE / RLOO paper form)
    torch.manual_seed(1)
    theta = torch.randn(5, 6, dtype=F64, requires_grad=True)  # a tiny position-wise policy [T, V]
    y = torch.randint(0, 6, (3, 5))
    lp = torch.log_softmax(theta, -1).unsqueeze(0).expand(3, 5, 6).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [3, 5]
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])  # B = 3, B' = 2
    a = t([0.7, -1.3, 2.0])  # [B]
    cols = {"logprobs": lp, "old_logprobs": lp.detach(), "advantages": a[:, None] * mask, "response_mask": mask}
    term = run("clip", cols, {"agg": "seq-mean-token-sum", "eps": 0.2})
    # value: -(1/B') Σ_i A_i ρ L_i = -(0.7·5 - 1.3·2)/2 = -0.45 (the empty row adds nothing)
    assert term.loss.item() == pytest.approx(-0.45, abs=1e-12)
    reinforce = -(a * (lp * mask).sum(-1)).sum() / 2.0  # same gradient, different value
    g = torch.autograd.grad(term.loss, [theta, lp], retain_graph=True)
    assert torch.allclose(g[0], grad(reinforce, theta), atol=1e-12)
    assert torch.allclose(g[1], -a[:, None] * mask / 2.0, atol=1e-12)  # per token -A_i/B'
    assert term.metrics["clip_frac"] == 0.0


# --- every policy loss: ppo_kl, the entropy bonus --------------------------------------


@pytest.mark.parametrize("name", RATIO)
def test_ppo_kl_is_mean_of_old_minus_new(name):
    # lp - old = log 1.5, 0, log 0.5 on valid tokens (garbage on padding):
    # ppo_kl = mean(old - lp) = -(log 1.5 + 0 + log 0.5)/3 = -log(0.75)/3 = 0.0958940242
    lp = t([[math.log(1.5), 0.0, 50.0], [math.log(0.5), -50.0, 7.0]]).requires_grad_()
    cols = {
        "logprobs": lp,
        "old_logprobs": t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "advantages": t([[1.0, 1.0, 1e6], [1.0, 1e6, 1e6]]),
        "response_mask": t([[1, 1, 0], [1, 0, 0]]),
    }
    m = run(name, cols).metrics
    assert m["ppo_kl"] == pytest.approx(-math.log(0.75) / 3, abs=1e-12)
    assert m["entropy/mean"] == 0.0 and "loss/entropy" not in m  # logged always; bonus off by default


@pytest.mark.parametrize("name", POLICY)
@pytest.mark.parametrize("agg,loss,g0,g1", [
    # A = 0, so the policy term is 0 whatever the variant; c = 0.1, H = [2, 1], [0.5, pad]
    ("token-mean", -0.1 * 3.5 / 3, -0.1 / 3, -0.1 / 3),  # -c·(2 + 1 + 0.5)/3; ∂/∂H = -c/N
    ("seq-mean-token-mean", -0.1 * (1.5 + 0.5) / 2, -0.1 / 4, -0.1 / 2),  # -c·(3/2 + 0.5/1)/2; -c/(B'·L_i)
])
def test_entropy_bonus(name, agg, loss, g0, g1):
    lp = t([[-1.0, -2.0], [-0.5, 9.0]]).requires_grad_()
    ent = t([[2.0, 1.0], [0.5, 77.0]]).requires_grad_()  # garbage on padding
    cols = {"logprobs": lp, "old_logprobs": lp.detach(), "advantages": t([[0.0, 0.0], [0.0, 0.0]]),
            "response_mask": t([[1, 1], [1, 0]]), "entropy": ent}
    term = run(name, cols, {"entropy_coef": 0.1, "agg": agg})
    assert term.loss.item() == pytest.approx(loss, abs=1e-12)
    assert torch.allclose(grad(term.loss, ent), t([[g0, g0], [g1, 0.0]]), atol=1e-12)  # minimising raises H
    assert term.metrics["entropy/mean"] == pytest.approx(3.5 / 3, abs=1e-12)  # token mean, as every metric
    assert term.metrics["loss/entropy"] == pytest.approx(loss, abs=1e-12)
    assert term.metrics["loss/pg"] == 0.0


# --- GSPO: one clip decision per sequence ------------------------------------------------


def gspo_batch():
    """Four rows, one per side of the band [1-0.1, 1+0.2] = [0.9, 1.2] and sign of A.

    row 0: lp - old = [0.1, 0.3], A = +1:  s = e^0.2  = 1.2214028 > 1.2, A>0: clipped to -1.2
    row 1: lp - old = [-0.2, -0.1, -0.3], A = -1: s = e^-0.2 = 0.8187308 < 0.9, A<0: clipped to +0.9
    row 2: lp - old = [-0.4, -0.2], A = [1, 3] → A_i = 2 (row mean): s = e^-0.3 = 0.7408182 < 0.9,
           A>0: max(-2·0.7408, -2·0.9) = -1.4816364, not clipped
    row 3: lp - old = [0.3], A = -1: s = e^0.3 = 1.3498588 > 1.2, A<0: max(1.3499, 1.2), not clipped
    """
    x = 1e6  # garbage on padding
    old = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-2.0, -1.0, -1.0], [-0.5, -1.0, -1.0]])
    delta = t([[0.1, 0.3, 5.0], [-0.2, -0.1, -0.3], [-0.4, -0.2, 5.0], [0.3, 5.0, 5.0]])
    lp = (old + delta).requires_grad_()
    cols = {
        "logprobs": lp,
        "old_logprobs": old,
        "advantages": t([[1.0, 1.0, x], [-1.0, -1.0, -1.0], [1.0, 3.0, x], [-1.0, x, x]]),
        "response_mask": t([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]]),
    }
    return lp, cols


def test_gspo_clip_binds_on_both_sides_per_sequence():
    lp, cols = gspo_batch()
    term = run("gspo", cols, {"eps_low": 0.1, "eps_high": 0.2})  # default agg: seq-mean-token-mean
    e = math.exp
    # loss = (-1.2 + 0.9 - 2e^-0.3 + e^0.3)/B', B' = 4: (-0.4317776)/4 = -0.1079444
    assert term.loss.item() == pytest.approx((-1.2 + 0.9 - 2 * e(-0.3) + e(0.3)) / 4, abs=1e-12)
    # gradient per token -A_i s_i/(B'·L_i): clipped rows 0 and 1 none; row 2: -2e^-0.3/(4·2) = -0.1852046;
    # row 3: e^0.3/(4·1) = 0.3374647. Equal on every token of a row (one ratio per sequence).
    g2, g3 = -2 * e(-0.3) / 8, e(0.3) / 4
    assert torch.allclose(grad(term.loss, lp), t([[0, 0, 0], [0, 0, 0], [g2, g2, 0], [g3, 0, 0]]), atol=1e-12)
    m = term.metrics
    assert m["clip_frac"] == pytest.approx(5 / 8, abs=1e-12)  # rows 0 and 1 are clipped: 2 + 3 of 8 tokens
    assert m["ratio/mean"] == pytest.approx((2 * e(0.2) + 3 * e(-0.2) + 2 * e(-0.3) + e(0.3)) / 8, abs=1e-12)
    # ppo_kl = -(0.1+0.3 -0.2-0.1-0.3 -0.4-0.2 +0.3)/8 = 0.5/8
    assert m["ppo_kl"] == pytest.approx(0.0625, abs=1e-12)


def test_gspo_default_band_is_the_papers():
    # ε_low = 3e-4, ε_high = 4e-4: s = e^0.0003 = 1.00030005 is inside [0.9997, 1.0004],
    # s = e^0.0005 = 1.00050013 is clipped for A > 0
    for d, clipped in ((0.0003, 0.0), (0.0005, 1.0)):
        lp = t([[d - 1.0, d - 2.0]]).requires_grad_()
        cols = {"logprobs": lp, "old_logprobs": t([[-1.0, -2.0]]), "advantages": t([[1.0, 1.0]]), "response_mask": t([[1, 1]])}
        term = run("gspo", cols)
        assert term.metrics["clip_frac"] == clipped
        assert term.loss.item() == pytest.approx(-min(math.exp(d), 1.0004), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_gspo_is_the_papers_sequence_objective(seed):
    # written independently: s_i = (π_θ(y_i)/π_old(y_i))^(1/|y_i|) with the gradient through
    # the sequence mean, J = (1/B') Σ_i min(s_i A_i, clip(s_i) A_i); GSPO-token has the same value and gradient
    b = random_batch(seed)
    cols = {k: b[k] for k in ("logprobs", "old_logprobs", "advantages", "response_mask", "entropy")}
    m = cols["response_mask"]
    L = m.sum(-1)
    keep = L > 0
    s = torch.exp(((cols["logprobs"] - cols["old_logprobs"]) * m).sum(-1)[keep] / L[keep])  # [B']
    a = (cols["advantages"] * m).sum(-1)[keep] / L[keep]
    ref = -torch.minimum(s * a, s.clamp(0.95, 1.1) * a).mean()
    term = run("gspo", cols, {"eps_low": 0.05, "eps_high": 0.1})
    assert 0 < term.metrics["clip_frac"] < 1  # both branches occur
    assert term.loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert torch.allclose(grad(term.loss, cols["logprobs"]), grad(ref, cols["logprobs"]), atol=1e-12)


# --- CISPO: the weight is clipped, the gradient never dropped -----------------------------


# (ratio, A, weight r̂, loss -r̂·A·lp with lp = log ρ (lp_old = 0), d loss/d lp = -r̂·A); ε_low = ε_high = 0.2
CISPO_CASES = [
    (1.5, 1.0, 1.2, -1.2 * math.log(1.5), -1.2),  # above the band: weight 1.2, gradient kept (clip: 0)
    (0.5, -1.0, 0.8, 0.8 * math.log(0.5), 0.8),  # below the band: weight 0.8, gradient kept (clip: 0)
    (0.5, 1.0, 0.8, -0.8 * math.log(0.5), -0.8),  # below, A>0: clip would not bind, the weight still does
    (1.1, -2.0, 1.1, 2.2 * math.log(1.1), 2.2),  # inside: weight ρ = 1.1, REINFORCE with importance weight
]


@pytest.mark.parametrize("ratio,adv,w,loss,dlp", CISPO_CASES)
def test_cispo_token(ratio, adv, w, loss, dlp):
    value, g, m = one_token("cispo", ratio, adv, eps_low=0.2, eps_high=0.2)
    assert value == pytest.approx(loss, abs=1e-12)
    assert g == pytest.approx(dlp, abs=1e-12)
    assert m["clip_frac"] == (0.0 if w == ratio else 1.0)
    assert m["ratio/mean"] == pytest.approx(ratio, abs=1e-12)


def test_cispo_defaults_have_no_lower_bound():
    # eps_low=None, eps_high=0.2: ρ = 0.5 keeps weight 0.5 (no lower bound), ρ = 3 gets 1.2
    assert one_token("cispo", 0.5, -1.0)[1] == pytest.approx(0.5, abs=1e-12)  # -r̂·A = 0.5
    assert one_token("cispo", 0.5, -1.0)[2]["clip_frac"] == 0.0
    assert one_token("cispo", 3.0, -1.0)[1] == pytest.approx(1.2, abs=1e-12)
    assert one_token("cispo", 3.0, -1.0)[2]["clip_frac"] == 1.0


def test_cispo_on_policy_is_reinforce():
    # ρ = 1 (lp_old = lp): the weight is 1 and the gradient is -A ∇lp, that of pg
    lp = t([[-1.0, -2.0], [-0.5, 0.0]]).requires_grad_()
    cols = {"logprobs": lp, "old_logprobs": lp.detach(), "advantages": t([[1.0, 1.0], [-2.0, 0.0]]), "response_mask": t([[1, 1], [1, 0]])}
    assert torch.allclose(grad(run("cispo", cols).loss, lp), grad(run("pg", cols).loss, lp), atol=1e-12)


# --- SAPO: a soft gate on both sides ------------------------------------------------------


# f(ρ) = σ(τ(ρ-1))·4/τ, loss -f·A, d loss/d lp = -A·4σ(1-σ)·ρ; (ratio, A, τ_pos, τ_neg, loss, dlp, gate weight)
SAPO_CASES = [
    # on-policy: σ(0) = 0.5, loss -2A/τ, weight 1: the plain policy gradient
    (1.0, 1.0, 1.0, 1.05, -2.0, -1.0, 1.0),
    (1.0, -1.0, 1.0, 1.05, 2 / 1.05, 1.0, 1.0),  # A<0 takes τ_neg: 2/1.05 = 1.9047619
    # τ = 4, ρ = 2, A>0: σ(4) = 0.9820138; weight 4·0.9820138·0.0179862 = 0.0706508; dlp = -0.0706508·2
    (2.0, 1.0, 4.0, 4.0, -0.9820137900379085, -0.14130164970632886, 0.07065082485316443),
    # τ = 4, ρ = 0.5, A<0: σ(-2) = 0.1192029; loss +0.1192029; weight 0.4199743; dlp = +0.4199743·0.5
    (0.5, -1.0, 4.0, 4.0, 0.11920292202211755, 0.209987170807013, 0.419974341614026),
    # the gate is symmetric in A: ρ = 0.5 with A>0 and ρ = 2 with A<0 are attenuated alike
    (0.5, 1.0, 4.0, 4.0, -0.11920292202211755, -0.209987170807013, 0.419974341614026),
    (2.0, -1.0, 4.0, 4.0, 0.9820137900379085, 0.14130164970632886, 0.07065082485316443),
    # near on-policy: σ(0.4) = 0.5986877, weight 0.9610430, dlp = -0.9610430·1.1
    (1.1, 1.0, 4.0, 4.0, -0.5986876601124521, -1.0571472812627283, 0.9610429829661166),
]


@pytest.mark.parametrize("ratio,adv,tau_pos,tau_neg,loss,dlp,weight", SAPO_CASES)
def test_sapo_token(ratio, adv, tau_pos, tau_neg, loss, dlp, weight):
    value, g, m = one_token("sapo", ratio, adv, tau_pos=tau_pos, tau_neg=tau_neg)
    assert value == pytest.approx(loss, abs=1e-12)
    assert g == pytest.approx(dlp, abs=1e-12)
    tau = tau_pos if adv > 0 else tau_neg
    assert g == pytest.approx(-adv * ratio / math.cosh(tau * (ratio - 1) / 2) ** 2, abs=1e-12)  # -Aρ sech²(τ(ρ-1)/2)
    assert m["gate/mean"] == pytest.approx(weight, abs=1e-12)
    assert m["gate_frac"] == (1.0 if weight < 0.5 else 0.0)


def test_sapo_temperature_follows_the_sign_of_the_advantage():
    # ρ = 1.5 with τ_pos = 1, τ_neg = 3: A>0 gate σ(0.5)·4 = 2.4975; A<0 gate σ(1.5)·4/3 = 1.0839
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert one_token("sapo", 1.5, 1.0, tau_pos=1.0, tau_neg=3.0)[0] == pytest.approx(-4 * sig(0.5), abs=1e-12)
    assert one_token("sapo", 1.5, -1.0, tau_pos=1.0, tau_neg=3.0)[0] == pytest.approx(4 / 3 * sig(1.5), abs=1e-12)


# --- pg: vanilla policy gradient -----------------------------------------------------------


def test_pg_by_hand_and_not_clip_off_policy():
    # ℓ = -A·lp: row 0 A = 1, lp = [-1, -2] → [1, 2]; row 1 A = -2, lp = -0.5 → -1; token-mean (1+2-1)/3
    lp = t([[-1.0, -2.0], [-0.5, 9.0]]).requires_grad_()
    cols = {"logprobs": lp, "advantages": t([[1.0, 1.0], [-2.0, 1e6]]), "response_mask": t([[1, 1], [1, 0]]),
            "old_logprobs": t([[-1.0, -2.0], [-0.5, 0.0]])}  # only for ppo_kl: 0 here (lp = old on valid tokens)
    term = run("pg", cols)
    assert term.loss.item() == pytest.approx(2 / 3, abs=1e-12)
    assert torch.allclose(grad(term.loss, lp), t([[-1 / 3, -1 / 3], [2 / 3, 0.0]]), atol=1e-12)  # -A/N
    assert set(term.metrics) == {"loss/pg", "entropy/mean", "ppo_kl"} and term.metrics["ppo_kl"] == 0.0
    # clip with ρ ≠ 1 (second update on a batch) has another gradient: -Aρ/N, or 0 where it clips
    off = {**cols, "old_logprobs": lp.detach() - t([[0.1, 0.5], [0.0, 0.0]])}  # ρ = e^0.1, e^0.5, 1
    assert not torch.allclose(grad(run("clip", off).loss, lp), grad(run("pg", off).loss, lp), atol=1e-6)


# --- the runner: one forward gives the log-probs and the entropy ----------------------------


def test_runner_needs_name_the_entropy():
    from rlflow.nodes.loss import LossRunner

    assert LossRunner(Loss("clip")).needs == "logprobs+entropy"  # a metric: no gradient
    assert LossRunner(Loss("sapo", entropy_coef=0.01)).needs == "logprobs+entropy_grad"  # in the loss
    assert LossRunner(Loss("nll")).needs == "logprobs"
    assert LossRunner(Loss("value", model="critic")).needs == "values"
    assert Loss("gspo").needs == "logprobs"  # the spec's need (model head checks) is unchanged


@pytest.mark.parametrize("needs,grad_expected", [({"logprobs", "logprobs+entropy"}, False), ({"logprobs+entropy_grad", "logprobs"}, True),
                                                  ({"logprobs"}, None)])
def test_runner_outputs_entropy_from_the_same_forward(needs, grad_expected):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from rlflow.forward import response_logprobs_and_entropy
    from rlflow.nodes.loss import LossRunner

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    micro = {"prompt_ids": torch.tensor([[0, 3, 4], [5, 6, 7]]), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "response_ids": torch.tensor([[8, 9], [2, 0]]), "response_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))  # the transformer: one pass, head or not
    worker = SimpleNamespace(engine=model, spec=SimpleNamespace(padding_free=True, zero_stage=0))
    out = LossRunner(Loss("clip", temperature=0.7)).outputs(worker, micro, needs)
    assert len(calls) == 1 and out["logprobs"].requires_grad
    if grad_expected is None:
        assert set(out) == {"logprobs"}
        return
    lp, ent = response_logprobs_and_entropy(model, *micro.values(), temperature=0.7)
    assert set(out) == {"logprobs", "entropy"} and out["entropy"].requires_grad is grad_expected
    assert torch.allclose(out["logprobs"], lp) and torch.allclose(out["entropy"], ent)


# --- the invariant: micro-batch shares sum to the mini-batch loss and gradient ----------


def random_batch(seed: int, B: int = 12, T: int = 7, pairs: bool = False) -> dict:
    """A random mini-batch: ragged lengths, two empty rows (unless pairs), every column."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if not pairs:
        lengths[[2, 7]] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)  # [B, T]
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    if pairs:  # B/2 pairs with scattered ids, rows shuffled so pairs are not adjacent
        ids = torch.randperm(100, generator=g)[: B // 2].repeat_interleave(2)
        chosen = torch.tensor([1.0, 0.0], dtype=F64).repeat(B // 2)
        perm = torch.randperm(B, generator=g)
        group, chosen = ids[perm], chosen[perm]
    else:
        group = torch.arange(B) // 4
        chosen = torch.zeros(B, dtype=F64)
    return {
        "logprobs": (lp * mask).requires_grad_(),
        "entropy": (2 * torch.rand(B, T, generator=g, dtype=F64) * mask).requires_grad_(),
        "old_logprobs": lp + 0.4 * torch.randn(B, T, generator=g, dtype=F64),  # ratios well outside [0.8, 1.2]
        "ref_logprobs": lp + 0.5 * torch.randn(B, T, generator=g, dtype=F64),
        "advantages": torch.randn(B, T, generator=g, dtype=F64) * mask,
        "values": torch.randn(B, T, generator=g, dtype=F64),
        "new_values": torch.randn(B, T, generator=g, dtype=F64).requires_grad_(),
        "returns": torch.randn(B, T, generator=g, dtype=F64),
        "rewards": torch.tensor([1.0, -1.0, 0.0, 1.0] * (B // 4), dtype=F64)[torch.randperm(B, generator=g)],
        "scores": torch.randn(B, generator=g, dtype=F64).requires_grad_(),
        "response_mask": mask,
        "group": group,
        "chosen": chosen,
    }


def micro_batches(batch: dict, size: int, seed: int, pairs: bool) -> list[torch.Tensor]:
    """Row indices of micro-batches of `size` rows (of `size` pairs for pair losses), shuffled."""
    g = torch.Generator().manual_seed(seed)
    if not pairs:
        perm = torch.randperm(batch["response_mask"].shape[0], generator=g)
        return list(perm.split(size))
    ids = torch.unique(batch["group"])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    out = []
    for chunk in ids.split(size):
        rows = torch.nonzero(torch.isin(batch["group"], chunk)).squeeze(-1)
        out.append(rows[torch.randperm(rows.numel(), generator=g)])
    return out


INVARIANT = (
    [("clip", {"agg": m}) for m in AGG_MODES]
    + [("clip_higher", {"agg": m, "dual_clip": 3.0, "kl_coef": 0.1, "kl": "k3"}) for m in AGG_MODES]
    + [("clip", {"agg": "seq-mean-token-mean", "kl_coef": 0.05, "kl": "k2"})]
    + [("value", {"agg": m}) for m in AGG_MODES]
    + [("nll", {"agg": m}) for m in AGG_MODES]
    + [("nll", {"agg": m, "where": "correct"}) for m in AGG_MODES]
    + [("dpo", {}), ("dpo", {"label_smoothing": 0.2, "beta": 0.5}), ("dpo", {"ipo": True})]
    + [("bradley_terry", {})]
    + [("clip", {"agg": "seq-mean-token-sum-norm", "entropy_coef": 0.01})]
    + [("gspo", {"agg": m}) for m in AGG_MODES]
    + [("gspo", {"agg": m, "eps_low": 0.2, "eps_high": 0.3, "kl_coef": 0.1, "entropy_coef": 0.01}) for m in AGG_MODES]
    + [("cispo", {"agg": m}) for m in AGG_MODES]
    + [("cispo", {"agg": m, "eps_low": 0.2, "kl_coef": 0.1, "kl": "abs", "entropy_coef": 0.01}) for m in AGG_MODES]
    + [("sapo", {"agg": m}) for m in AGG_MODES]
    + [("sapo", {"agg": m, "tau_pos": 2.0, "tau_neg": 4.0, "kl_coef": 0.1, "entropy_coef": 0.01}) for m in AGG_MODES]
    + [("pg", {"agg": m}) for m in AGG_MODES]
    + [("pg", {"agg": m, "kl_coef": 0.1, "kl": "k2", "entropy_coef": 0.01}) for m in AGG_MODES]
)


def _id(x) -> str:
    return x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items())


@pytest.mark.parametrize("name,params", INVARIANT, ids=_id)
def test_micro_batch_shares_sum_to_mini_batch(name, params):
    variant = LOSSES[name]
    pairs = name in ("dpo", "bradley_terry")
    batch = random_batch(3, pairs=pairs)
    leaves = [batch[c] for c in sorted(outputs_of(variant))]  # every model output, the entropy included

    def grads(loss):
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))]

    counts = count(variant.mask(batch, params), group=batch["group"], constant=10.0)  # once, whole mini-batch
    whole = variant.fn(batch, counts, **params).loss
    g_whole = grads(whole)
    assert whole.abs().item() > 1e-4 and g_whole[-1 if variant.entropy else 0].abs().max().item() > 1e-4  # not vacuous
    if params.get("entropy_coef", 0.0) > 0:
        assert g_whole[0].abs().max().item() > 1e-6  # the entropy bonus has a gradient too
    for size in (1, 2, 5, 12):
        parts = micro_batches(batch, size, seed=size, pairs=pairs)
        total = sum(variant.fn({k: v[rows] for k, v in batch.items()}, counts, **params).loss for rows in parts)
        assert torch.allclose(total, whole, rtol=0, atol=1e-10), (size, total.item(), whole.item())
        for g, g0 in zip(grads(total), g_whole):
            assert torch.allclose(g, g0, rtol=0, atol=1e-10), size


@pytest.mark.parametrize("mode", AGG_MODES)
def test_local_denominators_would_break_the_invariant(mode):
    # the check above has teeth: normalising each micro-batch by its own counts and
    # averaging (TRL grpo/bnpo, verl legacy) does not reproduce the mini-batch loss
    batch = random_batch(4)
    whole = run("nll", batch, {"agg": mode}, constant=10.0).loss
    parts = micro_batches(batch, 5, seed=0, pairs=False)
    local = sum(run("nll", {k: v[r] for k, v in batch.items()}, {"agg": mode}, constant=10.0).loss for r in parts) / len(parts)
    assert not torch.allclose(local, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,key", [("clip", "loss/pg"), ("value", "loss/value"), ("nll", "loss/nll")])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_metrics_use_micro_batch_values(name, key, mode):
    # a micro-batch reports its own loss (its own denominators), not its share of the mini-batch
    batch = random_batch(5)
    variant = LOSSES[name]
    counts = count(batch["response_mask"], constant=10.0)
    sub = {k: v[:6] for k, v in batch.items()}
    own = variant.fn(sub, count(sub["response_mask"], constant=10.0), agg=mode).loss.item()
    term = variant.fn(sub, counts, agg=mode)
    assert term.metrics[key] == pytest.approx(own, abs=1e-12)
    assert term.loss.item() != pytest.approx(own, abs=1e-6)  # the share differs (12 rows vs 6)


def test_counts_type_is_the_shared_one():
    # the engine builds Counts with masked.count; variants accept any Counts, e.g. a hand-made one
    lp = t([[-2.0, -4.0]]).requires_grad_()
    term = LOSSES["nll"].fn({"logprobs": lp, "response_mask": t([[1, 1]])}, Counts(tokens=4.0, seqs=2.0, rows=2.0))
    assert term.loss.item() == pytest.approx(1.5, abs=1e-12)  # 6/4: the share of a 4-token mini-batch
