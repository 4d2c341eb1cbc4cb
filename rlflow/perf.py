"""How close a step is to the machine's limit: per-step figures named as verl names them.

Every step record gets (DESIGN.md "Runs, outputs"; docs/benchmarks.md):

* ``timing_s/<node>`` and ``timing_s/step``: wall seconds (the update of a model is named
  by its Loss nodes joined with "+", as in the node table);
* ``perf/total_num_tokens``, ``perf/time_per_step`` and ``perf/throughput``: real prompt
  and response tokens of the batch, and those per second per device (verl's throughput);
* ``perf/mfu/<model>``: model FLOPs utilisation of each model's nodes — the FLOPs of the
  *useful* positions they computed (real tokens, not padding) over those nodes' seconds
  and the device's peak; ``perf/mfu`` the same over the whole step;
* ``padding_frac/<node>``: the share of computed positions that were padding;
* ``perf/cpu_memory_peak_gb`` (peak resident memory of the process) and, on a GPU,
  ``perf/max_memory_allocated_gb``.

Model FLOPs are ``2·N`` per token for a forward and ``6·N`` for a forward with backward,
``N`` the weights of the model's matmuls (linear layers and GPT-2's ``Conv1D``, the LM head
included; embeddings looked up, not multiplied, are not counted; attention's own
``4·layers·hidden·context`` per token is not counted either — small beside ``2·N`` for
the short contexts of RL on small models, so MFU here is a slight underestimate).

The peak is measured once per machine, precision and thread count by a matmul probe
(the fastest of a few dozen single square matmuls) and cached in
``$RLFLOW_CACHE/peak_flops.json``. On a machine shared with other work the probe can read
low, so MFU reads high: a probe at N threads never counts below the cached one at fewer
threads, and deleting the file measures again.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch

# Figures of a step record that depend on the machine's speed rather than on the run's maths:
# two runs of the same config agree on everything else.
MACHINE_DEPENDENT = ("timing_s/", "perf/")

# The probe times single square matmuls (2·n³ FLOPs each) of a few sizes and keeps the best:
# on a busy machine a short matmul often gets a core to itself, a long timed loop never does.
PROBE_SIZES = {"cpu": (256, 512, 1024), "cuda": (4096, 8192)}
PROBE_TRIALS = 30
PROBE_BUDGET_S = 0.5  # per size


def matmul_params(module) -> int:
    """``N`` of the FLOPs model: weights of every linear layer (and GPT-2's ``Conv1D``)."""
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            n += m.weight.numel()
    return n


def _device_name(device: torch.device) -> str:
    if getattr(device, "type", None) == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def probe(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the fastest single matmul of ``PROBE_TRIALS`` per size (``PROBE_BUDGET_S`` each)."""
    best = 0.0
    for size in PROBE_SIZES.get(device.type) or PROBE_SIZES["cuda"]:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: kernels chosen, memory touched
        start = time.perf_counter()
        for _ in range(PROBE_TRIALS):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2.0 * size**3 / (time.perf_counter() - t0))
            if time.perf_counter() - start > PROBE_BUDGET_S:
                break
    return best


def _cache_file() -> Path:
    return Path(os.environ.get("RLFLOW_CACHE", Path.home() / ".cache" / "rlflow")) / "peak_flops.json"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matmul peak in FLOP/s for ``dtype`` at this process's thread count: from
    the cache, or probed now and cached (the best probe seen is kept)."""
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = f"{_device_name(device)}|{str(dtype).removeprefix('torch.')}|threads={threads}|torch={torch.__version__}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    fewer = [v for k, v in cache.items() if k.split("|threads=")[0] == key.split("|threads=")[0]
             and k.split("|")[-1] == key.split("|")[-1] and int(k.split("threads=")[1].split("|")[0]) < threads]
    if key in cache:  # more threads never have a lower peak, whichever was probed first
        return float(max([cache[key], *fewer]))
    cache[key] = max([probe(device, dtype), *fewer])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return float(cache[key])


def step_figures(nodes: dict[str, Any], seconds: float, batch_tokens: int, models: dict[str, "ModelCost"],
                 world: int = 1) -> dict[str, float]:
    """The figures of one step from its node times (:class:`rlflow.records.NodeTime`), its wall
    seconds, the batch's real tokens and, per model, its FLOPs model (:class:`ModelCost`)."""
    out: dict[str, float] = {f"timing_s/{k}": round(t.seconds, 6) for k, t in nodes.items()}
    out["timing_s/step"] = round(seconds, 6)
    out["perf/total_num_tokens"] = float(batch_tokens)
    out["perf/time_per_step"] = round(seconds, 6)
    out["perf/throughput"] = round(batch_tokens / seconds / max(world, 1), 2) if seconds > 0 else 0.0
    flops: dict[str, float] = {}
    busy: dict[str, float] = {}
    step_util = 0.0  # Σ FLOPs / peak: the seconds the step's work takes at peak
    for name, t in nodes.items():
        if t.positions:
            out[f"padding_frac/{name}"] = t.padding_frac
        cost = models.get(name)
        if cost is None or not t.useful:
            continue
        f = cost.flops(t.useful)
        flops[cost.model] = flops.get(cost.model, 0.0) + f
        busy[cost.model] = busy.get(cost.model, 0.0) + t.seconds
        step_util += f / cost.peak
    for model, f in flops.items():
        peak = next(c.peak for c in models.values() if c.model == model)
        if busy[model] > 0:  # FLOPs of every device over the seconds of the slowest, per device
            out[f"perf/mfu/{model}"] = round(f / busy[model] / peak / max(world, 1), 6)
    if seconds > 0 and flops:
        out["perf/mfu"] = round(step_util / seconds / max(world, 1), 6)
    return out


class ModelCost:
    """The FLOPs model of one node's passes: ``2·N`` (forward) or ``6·N`` (training) per
    useful position, against the peak of the model's device and precision."""

    def __init__(self, model: str, n_params: int, training: bool, peak: float):
        self.model, self.n_params, self.training, self.peak = model, n_params, training, peak

    def flops(self, positions: int) -> float:
        return (6.0 if self.training else 2.0) * self.n_params * positions


def node_costs(pipeline, workers: dict[str, Any], compute_dtype) -> dict[str, ModelCost]:
    """Node name (an update named by its Loss nodes, "+"-joined) -> :class:`ModelCost`, for the
    nodes that run one model; ``compute_dtype(worker)`` is the dtype its matmuls run in."""
    params = {name: matmul_params(w.module) for name, w in workers.items()}
    peaks = {name: peak_flops(torch.device(w.device), compute_dtype(w)) for name, w in workers.items()}
    out: dict[str, ModelCost] = {}
    losses: dict[str, list[str]] = {}
    for n in pipeline.nodes:
        refs = [m for m in n.model_refs().values() if m in workers]
        if len(refs) != 1:
            continue
        m = refs[0]
        if n.stage == "update":
            losses.setdefault(m, []).append(n.name)
        else:
            out[n.name] = ModelCost(m, params[m], False, peaks[m])
    for m, names in losses.items():
        cost = ModelCost(m, params[m], True, peaks[m])
        out["+".join(names)] = cost
        for name in names:  # a phase may train a model with only some of its losses
            out.setdefault(name, cost)
    return out


def memory(device: Optional[torch.device] = None) -> dict[str, float]:
    """Peak memory figures of this process (and of ``device`` when it is a GPU)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {"perf/cpu_memory_peak_gb": round(rss_kb / 2**20, 4)}
    if getattr(device, "type", None) == "cuda":
        out["perf/max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 4)
        out["perf/max_memory_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 4)
    return out
