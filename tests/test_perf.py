"""Speed features through the real engine: the padding-free update equals the padded one,
bf16 runs as autocast over fp32 weights, and every step records timing, throughput,
padding and MFU figures. Uses builtin:tiny-arith-init (no SFT needed). No timing is
asserted: the machine is shared."""

from __future__ import annotations

import json

import pytest
import torch

from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score, Value
from rlflow import perf
from rlflow.engine import Run
from rlflow.graph import build

INIT = "builtin:tiny-arith-init"


def length(response, row):
    return float(len(response))


def pipeline(critic: bool = False, **model_kw) -> Pipeline:
    actor = Model(INIT, train=True, lr=1e-3, grad_clip=None, **model_kw)
    models = {"actor": actor, "ref": actor.frozen()}
    nodes = [Generate("actor", n=4, max_new_tokens=6), Score(rule=length), RefLogprob("ref"),
             Advantage("gae" if critic else "group_norm"), Loss("clip", kl_coef=0.04, agg="seq-mean-token-mean")]
    if critic:
        models["critic"] = actor.critic(lr=1e-3, **model_kw)
        nodes[3:3] = [Value("critic")]
        nodes.append(Loss("value", model="critic", name="critic_loss"))
    return Pipeline(name="t", data=Prompts("builtin:arith", batch_size=4), models=models, nodes=nodes, steps=1, eval=None)


def one_step(p: Pipeline, tmp_path, name: str):
    run = Run(p, build(p), tmp_path / name)
    run.setup()
    grads = {}
    for model, worker in run.workers.items():
        if worker.trainable:
            step = worker.step

            def capture(step=step, worker=worker, model=model, **kw):
                grads[model] = torch.cat([q.grad.flatten().clone() for q in worker.module.parameters()])
                return step(**kw)

            worker.step = capture
    run.train(1)
    record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    return run, record, grads


@pytest.fixture(autouse=True)
def fixed_peak(monkeypatch):
    """No probe in these runs: a fixed peak (the probe has its own test)."""
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 1e11)


@pytest.mark.parametrize("critic", [False, True], ids=["grpo", "ppo"])
def test_padding_free_update_equals_the_padded_update(critic, tmp_path):
    # same seed -> same samples; every loss, metric and gradient of the step agrees to float tolerance
    _, padded, g_padded = one_step(pipeline(critic, padding_free=False), tmp_path, "padded")
    _, packed, g_packed = one_step(pipeline(critic), tmp_path, "packed")
    assert set(g_packed) == set(g_padded) and g_padded["actor"].abs().max() > 0
    for model in g_padded:
        torch.testing.assert_close(g_packed[model], g_padded[model], atol=1e-5, rtol=1e-4)
    keys = [k for k in padded if k.startswith(("loss/", "kl/", "entropy/", "values/", "clip_frac", "ratio/"))]
    assert "loss/pg" in keys and (not critic or "loss/value" in keys)
    for k in keys:
        assert packed[k] == pytest.approx(padded[k], abs=1e-5), k
    # the packed step computed fewer positions for the same useful ones
    for node in ("ref_logprob", "loss"):
        assert packed["nodes"][node]["useful_positions"] == padded["nodes"][node]["useful_positions"]
        assert packed["nodes"][node]["positions"] <= padded["nodes"][node]["positions"]


def test_every_step_records_timing_throughput_padding_and_mfu(tmp_path):
    _, rec, _ = one_step(pipeline(critic=True), tmp_path, "run")
    for node in ("generate", "score", "ref_logprob", "value", "loss", "critic_loss"):
        assert rec[f"timing_s/{node}"] == pytest.approx(rec["nodes"][node]["seconds"], abs=1e-5)
    assert rec["timing_s/step"] > 0 and rec["perf/time_per_step"] == rec["timing_s/step"]
    # real prompt and response tokens of the batch, per second per device
    assert rec["perf/total_num_tokens"] > 0
    assert rec["perf/throughput"] == pytest.approx(rec["perf/total_num_tokens"] / rec["perf/time_per_step"], rel=1e-3)
    for model in ("actor", "ref", "critic"):
        assert 0 < rec[f"perf/mfu/{model}"] < 1, model
    assert 0 < rec["perf/mfu"] < 1
    for node in ("generate", "ref_logprob", "value", "loss", "critic_loss"):
        assert 0 <= rec[f"padding_frac/{node}"] < 1, node
    assert "padding_frac/score" not in rec  # a node without a model computes no positions
    assert rec["perf/cpu_memory_peak_gb"] > 0


