"""Runs of tiny GRPO and PPO pipelines, for tests/test_spmd.py: in the test's own process
(one process) and under ``python -m torch.distributed.run`` (several).

    python -m torch.distributed.run --nproc_per_node 2 tests/spmd_worker.py equivalence OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/spmd_worker.py resume OUT

What is pinned so that 2 processes compute what 1 does: the seed; one torch thread per
process; fp32 (DeepSpeed averages gradients, the engine scales the loss by the world size);
ZeRO-0, and for GRPO also ZeRO-3 on every model against ZeRO-0 in one process; every other
setting is the pipeline's own, including micro-batches of 2 rows
(so the ranks make different numbers of micro-batches and the idle passes run) and, for
PPO, 2 epochs x 2 mini-batches of shuffled groups (so a rank can hold no row of a
mini-batch). The rules are closures, so they run in each process (no rule workers).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from rlflow import Advantage, Filter, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score, Value
from rlflow.engine import Run
from rlflow.graph import build

INIT = "builtin:tiny-arith-init"


def length_rule():
    def length(response, row):  # spread even for an untrained model
        return float(len(response))

    return length


def grpo(**kw) -> Pipeline:
    actor = Model(INIT, train=True, lr=1e-3, micro_batch_size=2, grad_clip=None)
    return Pipeline(name="grpo", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "ref": actor.frozen()},
                    nodes=[Generate("actor", n=4, max_new_tokens=4), Score(rules={"length": length_rule()}), RefLogprob("ref"),
                           Advantage("group_norm"), Loss("clip", kl_coef=0.04, agg="seq-mean-token-mean")],
                    **{"steps": 2, "eval": None, "seed": 7, **kw})


def long_rule():
    def long(response, row):  # equal for many groups: dynamic sampling drops them and refills
        return float(len(response) >= 4)

    return long


def dapo(**kw) -> Pipeline:
    """Dynamic sampling: refill rounds, the cut to the target, the kept groups shared out again."""
    actor = Model(INIT, train=True, lr=1e-3, micro_batch_size=4)
    return Pipeline(name="dapo", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor},
                    nodes=[Generate("actor", n=2, max_new_tokens=4), Score(rules={"long": long_rule()}),
                           Filter("dynamic", metric="rewards", max_rounds=20), Advantage("group_norm"),
                           Loss("clip_higher", agg="token-mean")],
                    **{"steps": 2, "eval": None, "seed": 7, "mini_batches": 2, **kw})


def ppo(**kw) -> Pipeline:
    actor = Model(INIT, train=True, lr=1e-3, micro_batch_size=2)
    return Pipeline(name="ppo", data=Prompts("builtin:arith", batch_size=4),
                    models={"actor": actor, "ref": actor.frozen(), "critic": actor.critic(lr=1e-3)},
                    nodes=[Generate("actor", n=2, max_new_tokens=4), Score(rules={"length": length_rule()}), RefLogprob("ref"),
                           Value("critic"), Advantage("gae", whiten=True, kl_coef=0.01, kl="k1"), Loss("clip", agg="token-mean"),
                           Loss("value", model="critic", name="value_loss")],
                    **{"steps": 2, "eval": None, "seed": 7, "ppo_epochs": 2, "mini_batches": 2, **kw})


def train(pipeline: Pipeline, out: Path, steps: int | None = None, resume: bool = False) -> Run:
    run = Run(pipeline, build(pipeline), out)
    run.setup()
    if resume:
        run.resume()
    run.train(steps)
    return run


def weights(run: Run, model: str = "actor") -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in run.workers[model].module.parameters()])


def equivalence(out: Path) -> None:
    """GRPO, PPO and DAPO-style dynamic sampling for 2 steps each; metrics.jsonl and final/ in
    out/<name>. With several
    processes also GRPO with every model under ZeRO-3 (the frozen reference sharded too), in
    out/zero3."""
    for pipeline in (grpo(), ppo(), dapo()):
        train(pipeline, out / pipeline.name)
    if torch.distributed.get_world_size() > 1:
        zero(out, 3)


def failing_at_step_3():
    """The length rule, failing on the last rank at its third step's scoring (8 samples a step)."""
    calls = {"n": 0}

    def length(response, row):
        calls["n"] += 1
        if calls["n"] > 16 and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            raise ValueError("the grader is down")
        return float(len(response))

    return length


def terminated_at_step_2():
    """The length rule, sending SIGTERM to the last rank's own process at its second step's scoring."""
    calls = {"n": 0}

    def length(response, row):
        calls["n"] += 1
        if calls["n"] == 9 and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return float(len(response))

    return length


def stopped(pipeline: Pipeline, out: Path) -> str:
    try:
        train(pipeline, out)
    except BaseException as e:  # noqa: BLE001 - a failure (RewardRuleError, PeerFailure) or Stopped (a signal)
        return f"{type(e).__name__}: {e}"
    raise AssertionError("the run was not stopped")


def with_rule(pipeline: Pipeline, rule) -> Pipeline:
    return pipeline.model_copy(update={"nodes": [pipeline.nodes[0], Score(rules={"length": rule}), *pipeline.nodes[2:]]})


def resume(out: Path) -> None:
    """3 steps uninterrupted == 2 steps, a failure on one rank at step 3 (the rescue checkpoint
    of step 2 is written by every rank), resume, 1 more step; and == a SIGTERM to one rank
    during step 2 (every rank ends step 2 and saves it), resume, 1 more step; bit for bit."""
    full = train(grpo(steps=3), out / "full")
    result = {}
    for name, rule in (("failure", failing_at_step_3()), ("signal", terminated_at_step_2())):
        result[name] = stopped(with_rule(grpo(steps=3), rule), out / name)
        again = train(grpo(steps=3), out / name, resume=True)
        result[name + "_resumed_from"] = again.start_step
        result[name + "_same"] = bool(torch.equal(weights(again), weights(full)))
    if torch.distributed.get_rank() == 0:
        (out / "resume.json").write_text(json.dumps(result))


def zero(out: Path, stage: int = 3) -> None:
    """GRPO with every model (the frozen reference too) under ZeRO ``stage``."""
    p = grpo()
    models = {k: m.model_copy(update={"zero_stage": stage}) for k, m in p.models.items()}
    train(p.model_copy(update={"models": models}), out / f"zero{stage}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"equivalence": equivalence, "resume": resume, "zero": zero}[sys.argv[1]](Path(sys.argv[2]))
