"""The effect of one setting on the GRPO step: variants of the same pipeline run side by side.

    .venv/bin/python benchmarks/ab_step.py --model PATH --threads 1 --variant padded:padding_free=false --variant packed
    .venv/bin/python benchmarks/ab_step.py --model PATH --variant fp32 --variant bf16:precision=bf16

Each ``--variant NAME[:key=value,...]`` is the step of ``benchmarks/grpo_step.py`` (16 prompts
x 8 samples x 16 new tokens, GRPO, fp32) with the actor's ``Model`` settings changed
(``padding_free``, ``precision``) or the pipeline's (``rollout_ahead``: with the Generate node
recomputing the old log-probs and the loss's token-level rollout correction;
``concurrent_nodes``), or with one of the
engine's optimisations that is not a setting switched off (``fuse_activations=false``: GPT-2's
five-op GELU kept, see ``rlflow.models.fuse_activations``; ``drop_done=false``: finished rows
stay in the decoding batch, see ``rlflow.forward.DROP_DONE_AT``; ``early_forward=false``: the
update's first forward waits for the update, see ``rlflow.overlap.EarlyForward``;
``written_step=false``: decoding through the model's own forward, see ``rlflow.decoding``;
``prefill_once=false``: the prefill runs on each of a prompt's samples, see
``rlflow.forward.PREFILL_ONCE``; ``skip_allreduce=false``: DeepSpeed's gradient all-reduce kept
in one process, see ``rlflow.models.place``). All variants
live in one process and take their steps in turn (the order rotates every step), so a busy
machine slows them alike; the figure is each variant's median step over the first's,
and the median of the per-round ratios. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_step import grpo_pipeline  # noqa: E402

MODEL_KEYS = {"padding_free", "precision", "micro_batch_size"}
PIPELINE_KEYS = {"rollout_ahead", "concurrent_nodes"}
OFF_SWITCHES = {"fuse_activations", "drop_done", "early_forward", "written_step", "prefill_once", "skip_allreduce"}  # engine optimisations a variant can turn off (benchmark only)
PER_STEP = {"drop_done", "written_step", "prefill_once"}  # module switches of generation, set before each step
_DEFAULTS: dict = {}  # the switches' values as rlflow ships them, read before the first change


def generation_switches(*, drop_done_at: float | None = None, written_step: bool = True, prefill_once: bool = True) -> None:
    """Set generation's module switches for the samples that follow: ``rlflow.forward.DROP_DONE_AT``
    (None: its default), ``rlflow.decoding.WRITTEN_STEP``, ``rlflow.forward.PREFILL_ONCE``."""
    import rlflow.decoding
    import rlflow.forward

    default = _DEFAULTS.setdefault("drop_done_at", rlflow.forward.DROP_DONE_AT)
    rlflow.forward.DROP_DONE_AT = default if drop_done_at is None else drop_done_at
    rlflow.decoding.WRITTEN_STEP = written_step
    rlflow.forward.PREFILL_ONCE = prefill_once


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``name:key=value,key=value`` -> (name, Model settings, Pipeline settings)."""
    name, _, rest = text.partition(":")
    model, pipe = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in MODEL_KEYS:
            model[key] = _value(value)
        elif key in PIPELINE_KEYS | OFF_SWITCHES:
            pipe[key] = _value(value)
        else:
            raise SystemExit(f"unknown setting {key!r}; one of {sorted(MODEL_KEYS | PIPELINE_KEYS | OFF_SWITCHES)}")
    return name, model, pipe


def make_run(model: str, model_kw: dict, pipe_kw: dict, steps: int):
    from rlflow.engine import Run
    from rlflow.graph import build

    import rlflow.models

    pipe_kw = {k: v for k, v in pipe_kw.items() if k not in PER_STEP}
    off = {k for k in OFF_SWITCHES if pipe_kw.pop(k, True) is False}
    fuse = rlflow.models.fuse_activations
    if "fuse_activations" in off:
        rlflow.models.fuse_activations = lambda module: 0
    # ahead: old log-probs recomputed, the mismatch corrected per token
    p = grpo_pipeline(model, steps, name="ab", ahead=bool(pipe_kw.get("rollout_ahead")), model_kw=model_kw, **pipe_kw)
    run = Run(p, build(p), Path(tempfile.mkdtemp(prefix="rlflow-ab-")))
    if "early_forward" in off:
        run.graph.early_forward = lambda: None
    try:
        run.setup()
    finally:
        rlflow.models.fuse_activations = fuse
    if "skip_allreduce" in off:
        run.workers["actor"].engine.enable_backward_allreduce = True
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variant", action="append", required=True, help="NAME[:key=value,...] (the first is the reference)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    from rlflow.cli import _quiet_libraries

    _quiet_libraries()
    variants = [parse_variant(v) for v in args.variant]
    runs = [make_run(args.model, m, p, args.warmup + args.steps) for _, m, p in variants]
    times: list[list[float]] = [[] for _ in runs]
    nodes: list[dict[str, list[float]]] = [{} for _ in runs]
    for i in range(args.warmup + args.steps):
        for j in [(i + k) % len(runs) for k in range(len(runs))]:  # rotate who goes first
            run = runs[j]
            switched = {k: variants[j][2].get(k) is not False for k in PER_STEP}
            generation_switches(drop_done_at=None if switched["drop_done"] else 2.0,  # 2.0: never drop
                                written_step=switched["written_step"], prefill_once=switched["prefill_once"])
            t0 = time.perf_counter()
            record, _ = run._step(i + 1)
            if i >= args.warmup:
                times[j].append(time.perf_counter() - t0)
                for k, t in record["nodes"].items():
                    nodes[j].setdefault(k, []).append(t["seconds"])
    for run in runs:
        run.close()
    ref = statistics.median(times[0])
    out = {"threads": args.threads, "steps": args.steps, "variants": {}}
    for (name, m, p), t, n in zip(variants, times, nodes):  # noqa: B007
        rounds = [a / b for a, b in zip(t, times[0])]
        out["variants"][name] = {"settings": {**m, **p}, "step_s_median": round(statistics.median(t), 4),
                                 "over_first": round(statistics.median(t) / ref, 3),
                                 "over_first_per_round_median": round(statistics.median(rounds), 3),
                                 "node_median_s": {k: round(statistics.median(v), 4) for k, v in n.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