def test_mfu_is_useful_flops_over_seconds_and_peak():
    # actor: 2 nodes; generate forward 2N per useful position, the loss 6N (forward + backward)
    from rlflow.records import NodeTime

    class Pos:
        def __init__(self, computed, useful):
            self.computed, self.useful = computed, useful

    nodes = {"generate": NodeTime(), "loss": NodeTime(), "score": NodeTime()}
    nodes["generate"].add(2.0, 8, 40, Pos(120, 100))
    nodes["loss"].add(3.0, 8, 40, Pos(110, 100))
    nodes["score"].add(0.5, 8, 0)
    costs = {"generate": perf.ModelCost("actor", 1000, False, 1e6), "loss": perf.ModelCost("actor", 1000, True, 1e6)}
    out = perf.step_figures(nodes, 6.0, 300, costs)
    # (2·1000·100 + 6·1000·100) FLOPs over 5 s of the actor's nodes at 1e6 FLOP/s = 0.16
    assert out["perf/mfu/actor"] == pytest.approx(8e5 / 5.0 / 1e6, abs=1e-6)  # rounded to 6 places
    assert out["perf/mfu"] == pytest.approx(8e5 / 1e6 / 6.0, abs=1e-6)  # over the whole step
    assert out["padding_frac/generate"] == pytest.approx(20 / 120, abs=1e-4)  # rounded to 4 places
    assert out["padding_frac/loss"] == pytest.approx(10 / 110, abs=1e-4)
    assert out["perf/throughput"] == pytest.approx(50.0) and out["timing_s/score"] == 0.5


def test_peak_is_probed_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real peak_flops
    monkeypatch.setattr(perf, "_cache_file", lambda: tmp_path / "peak_flops.json")
    calls = []
    monkeypatch.setattr(perf, "probe", lambda device, dtype: calls.append(dtype) or 5e10)
    assert perf.peak_flops(torch.device("cpu"), torch.float32) == 5e10
    assert perf.peak_flops(torch.device("cpu"), torch.float32) == 5e10
    assert calls == [torch.float32]  # the second came from the cache
    assert perf.peak_flops(torch.device("cpu"), torch.bfloat16) == 5e10 and len(calls) == 2  # per precision
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2
    # a probe at 2 threads disturbed by other work (reads 1e10) does not count below the 1-thread peak
    monkeypatch.setattr(perf, "probe", lambda device, dtype: 1e10)
    monkeypatch.setattr(perf.torch, "get_num_threads", lambda: 2)
    assert perf.peak_flops(torch.device("cpu"), torch.float32) == 5e10
    # nor does a low 4-thread reading cached before the 1-thread one was (the cache is read the same way)
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    key4 = next(k for k in cache if "float32|threads=2" in k).replace("threads=2", "threads=4")
    (tmp_path / "peak_flops.json").write_text(json.dumps({**cache, key4: 2e10}))
    monkeypatch.setattr(perf.torch, "get_num_threads", lambda: 4)
    assert perf.peak_flops(torch.device("cpu"), torch.float32) == 5e10


def test_probe_measures_a_matmul_rate(monkeypatch):
    monkeypatch.setattr(perf, "PROBE_SIZES", {"cpu": (64,)})
    assert perf.probe(torch.device("cpu"), torch.float32) > 1e6  # FLOP/s of a 64-square matmul: well over a MFLOP/s


def test_matmul_params_count_linear_and_conv1d_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    # one block: c_attn 8x24, attn c_proj 8x8, c_fc 8x32, mlp c_proj 32x8; the LM head 16x8 (tied to wte)
    assert perf.matmul_params(m) == 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8 + 16 * 8


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="bf16 matmuls on CPU need oneDNN")
def test_bf16_runs_as_autocast_over_fp32_weights(tmp_path):
    run, rec, grads = one_step(pipeline(precision="bf16"), tmp_path, "bf16")
    worker = run.workers["actor"]
    assert all(q.dtype == torch.float32 for q in worker.module.parameters())  # fp32 master weights
    assert type(worker.engine.optimizer).__name__ == "AdamW"  # the plain optimizer, no DeepSpeed bf16 wrapper
    assert grads["actor"].abs().max() > 0 and torch.isfinite(grads["actor"]).all()
    assert rec["update/nonfinite_skipped/actor"] == 0.0 and torch.isfinite(torch.tensor(rec["loss/pg"]))
    with worker.autocast():  # the forwards' matmuls run in bf16, attention by the math kernel (see Worker.autocast)
        x = torch.ones(2, 2)
        assert torch.mm(x, x).dtype == torch.bfloat16
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # as it was outside
    with worker.autocast(training=False):  # a forward without backward (experience nodes) keeps the fused kernel
        assert torch.mm(x, x).dtype == torch.bfloat16 and torch.backends.cuda.flash_sdp_enabled()
    _, fp32, _ = one_step(pipeline(), tmp_path, "fp32")
    assert rec["kl/mean"] == pytest.approx(fp32["kl/mean"], abs=5e-3)  # close to fp32, not equal
