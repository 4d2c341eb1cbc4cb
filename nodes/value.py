"""Value: token values V(s_t) from the critic, for the state before each response token.

ALGORITHMS.md §0.1: ``values[:, t]`` is the critic's output at the position before
response token t (verl slices the critic output ``[-T-1:-1]``). 0 on padding: [B, T].
"""

from __future__ import annotations

from rlflow.dist import Mean
from rlflow.lazy import no_grad
from rlflow.node import Context, ModelRunner, layout, runner


@runner("value")
class ValueRunner(ModelRunner):
    concurrency = "thread"  # a forward of its own model: it can run beside the other nodes of its stage

    @no_grad
    def run(self, batch, ctx: Context):
        from rlflow.forward import response_values

        b = self.inputs(batch, ctx)
        worker = self.worker(ctx)
        v = response_values(worker.engine, b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"],
                            **layout(worker, ctx))
        b["values"] = v
        m = b["response_mask"]
        return {"values/mean": Mean(float((v * m).sum()), float(m.sum()))}
