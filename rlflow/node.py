"""What a node runner is: the runtime side of a node kind.

A node kind has a spec (``rlflow.spec``: parameters, reads, writes) and a runner (in
``rlflow.nodes``): ``runner(spec)`` is built once per run and ``run(batch, ctx)``
writes its columns into ``batch`` and returns metrics (or returns a new batch and
metrics, for nodes that change the rows). Runners keep no state between calls beyond
what they were built with, so the scheduler is free to order them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rlflow.registry import Registry


@dataclass
class Context:
    """What a node may use while it runs: the placed models, the random generator, the step."""

    workers: dict[str, Any]  # model name -> rlflow.models.Worker
    generator: Any  # torch.Generator owned by the engine (saved in checkpoints), the same on every rank
    step: int = 0
    seed: int = 0  # the run's seed: Generate seeds each prompt's sampler with (seed, step, prompt)
    rule_pool: Any = None  # rlflow.rules.RulePool of the run: reward rules run in its worker processes
    positions: Any = None  # rlflow.packing.Positions of this node run: what its forwards computed (set by the engine)


RUNNERS: Registry[type] = Registry("node runner")


def runner(kind: str):
    """Register the runner class of a node kind: ``@runner("score")``."""
    return RUNNERS.register(kind)


class NodeRunner:
    """Base of every runner: holds the node's validated spec.

    ``concurrency`` says how the engine may run the node beside the other nodes of its
    stage (no path between them; rlflow.overlap): "thread" (in a thread of its own, on a
    view of the batch), "main" (in the main thread while the others run in theirs), or
    None (alone: e.g. it replaces the batch's rows).
    """

    concurrency: Optional[str] = None

    def __init__(self, spec):
        self.spec = spec

    def run(self, batch, ctx: Context):
        raise NotImplementedError


class ModelRunner(NodeRunner):
    """A runner of a node that runs one model (``spec.model``).

    :meth:`inputs` is the one place where a batch moves to the device of the model that
    reads it; every tensor a runner makes is made on its inputs' device.
    """

    def worker(self, ctx: Context):
        return ctx.workers[self.spec.model]

    def inputs(self, batch, ctx: Context):
        """``batch`` with every tensor on the model's device (the same batch when already there)."""
        return batch.to(self.worker(ctx).device)


def layout(worker, ctx: Context) -> dict[str, Any]:
    """Keywords of the scoring functions of ``rlflow.forward`` for ``worker``'s model in this
    node run: its layout (:func:`packs`) and the run's position count."""
    return {"padding_free": packs(worker.spec), "positions": ctx.positions}


def packs(spec) -> bool:
    """Whether the forwards of model ``spec`` run packed (``Model.padding_free``). Not under
    ZeRO-3: its parameters are gathered by hooks traced over whole-model forwards, and the
    packed path calls the model's parts (the transformer, then the head on the response
    positions), which gave wrong gradients for a tied embedding (tests/test_spmd.py)."""
    return spec.padding_free and spec.zero_stage != 3
