"""What a node runner is: the runtime side of a node kind.

A node kind has a spec (in ``rlflow.spec``: parameters, reads, writes) and a runner
(in ``rlflow.nodes``): ``runner(spec)`` is built once per run and ``run(batch, ctx)``
writes its columns into ``batch`` and returns metrics. Runners keep no state between
calls beyond what they were built with, so the scheduler is free to order them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from rlflow.registry import Registry


@dataclass
class Context:
    """What a node may use while it runs: the placed models, the random generator, the step."""

    workers: dict[str, Any]  # model name -> rlflow.models.Worker
    graph: Any  # rlflow.graph.PipelineGraph
    generator: Any  # torch.Generator owned by the engine (saved in checkpoints)
    step: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline(self):
        return self.graph.pipeline


class Runner(Protocol):
    def run(self, batch, ctx: Context) -> dict[str, float]: ...


RUNNERS: Registry[type] = Registry("node runner")


def runner(kind: str):
    """Register the runner class of a node kind: ``@runner("score")``."""
    return RUNNERS.register(kind)
