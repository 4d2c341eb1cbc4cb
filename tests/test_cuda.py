"""GRPO and PPO for a few steps on a CUDA GPU, in fp32 and bf16 (skipped without one).

Every model is placed on the GPU, every batch a model reads is moved there by the runner
base, and the run's figures are finite. tests/test_device.py checks the same contract on a
CPU with sentinel devices; benchmarks/gpu_check.sh runs this file first.
"""

import json
import math

import pytest
import torch

from rlflow.engine import Run
from rlflow.graph import build

import spmd_worker

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("ignore::rlflow.rules.RuleWarning")]


def on(pipeline, **model_settings):
    models = {k: m.model_copy(update=model_settings) for k, m in pipeline.models.items()}
    return pipeline.model_copy(update={"models": models})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("make", [spmd_worker.grpo, spmd_worker.ppo], ids=["grpo", "ppo"])
def test_runs_on_cuda(make, precision, tmp_path):
    p = on(make(steps=3), precision=precision)
    run = Run(p, build(p), tmp_path / "run")
    run.setup()
    for w in run.workers.values():
        assert w.device.type == "cuda", w.name
        assert all(q.device.type == "cuda" for q in w.module.parameters()), w.name
    run.train(3)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        figures = {k: v for k, v in r.items() if isinstance(v, float)}
        assert all(math.isfinite(v) for v in figures.values()), figures
        assert r["rows"] == (16 if make is spmd_worker.grpo else 8)


def test_zero3_reference_is_sharded_on_cuda(tmp_path):
    # the frozen reference under ZeRO-3 goes through deepspeed.initialize without an optimizer
    p = on(spmd_worker.grpo(steps=1), zero_stage=3, precision="bf16")
    run = Run(p, build(p), tmp_path / "run")
    run.setup()
    assert all(hasattr(q, "ds_id") for q in run.workers["ref"].module.parameters())
    run.train(1)
