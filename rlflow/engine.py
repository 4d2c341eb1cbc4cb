"""The runtime: places the models, runs the graph iteration by iteration, records it all.

One iteration (DESIGN.md "Execution"):
1. experience: a batch of prompts flows through the experience nodes in graph order
   (Generate, Score, RefLogprob, Value, Advantage, Filter). A Filter with a target
   makes the engine re-run the nodes upstream of it on fresh prompts until enough
   groups survive (bounded rounds).
2. update: ``ppo_epochs`` x ``mini_batches``; for each trainable model, every Loss
   term on it is computed per micro-batch and summed, gradients accumulate over the
   micro-batches, and the model takes one optimizer step per mini-batch. Denominators
   of the aggregation come from the whole mini-batch (ALGORITHMS.md Part A §3).

The engine emits events to an observer (the terminal view) and writes
``config.json``, ``metrics.jsonl``, ``samples.jsonl``, checkpoints and ``final/``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from rlflow import dist
from rlflow.batch import Batch
from rlflow.data import DataStream, load_rows
from rlflow.graph import PipelineGraph
from rlflow.models import Worker, atomic_dir, place
from rlflow.node import RUNNERS, Context
from rlflow.spec import LossSpec, Pipeline

import rlflow.nodes.advantage  # noqa: F401,E402  (each import registers a node runner)
import rlflow.nodes.filter  # noqa: F401
import rlflow.nodes.generate  # noqa: F401
import rlflow.nodes.ref_logprob  # noqa: F401
import rlflow.nodes.score  # noqa: F401
import rlflow.nodes.value  # noqa: F401


class RefillError(RuntimeError):
    """Dynamic sampling ran out of rounds before keeping enough groups."""


class ResumeError(Exception):
    """A run directory that cannot be resumed (reported without a traceback)."""


class Observer:
    """Receives the engine's events. The default prints nothing."""

    def message(self, text: str) -> None: ...
    def start(self, run: "Run") -> None: ...
    def step(self, step: int, record: dict[str, Any]) -> None: ...
    def evaluated(self, step: int, figures: dict[str, float]) -> None: ...
    def end(self, summary: dict[str, Any]) -> None: ...


@dataclass
class NodeTime:
    seconds: float
    rows: int
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 6), "rows": self.rows, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else 0.0}


def _add_time(times: dict[str, NodeTime], key: str, seconds: float, rows: int, tokens: int) -> None:
    """Add one run of ``key`` to the step's timings (a node may run several times a step:
    dynamic-sampling refill rounds, mini-batches, epochs)."""
    prev = times.get(key) or NodeTime(0.0, 0, 0)
    times[key] = NodeTime(prev.seconds + seconds, prev.rows + rows, prev.tokens + tokens)


def _state_file(rank: int) -> str:
    return "state.pt" if rank == 0 else f"state.rank{rank}.pt"


def _masked(cols: dict[str, Any], mask: str) -> dict[str, Any]:
    """The columns a loss sees: its own mask column stands in for ``response_mask``."""
    return cols if mask == "response_mask" else {**cols, "response_mask": cols[mask]}


def _tokens(batch: Batch) -> int:
    return int(batch["response_mask"].sum().item()) if "response_mask" in batch else 0


def train_pipeline(pipeline: Pipeline, out_dir: Path) -> Path:
    """Run ``pipeline`` to the end in ``out_dir``, quietly; the directory of its final model.

    Model providers receive this as ``train`` (``rlflow.provider.Train``) to build a model
    by training (``builtin:tiny-arith`` runs ``pipelines/sft.py``) without importing the engine.
    """
    from rlflow.graph import build

    run = Run(pipeline, build(pipeline), out_dir)
    run.setup()
    run.train()
    return out_dir / "final"


