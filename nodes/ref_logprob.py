"""RefLogprob: log-probs of the responses under the frozen reference model.

Taken at the sampling temperature (ALGORITHMS.md Part A §1), 0 on padding: [B, T].
"""

from __future__ import annotations

import torch

from rlflow.batch import Batch
from rlflow.forward import response_logprobs
from rlflow.node import Context, runner
from rlflow.spec import RefLogprob


@runner("ref_logprob")
class RefLogprobRunner:
    def __init__(self, spec: RefLogprob):
        self.spec = spec

    @torch.no_grad()
    def run(self, batch: Batch, ctx: Context):
        worker = ctx.workers[self.spec.model]
        batch["ref_logprobs"] = response_logprobs(worker.engine, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                                  batch["response_mask"], temperature=batch.meta.get("temperature", 1.0))
        return {}
