"""Overlap and rollout correction: the importance weights by hand, their validation, nodes of
one stage run at once with the same result, and the one-step-ahead rollout (rlflow.overlap).
Uses builtin:tiny-arith-init. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path
import threading
from typing import Callable

import pytest
import torch

from rlflow.nodes.loss import _floats, rollout_correction
from rlflow.nodes.masked import count
from rlflow import Advantage, Filter, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score, Value
from rlflow import perf
from rlflow.engine import Run
from rlflow.graph import build
from rlflow.spec import LOSSES

INIT = "builtin:tiny-arith-init"
PIPELINES = Path(__file__).parent.parent / "pipelines"


def length(response, row):
    return float(len(response))


def t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.fixture(autouse=True)
def fixed_peak(monkeypatch):
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 1e11)


# --- the weights by hand ----------------------------------------------------------------------


def test_token_truncation_by_hand():
    # log r = old - rollout: [ln 3, ln 0.5 | ln 1.5, (pad)] -> r = [3, 0.5 | 1.5, -]; min(r, 2) = [2, 0.5 | 1.5, 0]
    old = t([[math.log(3.0), math.log(0.5)], [math.log(1.5), 7.0]])
    rollout = torch.zeros(2, 2, dtype=torch.float64)
    mask = t([[1, 1], [1, 0]])
    w, m = rollout_correction(old, rollout, mask, level="token", mode="truncate", low=0.5, high=2.0)
    m = _floats(m)  # the metrics are sums still on the device (rlflow.dist.Lazy)
    torch.testing.assert_close(w, t([[2.0, 0.5], [1.5, 0.0]]))
    assert float(m["rollout_is/mean"]) == pytest.approx(4.0 / 3)
    assert float(m["rollout_is/clipped_frac"]) == pytest.approx(1 / 3)  # the 3 was cut to 2
    # KL(π_rollout || π_old) by k1: mean of rollout - old over the 3 tokens
    assert float(m["rollout_is/kl"]) == pytest.approx(-(math.log(3) + math.log(0.5) + math.log(1.5)) / 3)


def test_sequence_level_and_icepop_mask_by_hand():
    # row 0: r_seq = 3 · 0.5 = 1.5 on both tokens; row 1: r_seq = 4 (one token)
    old = t([[math.log(3.0), math.log(0.5)], [math.log(4.0), 0.0]])
    rollout = torch.zeros(2, 2, dtype=torch.float64)
    mask = t([[1, 1], [1, 0]])
    w, _ = rollout_correction(old, rollout, mask, level="seq", mode="truncate", low=0.5, high=2.0)
    torch.testing.assert_close(w, t([[1.5, 1.5], [2.0, 0.0]]))
    # IcePop: r kept inside [0.5, 2], 0 outside: token level 3 -> 0, 0.5 kept, 4 -> 0
    w, m = rollout_correction(old, rollout, mask, level="token", mode="mask", low=0.5, high=2.0)
    m = _floats(m)
    torch.testing.assert_close(w, t([[0.0, 0.5], [0.0, 0.0]]))
    assert float(m["rollout_is/masked_frac"]) == pytest.approx(2 / 3)


def test_the_weight_multiplies_the_policy_term_and_is_one_on_policy():
    from rlflow.nodes.loss import LossRunner

    g = torch.Generator().manual_seed(0)
    mask = t([[1, 1, 1], [1, 1, 0]])
    lp = (-torch.rand(2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    cols = {"logprobs": lp, "entropy": torch.zeros(2, 3, dtype=torch.float64), "response_mask": mask,
            "old_logprobs": lp.detach() - 0.1, "advantages": t([[1.0] * 3, [-1.0] * 3]), "group": torch.tensor([0, 0])}
    counts = count(mask, cols["group"], constant=1.0)
    plain = LossRunner(Loss("clip")).term(cols, counts)
    same = LossRunner(Loss("clip", rollout_is="token")).term({**cols, "rollout_logprobs": cols["old_logprobs"]}, counts)
    assert float(same.loss.detach()) == pytest.approx(float(plain.loss.detach()), abs=1e-12) and same.metrics["rollout_is/mean"] == 1.0
    # sampler log-probs 0.2 lower everywhere: w = e^0.2 per token, the pg term scaled by it (no KL here)
    off = LossRunner(Loss("clip", rollout_is="token")).term({**cols, "rollout_logprobs": cols["old_logprobs"] - 0.2}, counts)
    assert float(off.loss.detach()) == pytest.approx(math.exp(0.2) * float(plain.loss.detach()), rel=1e-9)
    assert off.metrics["rollout_is/kl"] == pytest.approx(-0.2)


def test_every_policy_loss_takes_the_correction():
    policy = [v.name for v in LOSSES.variants() if v.facts.get("entropy")]
    assert {"clip", "clip_higher", "gspo", "cispo", "sapo", "pg"} <= set(policy)
    for name in policy:
        assert "rollout_logprobs" in Loss(name, rollout_is="seq").reads()


# --- validation ---------------------------------------------------------------------------------


def grpo(*, gen=None, loss=None, nodes_after=(), **kw) -> Pipeline:
    actor = Model(INIT, train=True, lr=1e-3, grad_clip=None)
    return Pipeline(name="t", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "ref": actor.frozen()},
                    nodes=[gen or Generate("actor", n=4, max_new_tokens=6, recompute_logprobs=True), Score(rule=length),
                           RefLogprob("ref"), Advantage("group_norm"), loss or Loss("clip", kl_coef=0.04), *nodes_after],
                    **{"steps": 1, "eval": None, **kw})


def codes(p: Pipeline) -> list[tuple[str, str, str]]:
    return [(x.code, x.node, x.field) for x in build(p).errors]


def test_validation_of_rollout_settings():
    assert codes(grpo(loss=Loss("clip", rollout_is="token"), rollout_ahead=1)) == []
    # the sampler's log-probs exist only when Generate recomputes the old ones
    assert codes(grpo(gen=Generate("actor", n=4), loss=Loss("clip", rollout_is="token"))) == [
        ("RF003", "loss", "rollout_logprobs")]
    assert codes(grpo(gen=Generate("actor", n=4), rollout_ahead=1)) == [("RF015", "generate", "recompute_logprobs")]
    p = grpo(loss=Loss("clip"), nodes_after=[Loss("nll", rollout_is="token", name="nll")])
    assert ("RF015", "nll", "rollout_is") in codes(p)
    assert ("RF015", "filter", "variant") in codes(grpo(nodes_after=[Filter("dynamic")], rollout_ahead=1))


# --- nodes of one stage at once ----------------------------------------------------------------


def ppo(concurrent: bool) -> Pipeline:
    actor = Model(INIT, train=True, lr=1e-3, grad_clip=None)
    return Pipeline(name="t", data=Prompts("builtin:arith", batch_size=4),
                    models={"actor": actor, "ref": actor.frozen(), "critic": actor.critic(lr=1e-3)},
                    nodes=[Generate("actor", n=2, max_new_tokens=6), Score(rule=length), RefLogprob("ref"), Value("critic"),
                           Advantage("gae", kl_coef=0.05), Loss("clip"), Loss("value", model="critic", name="critic_loss")],
                    steps=2, eval=None, concurrent_nodes=concurrent)


def test_a_stage_runs_at_once_with_the_same_result(tmp_path, monkeypatch):
    from rlflow.nodes.ref_logprob import RefLogprobRunner
    from rlflow.nodes.score import ScoreRunner
    from rlflow.nodes.value import ValueRunner

    seen: dict[str, set[str]] = {}
    for cls in (ScoreRunner, RefLogprobRunner, ValueRunner):
        def wrapped(self, batch, ctx, _run=cls.run):
            seen.setdefault(self.spec.name, set()).add(threading.current_thread().name)
            return _run(self, batch, ctx)
        monkeypatch.setattr(cls, "run", wrapped)
    records, batches = {}, {}
    for concurrent in (False, True):
        seen.clear()
        run = Run(ppo(concurrent), build(ppo(concurrent)), tmp_path / str(concurrent))
        run.setup()
        assert build(run.pipeline).stages()[1] == ["ref_logprob", "score", "value"]
        records[concurrent], batches[concurrent] = run._step(1)
        run.close()
        threads = {name: next(iter(names)) for name, names in seen.items()}
        assert threads["score"] == threading.main_thread().name  # the rules' SIGALRM needs the main thread
        if concurrent:
            assert threads["ref_logprob"].startswith("rlflow-node") and threads["value"].startswith("rlflow-node")
        else:
            assert set(threads.values()) == {threading.main_thread().name}
    a, b = batches[False], batches[True]
    assert set(a.keys()) == set(b.keys())
    for k in ("rewards", "ref_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    for k in ("loss/pg", "loss/value", "reward/mean", "values/mean"):
        assert records[True][k] == records[False][k], k
    assert set(records[True]["nodes"]) == set(records[False]["nodes"])


# --- one step ahead -----------------------------------------------------------------------------


def test_rollout_ahead_samples_from_the_weights_before_the_last_update(tmp_path):
    p = grpo(loss=Loss("clip", kl_coef=0.04, rollout_is="token"), rollout_ahead=1, steps=3)
    run = Run(p, build(p), tmp_path / "ahead")
    run.setup()
    before: list[torch.Tensor] = []
    launch = run.ahead.launch

    def spy(prompts, ctx):  # the weights each rollout samples from
        before.append(torch.cat([q.detach().flatten().clone() for q in run.workers["actor"].module.parameters()]))
        return launch(prompts, ctx)

    run.ahead.launch = spy
    recs = [run._step(i)[0] for i in (1, 2, 3)]
    trained = torch.cat([q.detach().flatten() for q in run.workers["actor"].module.parameters()])
    run.close()
    # launches: batch 1 and batch 2 at step 1 (weights θ0), batch 3 at step 2 (θ1), batch 4 at step 3 (θ2)
    assert len(before) == 4 and torch.equal(before[0], before[1]) and not torch.equal(before[1], before[2])
    assert not torch.equal(before[3], trained)  # the last launch saw θ2, before the third update
    assert [r["rollout/staleness"] for r in recs] == [0.0, 1.0, 1.0]
    # step 1 samples from the weights it trains: sampler and trainer log-probs agree; later they do not
    assert recs[0]["generate/rollout_logprob_diff"] < 1e-5 and recs[1]["generate/rollout_logprob_diff"] > 1e-3
    for r in recs:  # old log-probs are the trainer's: the first ratio of every update is 1
        assert r["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
        assert "rollout_is/mean" in r and r["update/nonfinite_skipped/actor"] == 0.0


def test_rollout_ahead_in_bf16_samples_with_one_attention_kernel(tmp_path, monkeypatch):
    # the update's math-kernel switch is process-wide: held for the whole run, the sampler
    # (decoding while the update runs) never sees it flip
    import rlflow.forward

    flash: list[bool] = []
    sample = rlflow.forward.sample

    def spy(*a, **kw):
        flash.append(torch.backends.cuda.flash_sdp_enabled())
        return sample(*a, **kw)

    monkeypatch.setattr(rlflow.forward, "sample", spy)
    p = grpo(loss=Loss("clip", kl_coef=0.04, rollout_is="token"), rollout_ahead=1, steps=3)
    actor = p.models["actor"].model_copy(update={"precision": "bf16"})
    p = p.model_copy(update={"models": {"actor": actor, "ref": actor.frozen()}})
    run = Run(p, build(p), tmp_path / "ahead")
    run.setup()
    for i in (1, 2, 3):
        run._step(i)
    run.close()
    assert len(flash) == 4 and not any(flash)
    assert torch.backends.cuda.flash_sdp_enabled()  # given back when the run closes


def test_rollout_ahead_is_refused_with_several_processes(tmp_path, monkeypatch):
    from rlflow import dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    p = grpo(rollout_ahead=1)
    run = Run(p, build(p), tmp_path / "r")
    with pytest.raises(ValueError, match="single process"):
        run._rollout_ahead()


def test_the_graph_view_shows_what_runs_at_once():
    from rlflow.view import render_graph
    from rich.console import Console

    def text(p):
        console = Console(width=200, record=True, color_system=None)
        console.print(render_graph(build(p)))
        return console.export_text()

    assert "stage 2  (ref_logprob ‖ score ‖ value run at once)" in text(ppo(True))
    assert "run at once" not in text(ppo(False))
    ahead = text(grpo(loss=Loss("clip", rollout_is="token"), rollout_ahead=1))
    assert "‖ generate of the next batch (rollout_ahead=1)" in ahead and "rollout_is=token" in ahead
    assert "stage 2  (ref_logprob ‖ score run at once)  ‖ actor's first update forward starts (on a CPU)" in text(grpo())
    assert "first update forward" not in text(grpo(concurrent_nodes=False)) + ahead


# --- the update's first forward, started during the experience ---------------------------------


def test_the_update_forward_starts_early_with_the_same_result(tmp_path, monkeypatch):
    from rlflow.nodes.loss import LossRunner

    where: list[str] = []
    outputs = LossRunner.outputs

    def spy(self, *a, **kw):
        where.append(threading.current_thread().name)
        return outputs(self, *a, **kw)

    monkeypatch.setattr(LossRunner, "outputs", spy)
    runs = {}
    for early in (True, False):  # concurrent_nodes=False: every node and forward in the main thread
        where.clear()
        p = grpo(steps=2, concurrent_nodes=early)
        assert build(p).early_forward() == (1 if early else None)  # from the stage of ref_logprob and score
        run = Run(p, build(p), tmp_path / str(early))
        run.setup()
        records = [run._step(i + 1)[0] for i in range(2)]
        runs[early] = records, [w.detach().clone() for w in run.workers["actor"].module.parameters()]
        run.close()
        assert len(where) == 2 and all(n.startswith("rlflow-forward" if early else "MainThread") for n in where), where
    (on, w_on), (off, w_off) = runs[True], runs[False]
    assert all(r["timing_s/early_forward"] > 0 for r in on) and not any("timing_s/early_forward" in r for r in off)
    for a, b in zip(on, off):  # the same operators on the same tensors: the same numbers, to the bit
        for k in ("loss/pg", "loss/kl", "kl/mean", "entropy/mean", "grad_norm/actor", "padding_frac/loss"):
            assert a[k] == b[k], k
    assert all(torch.equal(x, y) for x, y in zip(w_on, w_off))


def test_where_the_early_forward_starts():
    from rlflow.loader import load_pipeline

    def stage(name, **kw):
        p = load_pipeline(PIPELINES / f"{name}.py")
        return build(p.model_copy(update=kw) if kw else p).early_forward()

    assert stage("grpo") == 1  # beside ref_logprob and score, after generate
    assert stage("dpo") == 0  # offline pairs: beside the reference's forward, the first stage
    assert stage("online_dpo") == 3  # after the filter that picks the pairs
    assert stage("grpo_lora") == 2  # not beside ref_logprob: the reference is the actor's own base module
    assert stage("grpo", rollout_ahead=1) is None
    for name in ("dapo", "ppo", "reinforce_pp", "vapo"):  # several mini-batches (or epochs): the first is shuffled
        assert stage(name) is None, name
    assert stage("dapo", mini_batches=1) is None  # its filter refills: rounds of the stages before it
    assert stage("online_rft") is None  # a filter in the last stage changes the rows
    assert stage("rft") is None and stage("sft") is None  # nothing after the filter / no experience


def test_a_failure_beside_the_early_forward_stops_cleanly(tmp_path):
    calls = []

    def fails_at_step_2(response, row):
        calls.append(1)
        if len(calls) > 16:  # step 1 scores 16 samples
            raise RuntimeError("rule broke")
        return float(len(response))

    actor = Model(INIT, train=True, lr=1e-3, precision="bf16")
    p = Pipeline(name="t", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "ref": actor.frozen()},
                 nodes=[Generate("actor", n=4, max_new_tokens=6), Score(rule=fails_at_step_2), RefLogprob("ref"),
                        Advantage("group_norm"), Loss("clip", kl_coef=0.04)], steps=2, eval=None)
    run = Run(p, build(p), tmp_path / "r")
    run.setup()
    run._step(1)
    with pytest.raises(Exception, match="rule broke"):
        run._step(2)
    assert run._early is None and not any(t.name.startswith("rlflow-forward") for t in threading.enumerate())
    # the math-kernel switch the early forward held is given back
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert (tmp_path / "r" / "checkpoints" / "step_1").is_dir()  # the rescue of the finished step
    run.close()


def test_early_outputs_are_used_only_for_the_same_rows():
    from contextlib import nullcontext

    from rlflow.batch import Batch
    from rlflow.overlap import EarlyForward

    class Worker:
        def training_kernel(self):
            return nullcontext()

        def autocast(self, training=True):
            return nullcontext()

    class Runner:
        def outputs(self, worker, micro, needs, positions):
            positions.add(8, 6)
            return {"logprobs": micro["response_ids"].float()}

    def micro(last):
        ids = torch.tensor([[1, 2], [3, last]])
        return Batch({"prompt_ids": ids, "prompt_mask": torch.ones(2, 2), "response_ids": ids, "response_mask": torch.ones(2, 2)})

    w = Worker()
    out, positions, seconds = EarlyForward(w, Runner(), micro(4), {"logprobs"}).take(w, micro(4))
    assert out["logprobs"].tolist() == [[1.0, 2.0], [3.0, 4.0]] and (positions.computed, positions.useful) == (8, 6)
    assert EarlyForward(w, Runner(), micro(4), {"logprobs"}).take(w, micro(5)) is None  # other rows: the update's own
    assert EarlyForward(w, Runner(), micro(4), {"logprobs"}).take(Worker(), micro(4)) is None  # another model


def before_forward_and_reference(monkeypatch, on_forward: Callable[[], None], on_reference: Callable[[], None]) -> None:
    """Call ``on_forward`` before each update forward (the loss's outputs) and ``on_reference``
    before each RefLogprob run."""
    from rlflow.nodes.loss import LossRunner
    from rlflow.nodes.ref_logprob import RefLogprobRunner

    outputs, ref_run = LossRunner.outputs, RefLogprobRunner.run

    def forward(self, *a, **kw):
        on_forward()
        return outputs(self, *a, **kw)

    def ref(self, *a, **kw):
        on_reference()
        return ref_run(self, *a, **kw)

    monkeypatch.setattr(LossRunner, "outputs", forward)
    monkeypatch.setattr(RefLogprobRunner, "run", ref)


def test_the_threads_are_shared_out_while_the_early_forward_runs(tmp_path, monkeypatch):
    counts: dict[str, int] = {}
    before_forward_and_reference(monkeypatch, lambda: counts.update(forward=torch.get_num_threads()),
                                 lambda: counts.update(ref_logprob=torch.get_num_threads()))
    p = grpo()
    run = Run(p, build(p), tmp_path / "r")
    run.setup()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        run._step(1)
        assert counts == {"forward": 2, "ref_logprob": 2}  # half each, not 4 + 4 on 4 cores
        assert torch.get_num_threads() == 4  # the engine's count given back
    finally:
        torch.set_num_threads(before)
        run.close()


@pytest.mark.parametrize("name,micro", [("dpo", None), ("online_dpo", None), ("grpo", 8)])
def test_shipped_pipelines_learn_the_same_with_the_early_forward(tmp_path, name, micro):
    # dpo: beside the reference, in the first stage; online_dpo: after its filter; grpo with
    # micro-batches of 8 rows: the early forward is the first micro-batch's, the rest run in the update
    from rlflow.loader import load_pipeline

    weights = {}
    for early in (True, False):
        p = load_pipeline(PIPELINES / f"{name}.py").model_copy(update={"concurrent_nodes": early, "eval": None, "steps": 2})
        if micro:
            p = p.model_copy(update={"models": {**p.models, "actor": p.models["actor"].model_copy(update={"micro_batch_size": micro})}})
        run = Run(p, build(p), tmp_path / str(early))
        run.setup()
        records = [run._step(i + 1)[0] for i in range(2)]
        assert all(("timing_s/early_forward" in r) == early for r in records)
        weights[early] = [w.detach().clone() for w in run.workers["actor"].module.parameters()]
        run.close()
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))


def test_the_loss_node_time_counts_its_early_forward(tmp_path, monkeypatch):
    # MFU divides the model's FLOPs by its nodes' seconds: a forward that ran early still counts
    import time

    # the reference slower than the forward: the early forward is done before the update starts
    before_forward_and_reference(monkeypatch, lambda: time.sleep(0.3), lambda: time.sleep(0.6))
    p = grpo()
    run = Run(p, build(p), tmp_path / "r")
    run.setup()
    record, _ = run._step(1)
    run.close()
    assert record["timing_s/early_forward"] >= 0.3
    assert record["nodes"]["loss"]["seconds"] >= record["timing_s/early_forward"]
    assert record["timing_s/loss"] == pytest.approx(record["nodes"]["loss"]["seconds"], abs=1e-5)
