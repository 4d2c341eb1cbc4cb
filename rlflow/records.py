"""What a run writes as it goes: per-node timings, ``metrics.jsonl``, ``samples.jsonl``, the summary.

One record per step: the step's wall seconds, rows, every node's timing (seconds, rows,
tokens, tokens/s; a node that runs several times a step — refill rounds, mini-batches,
epochs — adds up), and every metric the nodes returned. With several processes every
figure is global (``rlflow.dist.reduce_metrics``): rows, tokens and means over all ranks,
seconds of the slowest rank. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlflow.dist import Max, Mean, Metric, Sum

SAMPLES_PER_STEP = 4  # rows of each step written to samples.jsonl
REWARD_WINDOW_MAX = 10  # reward/start and reward/end average at most this many steps ...
REWARD_WINDOW_SHARE = 5  # ... and at most a fifth of the run


@dataclass
class NodeTime:
    """A node's work in one step. ``positions`` are the token positions its model forwards
    computed, ``useful`` those that held a real token (rlflow.packing.Positions); a node
    that runs no model has none."""

    seconds: float = 0.0
    rows: int = 0
    tokens: int = 0
    positions: int = 0
    useful: int = 0

    def add(self, seconds: float, rows: int, tokens: int, positions=None) -> None:
        self.seconds += seconds
        self.rows += rows
        self.tokens += tokens
        if positions is not None:
            self.positions += positions.computed
            self.useful += positions.useful

    @property
    def padding_frac(self) -> float:
        """The share of the computed positions that held no real token (0 without any)."""
        return round(1.0 - self.useful / self.positions, 4) if self.positions else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {"seconds": round(self.seconds, 6), "rows": self.rows, "tokens": self.tokens,
               "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else 0.0}
        if self.positions:
            out.update(positions=self.positions, useful_positions=self.useful, padding_frac=self.padding_frac)
        return out


class Timings(dict):
    """Node name -> :class:`NodeTime` for one step."""

    def add(self, key: str, seconds: float, rows: int, tokens: int, positions=None) -> None:
        self.setdefault(key, NodeTime()).add(seconds, rows, tokens, positions)

    def as_metrics(self) -> dict[str, Metric]:
        """Each node's seconds (Max: the slowest rank), rows, tokens and positions computed and
        useful (Sum: all ranks)."""
        out: dict[str, Metric] = {}
        for k, t in self.items():
            out.update({f"{k}{_SEP}seconds": Max(t.seconds), f"{k}{_SEP}rows": Sum(t.rows), f"{k}{_SEP}tokens": Sum(t.tokens),
                        f"{k}{_SEP}positions": Sum(t.positions), f"{k}{_SEP}useful": Sum(t.useful)})
        return out

    @classmethod
    def from_metrics(cls, flat: dict[str, float]) -> "Timings":
        """The Timings of :meth:`as_metrics` after reduction (keys of other metrics ignored)."""
        out = cls()
        for key, v in flat.items():
            if _SEP in key:
                node, part = key.split(_SEP)
                t = out.setdefault(node, NodeTime())
                setattr(t, part, v if part == "seconds" else int(v))
        return out


_SEP = "\x00"  # node name / field in Timings.as_metrics keys


def tokens(batch) -> int:
    """Response tokens in a batch (0 when it has none)."""
    return int(batch["response_mask"].sum().item()) if "response_mask" in batch else 0


def batch_stats(batch) -> dict[str, Metric]:
    """The rows trained on (after any filter), their mean response length and truncated share."""
    out: dict[str, Metric] = {"rows": Sum(len(batch))}
    if "response_mask" in batch and len(batch):
        out["response_length/mean"] = Mean(float(batch["response_mask"].sum()), float(len(batch)))
    if "truncated" in batch and len(batch):
        out["truncated/frac"] = Mean(float(batch["truncated"].float().sum()), float(len(batch)))
    return out


def step_record(step: int, stats: dict[str, float], times: Timings, metrics: dict[str, float]) -> dict[str, Any]:
    """The metrics.jsonl line of one step from global figures: ``stats`` (seconds and the
    :func:`batch_stats`), the node timings and the nodes' metrics."""
    rec: dict[str, Any] = {"step": step, "seconds": round(stats["seconds"], 4), "rows": int(stats["rows"])}
    rec.update({k: v for k, v in stats.items() if k not in rec and _SEP not in k})
    rec.update({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in metrics.items()})
    rec["nodes"] = {k: t.as_dict() for k, t in times.items()}
    return rec


