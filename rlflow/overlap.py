"""Overlap: work of one iteration that runs at the same time as other work.

Three kinds, each decided by the engine from the graph (DESIGN.md "Concurrency"):

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
* **The update's first forward, early** (:class:`EarlyForward`): the trained model's forward
  on the update's first micro-batch, beside the last experience stages whose outputs it
  does not read (``PipelineGraph.early_forward``).

A thread runs torch's operators with the thread count it is given (:func:`in_thread`: the
main thread's, unless the work is shared out), so on a machine with more cores than
``torch.get_num_threads()`` the overlapped work uses the idle ones.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from rlflow.packing import Positions


def in_thread(pool: ThreadPoolExecutor, fn: Callable, *args: Any, threads: Optional[int] = None) -> Future:
    """``fn(*args)`` in ``pool``, with ``threads`` torch threads (default: this thread's count).

    Torch keeps a count per thread, set up on a thread's first use from the count last set
    anywhere in the process; so the pool's thread first has its count set up, then sets it.
    """
    threads = threads or torch.get_num_threads()

    def call():
        torch.get_num_threads()
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

    Under bf16 autocast on a CPU the update's forwards use the math attention kernel, a
    process-wide switch (``Worker.training_kernel``): it is held for the whole run, so that
    the sampler, which decodes while the update runs, uses it at every step alike (flipped
    by the update, its kernel — and its samples — would depend on timing).
    """

    def __init__(self, runner, worker, seed: int):
        self.kernel = ExitStack()
        self.kernel.enter_context(worker.training_kernel())
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
        self.kernel.close()


FORWARD_COLUMNS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")  # what an update forward reads


class EarlyForward:
    """The update's first forward, started while the last experience stages still run.

    The forward of the trained model on the first micro-batch of the update reads only the
    prompts and responses; the loss needs the rest (advantages, reference log-probs), the
    forward does not. When no later experience node changes the rows or those columns
    (``PipelineGraph.early_forward``), the engine starts that forward in a thread as soon as
    its inputs are final, on the micro-batch the update will make, and the update takes its
    outputs instead of running it again: the same operators on the same tensors, so the
    same values. Its autograd graph waits for the loss; the backward runs in the update.

    The engine's torch threads are shared out while it runs: half to the forward, the rest
    to the nodes beside it (one each on 2 cores; more threads than cores made both slower).

    Under bf16 autocast on a CPU a training forward uses the math attention kernel
    (``Worker.autocast``), chosen by a process-wide switch: the engine holds it from the start
    until the outputs are taken, so the experience nodes of those stages use it too, at
    every step alike (a switch flipped by the thread would make their kernel depend on timing).
    """

    def __init__(self, worker, runner, micro, needs: set):
        self.worker, self.micro = worker, micro
        self.kernel = ExitStack()
        self.kernel.enter_context(worker.training_kernel())
        self.threads = torch.get_num_threads()  # the engine's; shared out while the forward runs
        torch.set_num_threads(max(1, self.threads - self.threads // 2))  # the nodes beside it
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rlflow-forward")
        self.future = in_thread(self.pool, self._forward, runner, needs, threads=max(1, self.threads // 2))

    def _forward(self, runner, needs: set):
        t0, positions = time.perf_counter(), Positions()
        with self.worker.autocast(training=False):  # the kernel switch is held by the engine
            out = runner.outputs(self.worker, self.micro, needs, positions)
        return out, positions, time.perf_counter() - t0

    def take(self, worker, micro) -> Optional[tuple[dict, Positions, float]]:
        """``(outputs, positions, seconds)`` of the forward, when it is ``worker``'s on the same
        rows as ``micro`` (else None: the update runs its own); raises what the forward raised."""
        same = worker is self.worker and all(torch.equal(micro[c], self.micro[c]) for c in FORWARD_COLUMNS)
        try:
            return self.future.result() if same else None
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the forward (its result unused unless taken); give the kernel switch and the
        engine's thread count back."""
        try:
            self.future.exception()
        finally:
            self.pool.shutdown(wait=True)
            self.kernel.close()
            torch.set_num_threads(self.threads)