@dataclass
class Run:
    """A run of a pipeline: its models, its data, its outputs."""

    pipeline: Pipeline
    graph: PipelineGraph
    out_dir: Path
    observer: Observer = field(default_factory=Observer)
    workers: dict[str, Worker] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0  # the last step done before this process started (resume)
    resumed_eval: dict[str, float] = field(default_factory=dict)
    _eval_cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    # --- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        from rlflow.models import setup_distributed

        p = self.pipeline
        setup_distributed()
        torch.manual_seed(p.seed)
        random.seed(p.seed)
        self.generator = torch.Generator().manual_seed(p.seed + 7919 * dist.rank())  # ranks sample differently
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if dist.rank() == 0:
            (self.out_dir / "config.json").write_text(json.dumps(p.to_config(), indent=2) + "\n")
        tokenizers: dict[str, Any] = {}
        for name, spec in p.models.items():
            t0 = time.perf_counter()
            self.workers[name] = place(name, spec, train=train_pipeline, on_build=self.observer.message, shared=tokenizers)
            kind = "trainable" if spec.train else "frozen"
            self.observer.message(f"placed {name} ({spec.path}, {kind}, head={spec.head}, ZeRO-{spec.zero_stage}, "
                                  f"{spec.precision}) in {time.perf_counter() - t0:.1f}s")
        self.policy = self._policy_name()
        self.tokenizer = self.workers[self.policy].tokenizer if self.policy else next(iter(self.workers.values())).tokenizer
        self.data = DataStream(p.data, self.tokenizer, seed=p.seed, rank=dist.rank(), world=dist.world_size())
        self.runners = {n.name: RUNNERS[n.kind](n) for n in p.nodes if n.stage == "experience"}
        self.ctx = Context(workers=self.workers, graph=self.graph, generator=self.generator)
        self.metrics_file = (self.out_dir / "metrics.jsonl").open("a") if dist.rank() == 0 else None
        self.samples_file = (self.out_dir / "samples.jsonl").open("a") if dist.rank() == 0 else None
        self.observer.start(self)

    def _policy_name(self) -> Optional[str]:
        gen = self.graph.generate()
        if gen is not None:
            return gen.model
        trained = [n for n, m in self.pipeline.models.items() if m.train and m.head == "lm"]
        return trained[0] if trained else None

    # --- the loop --------------------------------------------------------------------------
    def train(self, steps: Optional[int] = None) -> dict[str, Any]:
        steps = steps or self.pipeline.steps
        every = self.pipeline.eval.every if self.pipeline.eval else 0
        before = self.resumed_eval if self.start_step else self.evaluate(0)
        if dist.rank() == 0 and not self.start_step:
            (self.out_dir / "eval_before.json").write_text(json.dumps(before) + "\n")
        started = time.perf_counter()
        for step in range(self.start_step + 1, steps + 1):
            self.ctx.step = step
            t0 = time.perf_counter()
            rng_before = self._rng_state()
            try:
                batch, times, exp_metrics = self.experience()
            except BaseException:  # a failing rule, Ctrl-C, ...: keep what the finished steps learned
                self._rescue(step - 1, rng_before)
                raise
            # every rank takes the same number of optimizer steps: all update, or none does
            if dist.all_reduce_min(len(batch)) > 0:
                upd_metrics = self.update(batch, times)
            else:
                upd_metrics = {"update/skipped": 1.0}
                self.observer.message(f"step {step}: the filters kept no rows (on some rank); no update this step")
            record = self._record(step, batch, times, {**exp_metrics, **upd_metrics}, time.perf_counter() - t0)
            if every and step % every == 0 and step != steps:
                record.update(self.evaluate(step))
            self._write(record, batch)
            self.observer.step(step, record)
            if self.pipeline.save_every and step % self.pipeline.save_every == 0:
                self.checkpoint(step)
        after = self.evaluate(steps)
        self.save_final()
        summary = self._summary(before, after, time.perf_counter() - started)
        if dist.rank() == 0:
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.observer.end(summary)
        self.close()
        return summary

    def experience(self) -> tuple[Batch, dict[str, NodeTime], dict[str, float]]:
        """One batch through the experience nodes (with Filter refill rounds)."""
        order = self.graph.experience_order()
        filters = [n for n in order if n.kind == "filter" and getattr(n, "variant", "") == "dynamic"]
        times: dict[str, NodeTime] = {}
        metrics: dict[str, float] = {}
        if not filters:
            batch = self.data.next()
            for node in order:
                batch = self._run_node(node, batch, times, metrics)
                if not len(batch):  # a filter kept nothing: nothing more to compute this step
                    break
            return batch, times, metrics
        f = filters[0]
        target = f.target_groups or self.pipeline.data.batch_size
        before = self.graph.upstream(f.name)
        head = [n for n in order if n.name in before]
        tail = [n for n in order if n.name not in before and n.name != f.name]
        kept: list[Batch] = []
        rounds = groups = 0
        seen = 0.0
        reward_means: list[float] = []
        while groups < target:
            if rounds >= f.max_rounds:
                if f.allow_short and groups:
                    metrics["filter/short_batch"] = 1.0
                    self.observer.message(f"step {self.ctx.step}: {f.name} kept {groups} of {target} groups in {rounds} rounds; "
                                          "training on a short batch (allow_short=True)")
                    break
                raise RefillError(f"{f.name}: {groups} of {target} groups kept after {rounds} rounds "
                                  f"(max_rounds={f.max_rounds}); raise max_rounds, lower target_groups, or set allow_short=True")
            rounds += 1
            batch = self.data.next()
            for node in head:
                batch = self._run_node(node, batch, times, metrics)
            batch = self._run_node(f, batch, times, metrics)
            seen += metrics["filter/groups_seen"]
            if "reward/mean" in metrics:
                reward_means.append(metrics["reward/mean"])
            kept.append(batch)
            groups += int(torch.unique(batch["group"]).numel()) if len(batch) else 0
        batch = self.runners[f.name].truncate(Batch.cat(kept), target)
        metrics["filter/rounds"] = float(rounds)
        metrics["filter/groups_seen"] = seen  # over every round
        metrics["filter/keep_frac"] = groups / max(seen, 1.0)
        if reward_means:  # every sample scored, over every round (rounds have equal sizes)
            metrics["reward/mean"] = sum(reward_means) / len(reward_means)
        metrics["filter/groups_kept"] = float(groups)
        for node in tail:
            batch = self._run_node(node, batch, times, metrics)
        return batch, times, metrics

    def _run_node(self, node, batch: Batch, times: dict[str, NodeTime], metrics: dict[str, float]) -> Batch:
        t0 = time.perf_counter()
        out = self.runners[node.name].run(batch, self.ctx)
        if isinstance(out, tuple):  # a node that replaces the batch (Generate, Filter)
            batch, m = out
        else:
            m = out
        tokens = _tokens(batch) if node.kind in ("generate", "ref_logprob", "value") else 0
        _add_time(times, node.name, time.perf_counter() - t0, len(batch), tokens)
        metrics.update(m or {})
        return batch

    # --- update ------------------------------------------------------------------------------
    def update(self, batch: Batch, times: dict[str, NodeTime]) -> dict[str, float]:
        from rlflow.nodes.loss import LOSSES
        from rlflow.nodes.masked import count

        p = self.pipeline
        losses_of: dict[str, list[LossSpec]] = {}
        for n in self.graph.loss_nodes():
            if self._trains(n.model):
                losses_of.setdefault(n.model, []).append(n)
        if not losses_of:
            return {}
        sums: dict[str, list[float]] = {}
        temperature = batch.meta.get("temperature", 1.0)
        # as many mini-batches as asked, but never more than any rank has groups (equal step counts)
        n_groups = int(torch.unique(batch["group"]).numel()) if "group" in batch else len(batch)
        parts = dist.all_reduce_min(min(p.mini_batches, n_groups))
        constant = self._agg_constant()
        for epoch in range(p.ppo_epochs):
            shuffled = batch.shuffle_groups(self.generator) if (p.mini_batches > 1 or p.ppo_epochs > 1) else batch
            for mini in shuffled.chunk(parts):
                for model, nodes in losses_of.items():
                    worker = self.workers[model]
                    t0 = time.perf_counter()
                    counts = {}
                    for n in nodes:
                        v = LOSSES[n.variant]
                        c = n.agg_constant if getattr(n, "agg_constant", None) else constant
                        counts[n.name] = count(v.mask(_masked(mini.columns, n.mask), n.fn_params()), mini.get("group"), constant=c)
                    micros = mini.split(worker.spec.micro_batch_size or len(mini))
                    for i, micro in enumerate(micros):
                        outputs = self._forward(worker, micro, {LOSSES[n.variant].needs for n in nodes}, temperature)
                        cols = {**micro.tensors(), **outputs}
                        total = 0.0
                        for n in nodes:
                            term = LOSSES[n.variant].fn(_masked(cols, n.mask), counts[n.name], **n.fn_params())
                            total = total + n.coef * term.loss
                            for k, val in term.metrics.items():
                                sums.setdefault(k, []).append(float(val))
                        # DeepSpeed averages gradients over ranks; the loss is already a global mean
                        worker.backward(total * dist.world_size(), last=i == len(micros) - 1)
                    norm = worker.step()
                    if norm is not None:
                        sums.setdefault(f"grad_norm/{model}", []).append(norm)
                    _add_time(times, "+".join(n.name for n in nodes), time.perf_counter() - t0, len(mini), _tokens(mini))
        out = {k: sum(v) / len(v) for k, v in sums.items()}
        for model in losses_of:
            out[f"lr/{model}"] = self.workers[model].lr()
        return out

    def _trains(self, model: str) -> bool:
        return self.pipeline.training(model, self.ctx.step)

    def _agg_constant(self) -> float:
        gen = self.graph.generate()
        return float(gen.max_new_tokens) if gen else 1.0

    def _forward(self, worker: Worker, micro: Batch, needs: set[str], temperature: float) -> dict[str, torch.Tensor]:
        from rlflow.forward import response_logprobs, response_values, sequence_scores

        args = (micro["prompt_ids"], micro["prompt_mask"], micro["response_ids"], micro["response_mask"])
        out: dict[str, torch.Tensor] = {}
        if "logprobs" in needs:
            out["logprobs"] = response_logprobs(worker.engine, *args, temperature=temperature)
        if "values" in needs:
            out["new_values"] = response_values(worker.engine, *args)
        if "scores" in needs:
            out["scores"] = sequence_scores(worker.engine, *args)
        return out

    # --- evaluation, records, outputs -----------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out figures: the policy's greedy accuracy under the task rule, and on
        preference data the policy's and any reward model's pairwise accuracy."""
        ev = self.pipeline.eval
        if ev is None:
            return {}
        rows = self._eval_rows(self.pipeline.data)
        if not rows:
            return {}
        rows = rows[: ev.size]
        spec = self.pipeline.data
        out: dict[str, float] = {}
        rule = self._eval_rule()
        if self.policy is not None and rule is not None and any("answer" in r for r in rows[:1]):
            from rlflow.forward import greedy_accuracy

            worker = self.workers[self.policy]
            gen = self.graph.generate()
            max_new = ev.max_new_tokens or (gen.max_new_tokens if gen else 16)
            out["eval/accuracy"] = greedy_accuracy(worker.module, worker.tokenizer, [r[spec.prompt_field] for r in rows],
                                                   [str(r["answer"]) for r in rows], rule, max_new_tokens=max_new)
        if spec.kind == "pairs":
            out.update(self._pair_accuracy(spec, rows))
        elif ev.pairs:
            from rlflow.spec import Pairs

            pairs_spec = Pairs(ev.pairs, eval_source=ev.pairs if not ev.pairs.startswith("builtin:") else None)
            out.update(self._pair_accuracy(pairs_spec, (self._eval_rows(pairs_spec) or [])[: ev.size]))
        self.observer.evaluated(step, out)
        return out

    def _eval_rows(self, spec) -> Optional[list[dict]]:
        """The held-out rows of ``spec``, read once per run."""
        key = (spec.kind, spec.source, spec.eval_source)
        if key not in self._eval_cache:
            self._eval_cache[key] = load_rows(spec, "eval")
        return self._eval_cache[key]

    @torch.no_grad()
    def _pair_accuracy(self, spec, rows: list[dict]) -> dict[str, float]:
        """Fraction of held-out pairs ranked chosen > rejected: by summed log-prob for the
        policy, by score for every trained reward model."""
        from rlflow.data import make_batch
        from rlflow.forward import response_logprobs, sequence_scores

        out: dict[str, float] = {}
        if not rows:
            return {}
        b = make_batch(spec, rows, self.tokenizer)
        args = (b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
        if self.policy is not None:
            lp = response_logprobs(self.workers[self.policy].module, *args).sum(-1)  # [2P]: chosen, rejected, ...
            out["eval/preference_accuracy"] = float((lp[0::2] > lp[1::2]).float().mean())
        for name, w in self.workers.items():
            if w.spec.head == "reward" and w.trainable:
                s = sequence_scores(w.module, *args)
                out[f"eval/rm_accuracy/{name}"] = float((s[0::2] > s[1::2]).float().mean())
        return out

    def _eval_rule(self):
        from rlflow.builtin import eval_rule

        return eval_rule(self.pipeline)  # Eval.rule, else the first Score rule, else the data provider's

    def _record(self, step: int, batch: Batch, times: dict[str, NodeTime], metrics: dict[str, float], seconds: float) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": step, "seconds": round(seconds, 4), "rows": len(batch)}
        if "response_mask" in batch and len(batch):  # of the rows trained on (after any filter)
            rec["response_length/mean"] = float(batch["response_mask"].sum(-1).float().mean())
        if "truncated" in batch and len(batch):
            rec["truncated/frac"] = float(batch["truncated"].float().mean())
        rec.update({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()})
        rec["nodes"] = {k: t.as_dict() for k, t in times.items()}
        return rec

    def _write(self, record: dict[str, Any], batch: Batch, n_samples: int = 4) -> None:
        self.history.append(record)
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.samples_file and "response" in batch:
            for i in range(min(n_samples, len(batch))):
                s = {"step": record["step"], "prompt": batch["prompt"][i], "response": batch["response"][i]}
                if "answer" in batch:
                    s["answer"] = batch["answer"][i]
                if "rewards" in batch:
                    s["reward"] = float(batch["rewards"][i])
                self.samples_file.write(json.dumps(s) + "\n")
            self.samples_file.flush()

    def _rng_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state(), "data": self.data.state()}

    def _rescue(self, step: int, rng: dict[str, Any]) -> None:
        """After a failure before the update of step ``step + 1``: the models are exactly
        as step ``step`` left them, so write that checkpoint (with the random and data
        state of that moment) and say how to continue. Single process only."""
        if step < 1 or step == self.start_step or dist.world_size() > 1:
            return
        try:
            path = self.checkpoint(step, rng)
            self.observer.message(f"stopped during step {step + 1}; saved {path} — continue with --resume {self.out_dir}")
        except Exception as e:  # the original failure matters more
            self.observer.message(f"could not save a checkpoint after the failure: {e}")

    def checkpoint(self, step: int, rng: Optional[dict[str, Any]] = None) -> Path:
        """checkpoints/step_N: weights, optimizer/DeepSpeed state, RNG and data position.

        Written under a temporary name and renamed, so a kill never leaves a broken one.
        """
        final = self.out_dir / "checkpoints" / f"step_{step}"
        final.parent.mkdir(parents=True, exist_ok=True)
        commit = None
        if dist.rank() == 0:
            tmp, commit = atomic_dir(final)
        dist.barrier()
        tmp = final.with_name(final.name + ".tmp")
        for name, w in self.workers.items():
            if w.trainable:
                w.save_pretrained(tmp / name)
                w.engine.save_checkpoint(str(tmp / name / "deepspeed"), tag="state")  # every rank its shard
        state = {"step": step, **(rng or self._rng_state())}
        torch.save(state, tmp / _state_file(dist.rank()))  # each rank its own random state
        dist.barrier()  # every rank has written before the rename
        if commit:
            commit()
        dist.barrier()
        return final

    def resume(self, checkpoint: Optional[Path] = None) -> int:
        """Continue from ``checkpoint`` (default: the latest in this run's directory):
        weights, optimizer and scheduler state, RNG state and data position, so that the
        remaining steps are the ones the uninterrupted run would have taken."""
        ckpts = self.out_dir / "checkpoints"
        if checkpoint is None:
            found = sorted(ckpts.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if ckpts.exists() else []
            found = [c for c in found if (c / "state.pt").exists()]
            if not found:
                raise ResumeError(f"no complete checkpoint in {ckpts} to resume from")
            checkpoint = found[-1]
        for name, w in self.workers.items():
            if w.trainable:
                w.engine.load_checkpoint(str(checkpoint / name / "deepspeed"), tag="state")
        if not (checkpoint / _state_file(dist.rank())).exists():
            raise ResumeError(f"{checkpoint} has no state for rank {dist.rank()}: resume with the number of processes it was written by")
        state = torch.load(checkpoint / _state_file(dist.rank()), weights_only=False)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        self.data.load_state(state["data"])
        self.start_step = state["step"]
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():  # keep the records up to the checkpoint, drop any written after it
            kept = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            self.history = [r for r in kept if r["step"] <= self.start_step]
            if dist.rank() == 0:
                self.metrics_file.close()
                metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                self.metrics_file = metrics.open("a")
        samples = self.out_dir / "samples.jsonl"
        if samples.exists() and dist.rank() == 0:
            kept_s = [x for x in samples.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= self.start_step]
            self.samples_file.close()
            samples.write_text("".join(x + "\n" for x in kept_s))
            self.samples_file = samples.open("a")
        before = self.out_dir / "eval_before.json"
        self.resumed_eval = json.loads(before.read_text()) if before.exists() else {}
        self.observer.message(f"resumed from {checkpoint} (step {self.start_step})")
        return self.start_step

    def save_final(self) -> None:
        """final/: the policy as a directory ``from_pretrained`` loads; other trained models in final-<name>/."""
        for name, w in self.workers.items():
            if not w.trainable:
                continue
            target = self.out_dir / ("final" if name == self.policy or len(self._trained()) == 1 else f"final-{name}")
            tmp, commit = atomic_dir(target) if dist.rank() == 0 else (target.with_name(target.name + ".tmp"), None)
            w.save_pretrained(tmp)
            dist.barrier()
            if commit:
                commit()

    def _trained(self) -> list[str]:
        return [n for n, w in self.workers.items() if w.trainable]

    def _summary(self, before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
        node_seconds: dict[str, list[float]] = {}
        for rec in self.history:
            for k, t in rec["nodes"].items():
                node_seconds.setdefault(k, []).append(t["seconds"])
        rewards = [r["reward/mean"] for r in self.history if "reward/mean" in r]
        k = max(1, min(10, len(rewards) // 5))
        return {
            "pipeline": self.pipeline.name,
            "steps": len(self.history),
            "seconds": round(seconds, 2),
            "eval_before": before,
            "eval_after": after,
            "reward/start": sum(rewards[:k]) / k if rewards else None,
            "reward/end": sum(rewards[-k:]) / k if rewards else None,
            "nodes": {n: {"total_s": round(sum(v), 3), "mean_s": round(sum(v) / len(v), 4)} for n, v in node_seconds.items()},
            "out_dir": str(self.out_dir),
        }

    def close(self) -> None:
        for f in (getattr(self, "metrics_file", None), getattr(self, "samples_file", None)):
            if f:
                f.close()
        self.metrics_file = self.samples_file = None
