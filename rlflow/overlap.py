"""Overlap: work of one iteration that runs at the same time as other work.

Two kinds, both decided by the engine from the graph (DESIGN.md "Concurrency"):

* **Nodes of one stage.** Experience nodes with no path between them (Score, RefLogprob,
  Value after Generate) run at once: each runner says how (``NodeRunner.concurrency``):
  "thread" (in a thread of its own, on a view of the batch: its own dict of columns, the
  tensors shared), "main" (in the main thread while the others run: Score, whose in-process
  rules are timed by SIGALRM, which only the main thread receives). The new columns are
  merged back in the stage's order, so the result does not depend on which finished first.
* **One step ahead** (``Pipeline(rollout_ahead=1)``, :class:`RolloutAhead`). While the models
  train on batch k, batch k+1 is generated in a thread from a copy of the policy taken
  before update k: its samples are one iteration stale. The Generate node's second part
  (``GenerateRunner.finish``: old log-probs from the weights being trained) runs when the
  batch is used, so the PPO ratio is against the trainer's weights, and a policy loss's
  ``rollout_is`` corrects for the sampler's (verl's one-step off-policy, AReaL and
  OpenRLHF's async rollouts, TRL's vLLM importance-sampling correction).

Torch runs each thread's operators with the main thread's thread count, so on a machine
with more cores than ``torch.get_num_threads()`` the overlapped work uses the idle ones.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from rlflow.packing import Positions


def in_thread(pool: ThreadPoolExecutor, fn: Callable, *args: Any) -> Future:
    """``fn(*args)`` in ``pool``, with this thread's torch thread count (a new thread has the default)."""
    threads = torch.get_num_threads()

    def call():
        torch.set_num_threads(threads)
        return fn(*args)

    return pool.submit(call)


class RolloutAhead:
    """The Generate node's rollout of the next batch, in a thread, from a snapshot of the policy.

    ``launch`` copies the trainer's weights into the sampler (the copy is what makes the
    update and the sampling independent) and starts the rollout of a batch of prompts;
    ``take`` waits for it. The sampler is a frozen copy of the policy's module with the
    same tokenizer, precision and device; its sampling generator is its own (seeded from
    the run's), since the update draws from the run's generator at the same time.
    """

    def __init__(self, runner, worker, seed: int):
        self.runner = runner
        self.trainer = worker
        module = copy.deepcopy(worker.module).eval().requires_grad_(False)
        self.sampler = dataclasses.replace(worker, engine=module, module=module)
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rlflow-rollout")
        self.future: Optional[Future] = None

    @torch.no_grad()
    def _sync(self) -> None:
        for s, t in zip(self.sampler.module.parameters(), self.trainer.module.parameters()):
            s.copy_(t)
        for s, t in zip(self.sampler.module.buffers(), self.trainer.module.buffers()):
            s.copy_(t)

    def launch(self, prompts, ctx) -> None:
        """Start the rollout of ``prompts`` from the trainer's weights as they are now."""
        self._sync()
        ctx = replace(ctx, workers={**ctx.workers, self.runner.spec.model: self.sampler}, generator=self.generator,
                      positions=Positions())
        self.future = in_thread(self.pool, self._rollout, prompts, ctx)

    def _rollout(self, prompts, ctx):
        t0 = time.perf_counter()
        with self.sampler.autocast(training=False):
            rows, metrics = self.runner.rollout(prompts, ctx)
        return rows, metrics, time.perf_counter() - t0, ctx.positions

    def take(self):
        """``(rows, metrics, seconds, positions)`` of the rollout in flight (raises what it raised)."""
        future, self.future = self.future, None
        return future.result()

    def close(self) -> None:
        if self.future is not None:
            self.future.cancel()
            try:
                self.future.result()
            except Exception:  # noqa: BLE001 - a batch nobody will use; the run is ending
                pass
        self.pool.shutdown(wait=True)
