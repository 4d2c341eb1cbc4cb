"""Placement: the per-model DeepSpeed settings (ZeRO stage, offload of the optimizer state
and of the parameters, gradient checkpointing) and the GPU check's behaviour without a GPU.
Runs in one process; tests/test_spmd.py runs ZeRO-3 on two."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_engine import grpo, run_of

from rlflow.models import ds_config
from rlflow.spec import Model

ROOT = Path(__file__).parent.parent
INIT = "builtin:tiny-arith-init"


def with_actor(pipeline, **settings):
    actor = pipeline.models["actor"].model_copy(update=settings)
    return pipeline.model_copy(update={"models": {"actor": actor, "ref": actor.frozen()}})


def first_gradient(pipeline, tmp_path, name):
    run = run_of(pipeline, tmp_path, name)
    worker, grads = run.workers["actor"], []
    on = getattr(worker.module, "is_activation_checkpointing", None)  # transformers 5; 4.x: is_gradient_checkpointing
    assert (on if on is not None else worker.module.is_gradient_checkpointing) == worker.spec.gradient_checkpointing
    step = worker.step

    def capture(*a, **kw):
        grads.append(torch.cat([p.grad.flatten().clone() for p in worker.module.parameters()]))
        return step(*a, **kw)

    worker.step = capture
    run.train(1)
    return grads[0]


def test_gradient_checkpointing_gives_the_same_gradient(tmp_path):
    # activations recomputed in the backward: the same gradient, to float rounding
    plain = first_gradient(grpo(seed=2), tmp_path, "plain")
    checkpointed = first_gradient(with_actor(grpo(seed=2), gradient_checkpointing=True), tmp_path, "ckpt")
    assert plain.abs().max() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_frozen_model_under_zero3_is_sharded_not_replicated(tmp_path):
    run = run_of(with_actor(grpo(), zero_stage=3), tmp_path)
    ref = run.workers["ref"]
    assert type(ref.engine).__name__ == "DeepSpeedEngine"  # deepspeed.initialize without an optimizer
    assert all(hasattr(p, "ds_id") for p in ref.module.parameters())  # ZeRO-3 parameters
    assert type(run_of(grpo(), tmp_path, "zero0").workers["ref"].engine).__name__ == "InferenceEngine"


def test_deepspeed_config_follows_the_model_settings():
    cfg = ds_config(Model(INIT, train=True, zero_stage=3, offload=True, offload_params=True, precision="bf16"), hidden=128)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert zero["reduce_bucket_size"] == 128 * 128 and zero["stage3_param_persistence_threshold"] == 1280
    # bf16 is DeepSpeed's on a GPU; on a CPU it is autocast over fp32 weights (rlflow.models.autocast_dtype)
    assert cfg["bf16"] == {"enabled": torch.cuda.is_available()}
    frozen = ds_config(Model(INIT, zero_stage=3, offload=True), hidden=128)
    assert "offload_optimizer" not in frozen["zero_optimization"] and "gradient_clipping" not in frozen  # no optimizer


@pytest.mark.parametrize("clip", [None, 5.0, 1.0])
def test_the_optimizer_sees_the_gradient_clipped_as_asked_and_only_once(clip):
    # plain fp32 under ZeRO-0: the worker clips; DeepSpeed, whose default clip is 1.0, must not again
    from rlflow.models import place

    worker = place("actor", Model(INIT, train=True, grad_clip=clip))
    assert worker.engine.gradient_clipping() == 0.0
    ids = torch.randint(3, 10, (2, 6))
    worker.backward(worker.engine(input_ids=ids).logits.float().pow(2).sum() * 100, last=True)
    raw = float(torch.cat([p.grad.flatten() for p in worker.module.parameters()]).norm())
    seen = []
    opt = worker.engine.optimizer
    step = opt.step
    opt.step = lambda *a, **k: seen.append(float(torch.cat([p.grad.flatten() for p in worker.module.parameters()]).norm())) or step(*a, **k)
    norm, skipped = worker.step()
    assert raw > 10 and not skipped and norm == pytest.approx(raw, rel=1e-3)
    assert seen == [pytest.approx(min(raw, clip or raw), rel=1e-3)]


@pytest.mark.slow  # builds DeepSpeed's CPU Adam on first use (about a minute and a half)
@pytest.mark.parametrize("settings", [dict(zero_stage=2, offload=True),
                                      dict(zero_stage=3, offload=True, offload_params=True)], ids=["zero2-offload", "zero3-offload"])
def test_offload_trains_like_no_offload(settings, tmp_path):
    # ZeRO-Offload: the optimizer state (and under ZeRO-3 the parameters) in CPU memory, with
    # DeepSpeed's CPU Adam; the first gradient is the one without offload
    plain = first_gradient(grpo(seed=2), tmp_path, "plain")
    run = run_of(with_actor(grpo(seed=2), **settings), tmp_path, "offload")
    assert type(run.workers["actor"].engine.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"
    run.train(1)
    assert run.history[0]["grad_norm/actor"] == pytest.approx(float(plain.norm()), rel=1e-4)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU: the check would run")
def test_gpu_check_says_there_is_no_gpu_and_exits_2():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "no NVIDIA GPU on this machine" in r.stderr and "make test" in r.stderr
