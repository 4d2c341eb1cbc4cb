"""The runtime: places the models, runs the graph iteration by iteration.

One iteration (DESIGN.md "Execution"):
1. experience: a batch of prompts flows through the experience nodes in graph order
   (Generate, Score, RefLogprob, Value, Advantage, Filter). A Filter that refills makes
   the engine re-run the nodes upstream of it on fresh prompts until enough groups
   survive (bounded rounds).
2. update: ``ppo_epochs`` x ``mini_batches``; for each trainable model, every Loss
   runner on it gives its denominators for the whole mini-batch and its term per
   micro-batch; the terms are summed, gradients accumulate over the micro-batches, and
   the model takes one optimizer step per mini-batch.

The engine knows node kinds only through their runners: it names no variant and does
no maths. Records go to :mod:`rlflow.records`, held-out figures come from
:mod:`rlflow.evaluation`, checkpoints from :mod:`rlflow.checkpoint`.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from rlflow import checkpoint, dist, perf, rundir
from rlflow.batch import Batch, mini_batch_groups
from rlflow.checkpoint import ResumeError  # noqa: F401  (re-exported for the CLI)
from rlflow.data import DataStream, share
from rlflow.evaluation import Evaluator
from rlflow.graph import PipelineGraph
from rlflow.models import Worker, compute_dtype, place
from rlflow.node import RUNNERS, Context
from rlflow.overlap import EarlyForward, RolloutAhead, in_thread
from rlflow.packing import Positions
from rlflow.records import Records, Timings, batch_stats, step_record, tokens, write_json
from rlflow.spec import Pipeline

AHEAD_SEED_OFFSET = 104729  # the one-step-ahead sampler's generator: seed + this (Pipeline.rollout_ahead)


class RefillError(RuntimeError):
    """Dynamic sampling ran out of rounds before keeping enough groups."""


class PeerFailure(RuntimeError):
    """Another process failed in a node: every rank stops at the same place (and can write
    the rescue checkpoint together)."""


class NonFiniteUpdates(RuntimeError):
    """Too many steps in a row skipped their update for a non-finite loss or gradient."""


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint; ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Observer:
    """Receives the engine's events. The default prints nothing.

    ``doing`` says what set-up does now (before ``start``); ``building`` gives the observer
    of a training run that builds a model during set-up (a provider's ``train``);
    ``samples`` are the rows a step wrote to samples.jsonl.
    """

    def message(self, text: str) -> None: ...
    def doing(self, text: str) -> None: ...
    def building(self, name: str, steps: int) -> "Observer": return Observer()
    def start(self, run: "Run") -> None: ...
    def step(self, step: int, record: dict[str, Any]) -> None: ...
    def samples(self, step: int, lines: list[dict[str, Any]]) -> None: ...
    def evaluated(self, step: int, figures: dict[str, float]) -> None: ...
    def end(self, summary: dict[str, Any]) -> None: ...


def train_pipeline(pipeline: Pipeline, out_dir: Path, observer: Optional[Observer] = None) -> Path:
    """Run ``pipeline`` to the end in ``out_dir`` (quietly, unless ``observer`` watches); the
    directory of its final model.

    Model providers receive this as ``train`` (``rlflow.provider.Train``) to build a model
    by training (``builtin:tiny-arith`` runs ``pipelines/sft.py``) without importing the engine.
    """
    from rlflow.graph import build

    run = Run(pipeline, build(pipeline), out_dir, observer=observer or Observer())
    try:
        run.setup()
        run.train()
    finally:
        run.close()
    return out_dir / "final"


@dataclass
class Run:
    """A run of a pipeline: its models, its data, its outputs.

    ``pipeline`` is taken from ``graph``: the pipeline as the graph resolved it (settings
    taken from the Generate node filled in), which is what ``config.json`` records.
    """

    pipeline: Pipeline
    graph: PipelineGraph
    out_dir: Path
    observer: Observer = field(default_factory=Observer)
    workers: dict[str, Worker] = field(default_factory=dict)
    start_step: int = 0  # the last step done before this process started (resume)
    resumed_eval: dict[str, float] = field(default_factory=dict)
    lock: Optional[rundir.Lock] = None  # the run directory's lock (taken in setup unless given)
    skipped_in_a_row: int = 0  # consecutive steps whose update was skipped (non-finite)

    def __post_init__(self):
        self.pipeline = self.graph.pipeline
        self.records: Optional[Records] = None
        self._stepped = False  # an optimizer step of the current step has been taken
        self._early: Optional[EarlyForward] = None  # the update's first forward, started during the experience
        self._signal = 0  # a signal asked the run to stop after this step

    # --- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        from rlflow.models import setup_distributed

        p = self.pipeline
        setup_distributed()
        torch.manual_seed(p.seed)
        random.seed(p.seed)
        # the engine's generator shuffles mini-batches: the same on every rank (samples have their own)
        self.generator = torch.Generator().manual_seed(p.seed)
        if dist.rank() == 0 and self.lock is None:
            self.lock = rundir.lock(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if dist.rank() == 0:
            write_json(self.out_dir / "config.json", p.to_config())
        self._place_models()
        self.policy = self._policy_name()
        self.tokenizer = (self.workers[self.policy] if self.policy else next(iter(self.workers.values()))).tokenizer
        self.data = DataStream(p.data, self.tokenizer, seed=p.seed, rank=dist.rank(), world=dist.world_size())
        self.runners = {n.name: RUNNERS[n.kind](n) for n in p.nodes}
        self.ctx = Context(workers=self.workers, generator=self.generator, rule_pool=self._rule_pool(), seed=p.seed)
        self.ahead = self._rollout_ahead()
        self.records = Records(self.out_dir, writer=dist.rank() == 0)
        self.evaluator = Evaluator(p, self.workers, self.policy, self.tokenizer)
        self.costs = perf.node_costs(p, self.workers, lambda w: compute_dtype(w.spec))  # peak probed once per machine
        self.observer.start(self)

    def _rule_pool(self):
        """The run's pool of reward-rule workers, when a Score node has rules (started now, so
        its workers start while the first batch is generated); sized by the first such node."""
        scores = [n for n in self.pipeline.nodes if getattr(n, "rules", None)]
        if not scores:
            return None
        from rlflow.rules import RulePool

        pool = RulePool(scores[0].rule_workers, timeout_s=scores[0].rule_timeout_s)
        pool.start()
        return pool

    def _rollout_ahead(self) -> Optional[RolloutAhead]:
        """The one-step-ahead rollout of ``Pipeline.rollout_ahead`` (one process only, for now)."""
        if not self.pipeline.rollout_ahead:
            return None
        if dist.world_size() > 1:
            raise ValueError("rollout_ahead=1 runs in a single process for now; set rollout_ahead=0 to run on several")
        gen = self.graph.generate()
        return RolloutAhead(self.runners[gen.name], self.workers[gen.model], self.pipeline.seed + AHEAD_SEED_OFFSET)

    def _place_models(self) -> None:
        tokenizers: dict[str, Any] = {}
        def train(pipeline: Pipeline, out_dir: Path) -> Path:  # a provider's build, watched by the observer
            return train_pipeline(pipeline, out_dir, self.observer.building(spec.path, pipeline.steps))

        shared = self.pipeline.shared_bases()  # a LoRA model's frozen base: its module, adapter disabled
        for name, spec in self.pipeline.models.items():
            if name in shared:
                continue
            t0 = time.perf_counter()
            self.observer.doing(f"placing {name} ({spec.path})")
            self.workers[name] = place(name, spec, on_build=self.observer.message, shared=tokenizers, train=train)
            kind = "trainable" if spec.train else "frozen"
            self.observer.message(f"placed {name} ({spec.path}, {kind}, head={spec.head}, ZeRO-{spec.zero_stage}, "
                                  f"{spec.precision}) in {time.perf_counter() - t0:.1f}s")
        for name, owner in shared.items():
            self.workers[name] = self.workers[owner].base_view(name, self.pipeline.models[name])
            self.observer.message(f"{name} is {owner}'s base (adapter disabled, shared): no second copy")

    def _policy_name(self) -> Optional[str]:
        """The model evaluated as the policy: the trained language model (the Generate
        node's model when it trains, so a frozen sampler is never the one evaluated)."""
        gen = self.graph.generate()
        if gen is not None and self.pipeline.models[gen.model].train:
            return gen.model
        trained = [n for n, m in self.pipeline.models.items() if m.train and m.head == "lm"]
        return trained[0] if trained else (gen.model if gen is not None else None)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.records.history if self.records else []

    # --- the loop --------------------------------------------------------------------------
    def train(self, steps: Optional[int] = None) -> dict[str, Any]:
        try:
            return self._train(steps)
        except BaseException:
            self.close()  # a failed run lets go of its files, its workers and its directory's lock
            raise

    def _train(self, steps: Optional[int] = None) -> dict[str, Any]:
        steps = steps or self.pipeline.steps
        every = self.pipeline.eval.every if self.pipeline.eval else 0
        before = self.resumed_eval if self.start_step else self.evaluate(0)
        if dist.rank() == 0 and not self.start_step:
            write_json(self.out_dir / "eval_before.json", before)
        started = time.perf_counter()
        phases: list[dict[str, Any]] = []
        with self._signals_end_the_step():
            for step in range(self.start_step + 1, steps + 1):
                record, batch = self._step(step)
                phases += self._phase_end(step, record)
                if every and step % every == 0 and step != steps:
                    record.update(self.evaluate(step))
                lines = self.records.write(record, batch)
                self.observer.step(step, record)
                self.observer.samples(step, lines)
                saved = self.pipeline.save_every and step % self.pipeline.save_every == 0
                if saved:
                    self.checkpoint(step)
                self._stop_if_asked(step, record, saved)
        after = self.evaluate(steps)
        self.save_final()
        summary = self.records.summary(self.pipeline.name, before, after, time.perf_counter() - started)
        if phases:
            summary["phases"] = phases
        if dist.rank() == 0:
            write_json(self.out_dir / "summary.json", summary)
        self.observer.end(summary)
        self.close()
        return summary

    def _step(self, step: int) -> tuple[dict[str, Any], Batch]:
        """One iteration. A failure in it leaves a checkpoint of the last finished step, as
        long as no optimizer step of this one had been taken (the weights are then exactly
        the last finished step's); after one, the newest checkpoint is the last saved."""
        self.ctx.step = step
        t0 = time.perf_counter()
        rng_before = self._rng_state()
        self._stepped = self._agreed = False
        try:
            batch, times, metrics = self.experience()
            # every rank takes the same number of optimizer steps: all update, or none does
            if dist.all_reduce_min(len(batch)) > 0:
                metrics.update(self.update(batch, times))
            else:
                metrics["update/skipped"] = 1.0
                self.observer.message(f"step {step}: the filters kept no rows (on some rank); no update this step")
            self._drop_early()
        except BaseException:  # a failing rule, a second Ctrl-C, ...: keep what the finished steps learned
            self._drop_early()  # no forward of the trained model runs on while a checkpoint is written
            if self._stepped:
                self.observer.message(f"stopped during the update of step {step}, after optimizer steps; "
                                      "the newest checkpoint is the last one saved")
            elif dist.world_size() > 1 and not self._agreed:  # the ranks may be anywhere: no collective save
                self.observer.message(f"stopped during step {step} in this process alone; "
                                      "the newest checkpoint is the last one saved")
            else:
                self._rescue(step - 1, rng_before)
            raise
        record = self._record(step, batch, times, metrics, time.perf_counter() - t0)
        return record, batch

    def _record(self, step: int, batch: Batch, times: Timings, metrics: dict, seconds: float) -> dict[str, Any]:
        """The step's record from every rank's figures: rows, node times, metrics, and timing_s/*,
        perf/* (throughput, MFU per model, peak memory) and padding_frac/*."""
        real = sum(int(batch[c].sum()) for c in ("prompt_mask", "response_mask") if c in batch and len(batch))
        device = next((w.device for w in self.workers.values()), None)
        memory = {k: dist.Max(v) for k, v in perf.memory(device).items()}
        stats = dist.reduce_metrics({"seconds": dist.Max(seconds), **batch_stats(batch), **times.as_metrics(),
                                     "perf/total_num_tokens": dist.Sum(real), **memory})
        timings = Timings.from_metrics(stats)
        record = step_record(step, stats, timings, metrics)
        record.update(perf.step_figures(timings, stats["seconds"], int(stats["perf/total_num_tokens"]), self.costs,
                                        dist.world_size()))
        return record

    # --- stopping: signals and non-finite updates -------------------------------------------
    @contextmanager
    def _signals_end_the_step(self):
        """SIGINT (Ctrl-C) and SIGTERM (what schedulers send) end the run after the current
        step, with a checkpoint of it; a second one stops at once (the last finished step is
        then saved if the update had not begun). Main thread only; the old handlers come back."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if self._signal:
                raise KeyboardInterrupt
            self._signal = signum
            self.observer.message(f"{signal.Signals(signum).name}: stopping after step {self.ctx.step} "
                                  "(with a checkpoint); send it again to stop now")

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _stop_if_asked(self, step: int, record: dict[str, Any], saved: bool) -> None:
        """After a step: stop on a signal (any rank's), or after too many skipped updates in a row."""
        skipped = any(v for k, v in record.items() if k.startswith("update/nonfinite_skipped/"))
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        signum = dist.all_reduce_max(self._signal)
        too_many = self.skipped_in_a_row >= self.pipeline.max_skipped_steps
        if not signum and not too_many:
            return
        path = self.checkpoint(step) if not saved else self.out_dir / "checkpoints" / f"step_{step}"
        if too_many:
            raise NonFiniteUpdates(f"the last {self.skipped_in_a_row} steps each skipped their update for a non-finite "
                                   f"loss or gradient (max_skipped_steps={self.pipeline.max_skipped_steps}); saved the "
                                   f"last finite weights in {path}. Lower the learning rate, check the rewards, or "
                                   f"resume with --resume {self.out_dir}")
        self.observer.message(f"stopped after step {step}; saved {path} — continue with --resume {self.out_dir}")
        raise Stopped(signum)

    def _phase_end(self, step: int, record: dict[str, Any]) -> list[dict[str, Any]]:
        """At the last step of a phase (e.g. value pretraining, which ends after its stated
        number of steps): how well each trained critic fits by then, its explained variance
        on that step's batch, said and kept for the summary."""
        ended = [(i, ph) for i, ph in enumerate(self.pipeline.phases) if step == ph.start + ph.steps]
        out = []
        for i, ph in ended:
            figures = {k: v for k, v in record.items() if k.endswith("explained_variance")}
            out.append({"phase": i, "steps": [ph.start + 1, step], "train": ph.train, **figures})
            shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items()) or "no explained variance logged"
            self.observer.message(f"phase {i} (steps {ph.start + 1}-{step}, trains {', '.join(ph.train)}) ended: {shown}")
        return out

    def _experience_runners(self) -> list:
        return [self.runners[n.name] for n in self.graph.experience_order()]

    def experience(self) -> tuple[Batch, Timings, dict[str, float]]:
        """One batch through the experience nodes (with the refill rounds of a filter that
        refills); the metrics of every rank, combined."""
        order = self._experience_runners()
        times, metrics = Timings(), {}
        refilling = [r for r in order if hasattr(r, "refill") and r.refill(self.pipeline.data.batch_size)]
        if not refilling:
            if self.ahead is not None:
                batch = self._next_rollout(times, metrics)
                order = [r for r in order if r is not self.ahead.runner]
            else:
                batch = self.data.next()
            return self._run_stages(order, batch, times, metrics), times, dist.reduce_metrics(metrics)
        f = refilling[0]
        upstream = self.graph.upstream(f.spec.name)
        head = [r for r in order if r.spec.name in upstream]
        tail = [r for r in order if r.spec.name not in upstream and r is not f]
        batch = self._refill(f, head, times, metrics)
        for r in tail:
            batch = self._run_node(r, batch, times, metrics)
        return batch, times, dist.reduce_metrics(metrics)

    def _refill(self, f, head: list, times: Timings, metrics: dict) -> Batch:
        """Fresh prompts through ``head`` and the filter ``f`` until it has kept its target
        (groups counted over all ranks, so every rank runs as many rounds); with several
        processes the kept groups of all ranks are cut to the target and shared out again."""
        plan = f.refill(self.pipeline.data.batch_size)
        kept: list[Batch] = []
        rounds = groups = 0
        while groups < plan.target_groups:
            if rounds >= plan.max_rounds:
                if plan.allow_short and groups:
                    metrics["filter/short_batch"] = 1.0
                    self.observer.message(f"step {self.ctx.step}: {f.spec.name} kept {groups} of {plan.target_groups} "
                                          f"groups in {rounds} rounds; training on a short batch (allow_short=True)")
                    break
                self._agreed = True  # the rounds are counted over all ranks: every rank raises here
                raise RefillError(f"{f.spec.name}: {groups} of {plan.target_groups} groups kept after {rounds} rounds "
                                  f"(max_rounds={plan.max_rounds}); raise max_rounds, lower target_groups, or set allow_short=True")
            rounds += 1
            batch = self.data.next()
            for r in head + [f]:
                batch = self._run_node(r, batch, times, metrics)  # reward/*: every sample of every round
            kept.append(batch)
            groups += int(dist.all_reduce_sum(torch.tensor(len(batch.groups()))))
        metrics.update({"filter/rounds": float(rounds), "filter/groups_kept": float(groups)})
        batch = Batch.cat(kept) if any(len(b) for b in kept) else kept[-1]
        if dist.world_size() == 1:
            return f.truncate(batch, plan.target_groups)
        every = f.truncate(self._every_rank(batch), plan.target_groups)  # the groups one process would keep
        ids = every.groups()
        mine = share(len(ids), dist.rank(), dist.world_size())
        return every.take_groups(ids[mine.start:mine.stop])  # shared out again: no rank is left without rows

    @staticmethod
    def _every_rank(batch: Batch) -> Batch:
        """The rows of every rank (on the CPU), groups in global order: group ids are global
        and grow with the data order."""
        cpu = Batch({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.columns.items()}, meta=batch.meta)
        parts = dist.gathered(cpu)
        whole = Batch.cat(parts) if any(len(b) for b in parts) else cpu
        return whole.take_groups(sorted(whole.groups()))

    def _run_stages(self, order: list, batch: Batch, times: Timings, metrics: dict) -> Batch:
        """The experience runners of ``order``, stage by stage (``graph.stages()``: no path between
        the nodes of a stage); the nodes of a stage that can run at once (``graph.together``) do,
        in one process only (a node's forwards may be collective), the others one after the other."""
        early = self.graph.early_forward()
        for i, stage in enumerate(self.graph.stages()):
            if i == early:
                self._start_early(batch)
            group = [r for r in order if r.spec.name in stage]
            at_once = self.graph.together([r.spec.name for r in group]) if dist.world_size() == 1 else []
            together = [r for r in group if r.spec.name in at_once]
            if together:
                batch = self._run_together(together, batch, times, metrics)
            for r in group:
                if r not in together:
                    batch = self._run_node(r, batch, times, metrics)
                if dist.all_reduce_max(len(batch)) == 0:  # filters kept nothing on any rank
                    return batch
        return batch

    def _start_early(self, batch: Batch) -> None:
        """The update's first forward, in a thread, on the micro-batch the update will make
        (rlflow.overlap.EarlyForward), when ``batch`` is final for it (``graph.early_forward``):
        in one process, on a CPU (on one GPU both forwards would queue on its one stream)."""
        by_model = self._loss_runners()
        if len(by_model) != 1 or dist.world_size() > 1 or not len(batch):
            return
        (model, runners), = by_model.items()
        worker = self.workers[model]
        if getattr(worker.device, "type", "cpu") != "cpu":
            return
        mini = batch.take_groups(sorted(batch.groups()))  # update(): one mini-batch of every group, in order
        micro = runners[0].inputs(self._micro_batches(worker, mini)[0], self.ctx)
        self._early = EarlyForward(worker, runners[0], micro, {r.needs for r in runners})

    def _drop_early(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            early.close()

    def _run_together(self, group: list, batch: Batch, times: Timings, metrics: dict) -> Batch:
        """Nodes of one stage at once, each on its own view of ``batch`` (rlflow.overlap); their
        new columns, times and metrics merged in the stage's order, so the result does not
        depend on which finished first."""
        views = [Batch(dict(batch.columns), batch.meta) for _ in group]
        with ThreadPoolExecutor(len(group), thread_name_prefix="rlflow-node") as pool:
            futures = [in_thread(pool, self._call_node, r, v) if r.concurrency == "thread" else None
                       for r, v in zip(group, views)]
            done = [None if f is not None else self._call_node(r, v) for r, v, f in zip(group, views, futures)]
            done = [d if f is None else f.result() for d, f in zip(done, futures)]
        for r, v, (out, failed, seconds, positions) in zip(group, views, done):
            self._agree(r, failed)
            new = self._merge(r, v, out, seconds, positions, times, metrics)
            batch.columns.update({k: c for k, c in new.columns.items() if batch.columns.get(k) is not c})
        devices = [self.workers[m].device for r in group for m in r.spec.model_refs().values() if m in self.workers]
        return batch.to(devices[-1]) if devices else batch  # one device, as when the nodes run one after the other

    def _next_rollout(self, times: Timings, metrics: dict) -> Batch:
        """``Pipeline.rollout_ahead``: this step's samples from the rollout started during the last
        update (the first step's started now), the next rollout started from the weights this
        batch trains from, then the Generate node's ``finish`` (old log-probs from those weights)."""
        a = self.ahead
        stale = a.future is not None
        if not stale:
            a.launch(self.data.next(), self.ctx)
        t0 = time.perf_counter()
        rows, m, seconds, positions = a.take()
        metrics.update({**m, "timing_s/rollout_wait": time.perf_counter() - t0, "rollout/staleness": float(stale)})
        a.launch(self.data.next(), self.ctx)
        times.add(a.runner.spec.name, seconds, 0, 0, positions)  # the rollout's own time, overlapped with the last update
        return self._run_node(a.runner, rows, times, metrics, call=a.runner.finish)

    def _run_node(self, r, batch: Batch, times: Timings, metrics: dict, call=None) -> Batch:
        """Runs node ``r`` (or ``call``, a part of it) on ``batch``; every rank learns whether
        any failed, and all raise together; the node's batch, its time and metrics recorded."""
        out, failed, seconds, positions = self._call_node(r, batch, call)
        self._agree(r, failed)
        return self._merge(r, batch, out, seconds, positions, times, metrics)

    def _call_node(self, r, batch: Batch, call=None) -> tuple:
        """``(out, failure, seconds, positions)`` of one run of a node in this process alone."""
        t0 = time.perf_counter()
        ctx = replace(self.ctx, positions=Positions())  # this run's own count of computed positions
        try:
            with self._autocast(r.spec):
                return (call or r.run)(batch, ctx), None, time.perf_counter() - t0, ctx.positions
        except Exception as e:  # noqa: BLE001 - raised by _agree, on every rank
            return None, e, time.perf_counter() - t0, ctx.positions

    def _agree(self, r, failed: Optional[Exception]) -> None:
        culprit = dist.all_reduce_max(dist.rank() + 1 if failed else 0)  # ranks agree a node failed
        if culprit:
            self._agreed = True  # every rank raises here: they can save the rescue checkpoint together
            raise failed or PeerFailure(f"process {culprit - 1} failed in node {r.spec.name!r} at step {self.ctx.step}")

    @staticmethod
    def _merge(r, batch: Batch, out, seconds: float, positions, times: Timings, metrics: dict) -> Batch:
        batch, m = out if isinstance(out, tuple) else (batch, out)  # a node may replace the batch
        n_tokens = tokens(batch) if r.spec.model_refs() else 0  # tokens a model read
        times.add(r.spec.name, seconds, len(batch), n_tokens, positions)
        for k, v in (m or {}).items():  # a node run again (refill rounds) adds to its Means and Sums
            metrics[k] = dist.combine([metrics[k], v]) if k in metrics and dist.adds_up(v) else v
        return batch

    def _autocast(self, spec):
        """The autocast contexts of the models a node runs (Model precision, ``Worker.autocast``)."""
        stack = ExitStack()
        for name in spec.model_refs().values():
            if name in self.workers:
                stack.enter_context(self.workers[name].autocast(training=False))  # experience: no backward
        return stack

    # --- update ------------------------------------------------------------------------------
    def _loss_runners(self) -> dict[str, list]:
        """Model name -> the Loss runners on it, for the models that learn at this step."""
        by_model: dict[str, list] = {}
        for n in self.pipeline.nodes:
            if n.stage == "update" and self.pipeline.training(n.model, self.ctx.step):
                by_model.setdefault(n.model, []).append(self.runners[n.name])
        return by_model

    def update(self, batch: Batch, times: Optional[Timings] = None) -> dict[str, float]:
        """``ppo_epochs`` x mini-batches; one optimizer step per mini-batch and trained model.

        The mini-batches are planned over the groups of all ranks with the engine's generator
        (the same on every rank), so they are those one process would make; each rank trains
        on its own rows of each (possibly none: it then takes part with an idle pass)."""
        p, times = self.pipeline, times if times is not None else Timings()
        by_model = self._loss_runners()
        if not by_model:
            return {}
        sums: dict[str, list] = {}
        groups = sorted(g for ids in dist.gathered(batch.groups()) for g in ids)
        shuffle = p.mini_batches > 1 or p.ppo_epochs > 1
        self._idle = batch.select([0])  # a row for the idle passes of a rank without rows in a mini-batch
        for _ in range(p.ppo_epochs):
            for ids in mini_batch_groups(groups, p.mini_batches, self.generator if shuffle else None):
                mini = batch.take_groups(ids)
                for model, runners in by_model.items():
                    t0, positions = time.perf_counter(), Positions()
                    m = self._train_model(self.workers[model], runners, mini, positions)
                    for k, v in m.items():
                        sums.setdefault(k, []).append(v)
                    # the node's time includes its forward when it ran early, beside the experience
                    seconds = time.perf_counter() - t0 + float(m.get("timing_s/early_forward", 0.0))
                    times.add("+".join(r.spec.name for r in runners), seconds, len(mini), tokens(mini), positions)
        out = {k: dist.combine(v) for k, v in sums.items()}
        out.update({f"lr/{model}": self.workers[model].lr() for model in by_model})
        for r in (r for runners in by_model.values() for r in runners):  # e.g. an adaptive KL coefficient moves
            if hasattr(r, "after_update"):
                out.update(r.after_update(batch))
        return dist.reduce_metrics(out)

    def _train_model(self, worker: Worker, runners: list, mini: Batch, positions: Optional[Positions] = None) -> dict:
        """One optimizer step of ``worker`` on a mini-batch: gradients accumulated over its
        micro-batches; each term's denominators are the whole mini-batch's (all ranks). Every
        rank makes as many forward/backward passes (DeepSpeed's gradient reductions are
        collective): one with fewer micro-batches adds idle passes whose loss is 0. A
        non-finite loss on any rank (or a non-finite gradient norm) skips the step on every rank."""
        counts = [r.counts(mini) for r in runners]
        needs = {r.needs for r in runners}
        micros = self._micro_batches(worker, mini)
        passes = dist.all_reduce_max(len(micros))
        metrics: dict[str, list] = {}
        bad = False
        for i in range(passes):
            if i < len(micros):
                total = self._micro_loss(worker, runners, counts, needs, micros[i], metrics, positions)
            else:
                total = self._idle_loss(worker, runners[0], needs)
            finite = bool(torch.isfinite(total.detach()).all())
            bad = bad or not finite
            # DeepSpeed averages gradients over ranks; the loss is already a global mean
            worker.backward((total if finite else worker.zero_loss()) * dist.world_size(), last=i == passes - 1)
        norm, skipped = worker.step(skip=dist.all_reduce_max(int(bad)) > 0)
        self._stepped = self._stepped or not skipped
        out = {k: dist.combine(v) for k, v in metrics.items()}
        out[f"update/nonfinite_skipped/{worker.name}"] = float(skipped)
        if norm is not None:
            out[f"grad_norm/{worker.name}"] = norm
        return out

    @staticmethod
    def _micro_batches(worker: Worker, mini: Batch) -> list[Batch]:
        """The micro-batches of ``worker``'s forward/backward passes over a mini-batch."""
        return mini.split(worker.spec.micro_batch_size or len(mini)) if len(mini) else []

    def _micro_loss(self, worker: Worker, runners: list, counts: list, needs: set, micro: Batch, metrics: dict,
                    positions: Optional[Positions] = None):
        """The summed terms of ``runners`` on one micro-batch (one forward); their metrics go to ``metrics``."""
        micro = runners[0].inputs(micro, self.ctx)
        early, self._early = self._early, None
        taken = early.take(worker, micro) if early is not None else None  # (gives the kernel switch back first)
        if taken is not None:
            outs, done, seconds = taken
            if positions is not None:
                positions.add(done.computed, done.useful)
            metrics.setdefault("timing_s/early_forward", []).append(seconds)
        else:
            with worker.autocast():  # the forward only; the loss maths and the backward run outside it
                outs = runners[0].outputs(worker, micro, needs, positions)
        cols = {**micro.tensors(), **outs}
        total = 0.0
        for r, c in zip(runners, counts):
            term = r.term(cols, c)
            total = total + term.loss
            for k, v in term.metrics.items():
                metrics.setdefault(k, []).append(v)
        return total

    def _idle_loss(self, worker: Worker, runner, needs: set):
        """A loss of exactly 0 from a real forward (of one row of this step's batch): its
        backward reaches every parameter the forward used, as on the ranks with rows."""
        row = runner.inputs(self._idle, self.ctx)
        with worker.autocast():
            outs = runner.outputs(worker, row, needs)
        return sum((out.float() * 0.0).sum() for out in outs.values())

    # --- evaluation, checkpoints -----------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        figures = self.evaluator()
        self.observer.evaluated(step, figures)
        return figures

    def _rng_state(self) -> dict[str, Any]:
        """The random, data and node-runner state of this moment (runners with a ``state_dict``,
        e.g. an adaptive KL coefficient, give a JSON-able dict; empty ones are left out)."""
        nodes = {name: r.state_dict() for name, r in self.runners.items() if hasattr(r, "state_dict")}
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state(), "data": self.data.state(),
                "nodes": {name: st for name, st in nodes.items() if st}}

    def _rescue(self, step: int, rng: dict[str, Any]) -> None:
        """After a failure before the update of step ``step + 1``: the models are exactly
        as step ``step`` left them, so write that checkpoint (with the random and data
        state of that moment) and say how to continue. With several processes every rank is
        here together (a node's failure is agreed, :meth:`_run_node`) and writes its part."""
        if step < 1 or step == self.start_step:
            return
        try:
            path = self.checkpoint(step, rng)
            self.observer.message(f"stopped during step {step + 1}; saved {path} — continue with --resume {self.out_dir}")
        except Exception as e:  # the original failure matters more
            self.observer.message(f"could not save a checkpoint after the failure: {e}")

    def checkpoint(self, step: int, rng: Optional[dict[str, Any]] = None) -> Path:
        """checkpoints/step_N: weights, optimizer state, RNG and data position."""
        return checkpoint.save(self.out_dir, step, self.workers, rng or self._rng_state())

    def resume(self, path: Optional[Path] = None) -> int:
        """Continue from ``path`` (default: the latest checkpoint of this run's directory):
        weights, optimizer and scheduler state, RNG state and data position, so that the
        remaining steps are the ones the uninterrupted run would have taken."""
        path = path or checkpoint.latest(self.out_dir, say=self.observer.message)
        state = checkpoint.load(path, self.workers)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        self.data.load_state(state["data"])
        for name, node_state in state.get("nodes", {}).items():
            if name in self.runners:
                self.runners[name].load_state_dict(node_state)
        self.start_step = state["step"]
        self.records.truncate(self.start_step)
        before = self.out_dir / "eval_before.json"
        self.resumed_eval = json.loads(before.read_text()) if before.exists() else {}
        self.observer.message(f"resumed from {path} (step {self.start_step})")
        return self.start_step

    def save_final(self) -> None:
        """final/: the policy as a directory ``from_pretrained`` loads; other trained models in final-<name>/."""
        checkpoint.save_final(self.out_dir, self.workers, self.policy)

    def close(self) -> None:
        if getattr(self, "ahead", None) is not None:
            self.ahead.close()
            self.ahead = None
        if self.records:
            self.records.close()
        pool = getattr(getattr(self, "ctx", None), "rule_pool", None)
        if pool is not None:
            pool.close()
        if self.lock:
            self.lock.release()
            self.lock = None
