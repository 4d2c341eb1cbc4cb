"""RefLogprob: log-probs of the responses under the frozen reference model.

Taken at the sampling temperature (ALGORITHMS.md Part A §1; the node's ``temperature``,
resolved from the Generate node when the graph is built), 0 on padding: [B, T]. The
reference of a LoRA actor (``actor.frozen()``) is the actor's own module with its
adapter disabled: the base weights, never a second copy.
"""

from __future__ import annotations

from rlflow.lazy import no_grad
from rlflow.node import Context, ModelRunner, layout, runner


@runner("ref_logprob")
class RefLogprobRunner(ModelRunner):
    concurrency = "thread"  # a forward of its own model: it can run beside the other nodes of its stage

    @no_grad
    def run(self, batch, ctx: Context):
        from rlflow.forward import response_logprobs

        b = self.inputs(batch, ctx)
        worker = self.worker(ctx)
        with worker.forwards():  # a LoRA actor's shared base: its module with the adapter disabled
            b["ref_logprobs"] = response_logprobs(worker.engine, b["prompt_ids"], b["prompt_mask"], b["response_ids"],
                                                  b["response_mask"], temperature=self.spec.temperature or 1.0,
                                                  **layout(worker, ctx))
        return {}
