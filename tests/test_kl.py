"""The KL coefficient β: fixed or adaptive (Ziegler et al. 2019), in the reward and in the loss,
checked against its update rule by hand; kept by the runner and through checkpoints; and
kl/mean is the estimate that is penalised (ALGORITHMS.md §0.3)."""

import json

import pytest
import torch
from test_engine import INIT, length, run_of

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.nodes.masked import KlController, sequence_mean_kl


# --- the update rule, by hand -------------------------------------------------------------------
#   e = clip(KL/target - 1, -0.2, 0.2);  β ← β·(1 + e·n/horizon)


@pytest.mark.parametrize("observed, beta", [
    (9.0, 0.1 * (1 + 0.2 * 256 / 10000)),  # 9/6 - 1 = 0.5, clipped to 0.2: β·1.00512
    (6.6, 0.1 * (1 + 0.1 * 256 / 10000)),  # 6.6/6 - 1 = 0.1 (inside the clip): β·1.00256
    (6.0, 0.1),  # on target: unchanged
    (3.0, 0.1 * (1 - 0.2 * 256 / 10000)),  # 3/6 - 1 = -0.5, clipped to -0.2: β·0.99488
    (0.0, 0.1 * (1 - 0.2 * 256 / 10000)),
])
def test_adaptive_update_rule(observed, beta):
    c = KlController(0.1, target=6.0, horizon=10000)
    c.update(observed, 256)
    assert c.beta == pytest.approx(beta, rel=1e-12)


def test_fixed_beta_never_moves_and_state_round_trips():
    c = KlController(0.05)
    c.update(100.0, 1e6)
    assert c.beta == 0.05 and not c.adaptive
    a = KlController(0.1, target=1.0, horizon=10)
    a.update(2.0, 5)  # e = 0.2: 0.1·(1 + 0.2·5/10) = 0.11
    assert a.beta == pytest.approx(0.11)
    b = KlController(0.1, target=1.0, horizon=10)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.beta == a.beta


def test_observed_kl_is_the_mean_over_sequences_of_token_means():
    kl = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    total, seqs = sequence_mean_kl(kl, mask)
    assert (total, seqs) == (1.5 + 3.0, 2.0)  # the empty row counts in neither


# --- through the engine: β as logged, step by step ----------------------------------------------


def pipeline(adv_kl=0.0, loss_kl=0.0, **kw):
    actor = Model(INIT, train=True, lr=1e-3, grad_clip=None)
    return Pipeline(
        name="t", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "ref": actor.frozen()},
        nodes=[Generate("actor", n=4, max_new_tokens=4), Score(rule=length), RefLogprob("ref"),
               Advantage("group_norm", kl_coef=adv_kl, kl="k2", **kw.pop("adv", {})),
               Loss("clip", kl_coef=loss_kl, kl="k3", **kw.pop("loss", {}))],
        **{"steps": 3, "eval": None, "mini_batches": 2, **kw})


def records(run):
    return [json.loads(x) for x in (run.out_dir / "metrics.jsonl").read_text().splitlines()]


def expected_next(beta, kl, target, n, horizon):
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon)


def test_adaptive_kl_in_the_reward_follows_the_rule(tmp_path):
    # 16 sequences per step, horizon 40: each step moves β by up to 8 %
    run = run_of(pipeline(adv_kl=0.1, adv={"kl_target": 0.02, "kl_horizon": 40}), tmp_path)
    run.train(3)
    recs = records(run)
    assert recs[0]["kl/beta"] == 0.1
    for prev, cur in zip(recs, recs[1:]):
        assert cur["kl/beta"] == pytest.approx(expected_next(prev["kl/beta"], prev["kl/mean"], 0.02, 16, 40), rel=1e-9)
    assert recs[1]["kl/beta"] != 0.1  # it moved
    assert run.runners["advantage"].kl.beta == pytest.approx(expected_next(recs[2]["kl/beta"], recs[2]["kl/mean"], 0.02, 16, 40))


def test_adaptive_kl_in_the_loss_follows_the_rule(tmp_path):
    # one mini-batch of one micro-batch: the observed KL is the step's logged kl/mean, n = 16 sequences
    run = run_of(pipeline(loss_kl=0.05, loss={"kl_target": 0.01, "kl_horizon": 40}, mini_batches=1), tmp_path)
    run.train(3)
    recs = records(run)
    assert recs[0]["kl/beta"] == 0.05 and "kl/mean" in recs[0] and "kl/k2" not in recs[0]
    for prev, cur in zip(recs, recs[1:]):
        assert cur["kl/beta"] == pytest.approx(expected_next(prev["kl/beta"], prev["kl/mean"], 0.01, 16, 40), rel=1e-9)


def test_kl_mean_is_the_penalised_estimate_and_others_are_named(tmp_path):
    # KL in the reward (k2 from the old log-probs): the advantage's kl/mean; the loss penalises
    # nothing, so its statistic of the current policy is logged as kl/k3, not as kl/mean
    run = run_of(pipeline(adv_kl=0.1), tmp_path)
    run.train(2)
    rec = records(run)[1]  # at step 1 the policy is still the reference: KL 0
    assert rec["kl/beta"] == 0.1 and rec["kl/mean"] > 0 and "kl/k3" in rec and "loss/kl" not in rec


def test_an_adaptive_beta_survives_a_checkpoint(tmp_path):
    p = pipeline(adv_kl=0.1, adv={"kl_target": 0.02, "kl_horizon": 40}, save_every=1)
    full = run_of(p, tmp_path, "full")
    full.train(3)
    part = run_of(p, tmp_path, "part")
    part.train(2)
    state = json.loads((tmp_path / "part" / "checkpoints" / "step_2" / "state.rank0.json").read_text())
    assert state["nodes"] == {"advantage": {"beta": part.runners["advantage"].kl.beta}}
    again = run_of(p, tmp_path, "part")
    assert again.resume() == 2
    assert again.runners["advantage"].kl.beta == part.runners["advantage"].kl.beta != 0.1
    again.train(3)
    assert records(again)[-1]["kl/beta"] == records(full)[-1]["kl/beta"]
