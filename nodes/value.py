"""Value: token values V(s_t) from the critic, for the state before each response token.

ALGORITHMS.md §0.1: ``values[:, t]`` is the critic's output at the position before
response token t (verl slices the critic output ``[-T-1:-1]``). 0 on padding: [B, T].
"""

from __future__ import annotations

import torch

from rlflow.batch import Batch
from rlflow.forward import response_values
from rlflow.node import Context, runner
from rlflow.spec import Value


@runner("value")
class ValueRunner:
    def __init__(self, spec: Value):
        self.spec = spec

    @torch.no_grad()
    def run(self, batch: Batch, ctx: Context):
        worker = ctx.workers[self.spec.model]
        v = response_values(worker.engine, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
        batch["values"] = v
        m = batch["response_mask"]
        return {"values/mean": float((v * m).sum() / m.sum().clamp(min=1))}
