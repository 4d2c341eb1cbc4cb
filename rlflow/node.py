"""What a node runner is: the runtime side of a node kind.

A node kind has a spec (``rlflow.spec``: parameters, reads, writes) and a runner (in
``rlflow.nodes``): ``runner(spec)`` is built once per run and ``run(batch, ctx)``
writes its columns into ``batch`` and returns metrics (or returns a new batch and
metrics, for nodes that change the rows). Runners keep no state between calls beyond
what they were built with, so the scheduler is free to order them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlflow.registry import Registry


@dataclass
class Context:
    """What a node may use while it runs: the placed models, the random generator, the step."""

    workers: dict[str, Any]  # model name -> rlflow.models.Worker
    generator: Any  # torch.Generator owned by the engine (saved in checkpoints), the same on every rank
    step: int = 0
    seed: int = 0  # the run's seed: Generate seeds each prompt's sampler with (seed, step, prompt)
    rule_pool: Any = None  # rlflow.rules.RulePool of the run: reward rules run in its worker processes


RUNNERS: Registry[type] = Registry("node runner")


def runner(kind: str):
    """Register the runner class of a node kind: ``@runner("score")``."""
    return RUNNERS.register(kind)


class NodeRunner:
    """Base of every runner: holds the node's validated spec."""

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