def sample_lines(step: int, batch, n: int = SAMPLES_PER_STEP) -> list[dict[str, Any]]:
    """The first ``n`` rows of a batch as samples.jsonl lines."""
    if "response" not in batch:
        return []
    out = []
    for i in range(min(n, len(batch))):
        s = {"step": step, "prompt": batch["prompt"][i], "response": batch["response"][i]}
        if "answer" in batch:
            s["answer"] = batch["answer"][i]
        if "rewards" in batch:
            s["reward"] = float(batch["rewards"][i])
        out.append(s)
    return out


class Records:
    """The run's history and its two append-only files (rank 0 only writes)."""

    def __init__(self, out_dir: Path, writer: bool):
        self.out_dir = out_dir
        self.history: list[dict[str, Any]] = []
        self.metrics_file = (out_dir / "metrics.jsonl").open("a") if writer else None
        self.samples_file = (out_dir / "samples.jsonl").open("a") if writer else None

    def write(self, record: dict[str, Any], batch) -> list[dict[str, Any]]:
        """Append ``record`` (and the step's samples); the samples written."""
        self.history.append(record)
        lines = sample_lines(record["step"], batch)
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.samples_file:
            for s in lines:
                self.samples_file.write(json.dumps(s) + "\n")
            self.samples_file.flush()
        return lines

    def truncate(self, last_step: int) -> None:
        """Keep the records up to ``last_step`` (resume), dropping any written after it."""
        self.history = [r for r in _read_jsonl(self.out_dir / "metrics.jsonl") if r["step"] <= last_step]
        if self.metrics_file is None:
            return
        samples = [s for s in _read_jsonl(self.out_dir / "samples.jsonl") if s["step"] <= last_step]
        self.close()
        (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        (self.out_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        self.metrics_file = (self.out_dir / "metrics.jsonl").open("a")
        self.samples_file = (self.out_dir / "samples.jsonl").open("a")

    def summary(self, name: str, before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, Any]:
        start, end, k = reward_window([r["reward/mean"] for r in self.history if "reward/mean" in r])
        return {
            "pipeline": name,
            "steps": len(self.history),
            "seconds": round(seconds, 2),
            "eval_before": before,
            "eval_after": after,
            "reward/start": start,
            "reward/end": end,
            "reward/window": k,
            "nodes": node_totals(self.history),
            "mfu": prefixed_means(self.history, "perf/mfu/"),
            "out_dir": str(self.out_dir),
        }

    def close(self) -> None:
        for f in (self.metrics_file, self.samples_file):
            if f:
                f.close()
        self.metrics_file = self.samples_file = None


def reward_window(rewards: list[float]) -> tuple[Optional[float], Optional[float], int]:
    """(start, end, k): the mean reward of the first and of the last ``k`` steps, ``k`` at most
    REWARD_WINDOW_MAX and a fifth of the run (None, None, 1 without rewards). The one
    "reward at the start -> at the end" figure of the summary and the report."""
    k = max(1, min(REWARD_WINDOW_MAX, len(rewards) // REWARD_WINDOW_SHARE))
    if not rewards:
        return None, None, k
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k, k


def node_totals(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per node over ``history``: total and mean seconds a step, tokens and tokens/s."""
    seconds: dict[str, list[float]] = {}
    toks: dict[str, int] = {}
    for rec in history:
        for k, t in (rec.get("nodes") or {}).items():
            seconds.setdefault(k, []).append(t["seconds"])
            toks[k] = toks.get(k, 0) + int(t.get("tokens", 0))
    return {n: {"total_s": round(sum(v), 3), "mean_s": round(sum(v) / len(v), 4), "tokens": toks[n],
                "tokens_per_s": round(toks[n] / sum(v), 1) if sum(v) > 0 else 0.0} for n, v in seconds.items()}


def prefixed_means(history: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """The mean over ``history`` of every number whose key starts with ``prefix``."""
    found: dict[str, list[float]] = {}
    for rec in history:
        for k, v in rec.items():
            if k.startswith(prefix) and isinstance(v, (int, float)):
                found.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in found.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_json(path: Path, data: Optional[dict[str, Any]]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
