"""Memory and step time of rlflow across processes and ZeRO stages (docs/scaling.md).

Run under ``python -m torch.distributed.run --nproc_per_node N`` (or alone, one process);
rank 0 prints one JSON line.

    # a random Llama big enough for ZeRO-3 to shard (its matrices exceed DeepSpeed's
    # stage3_param_persistence_threshold of 1e5 elements), with the built-in tokenizer
    python benchmarks/scale.py make-model --out /tmp/llama-25m --hidden 512 --layers 8

    # per-rank memory of a trained actor (parameters, gradients, optimizer state after one
    # step) and of a frozen reference, at a ZeRO stage
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/scale.py memory --model /tmp/llama-25m --zero 3

    # a pipeline for a few steps: per-node seconds (median after the first step), tokens/s
    # per process (generated tokens over the step's wall time), peak memory (GPU: per model;
    # CPU: the process's peak RSS)
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/scale.py steps pipelines/grpo.py --steps 4 \\
        --set actor.zero_stage=3 --set ref.zero_stage=3

Memory is counted two ways: the bytes of the tensors the process holds (every tensor
storage reachable from Python, on the model's device; exact, whatever the allocator does)
and the resident set size (what the operating system sees; it includes allocator slack).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def tensor_bytes(device_type: str) -> int:
    """Bytes of every distinct tensor storage on ``device_type`` reachable from Python."""
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == device_type and not o.is_meta:
                st = o.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, ReferenceError):  # a tensor without storage (sparse, functional)
            continue
    return sum(seen.values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def held(device_type: str) -> int:
    """What this process holds on the device: allocated GPU memory, or CPU tensor bytes."""
    import torch

    if device_type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return tensor_bytes("cpu")


def make_model(out: Path, hidden: int, layers: int) -> None:
    """A random Llama of the given size with the built-in tokenizer (weights only for memory and speed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlflow.builtin import ensure_builtin
    from rlflow.models import load_tokenizer

    tok = load_tokenizer(str(ensure_builtin("tiny-arith-init")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": str(out), "parameters": n, "fp32_mib": round(4 * n / MIB, 1)}))


def one_step(worker) -> None:
    """One forward/backward/optimizer step on a fixed batch: Adam's state exists after it."""
    import torch

    ids = torch.randint(3, len(worker.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0)).to(worker.device)
    loss = worker.engine(input_ids=ids).logits.float().pow(2).mean()
    worker.backward(loss, last=True)
    worker.step()


def memory(args) -> dict:
    """Per-rank bytes of the actor (parameters, gradients, optimizer state) and of the reference."""
    import torch

    from rlflow import dist
    from rlflow.models import place, setup_distributed
    from rlflow.spec import Model

    setup_distributed()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m0, r0 = held(dev), rss_bytes()
    spec = Model(args.model, train=True, zero_stage=args.zero, precision=args.precision, offload=args.offload,
                 offload_params=args.offload_params, grad_clip=None)
    actor = place("actor", spec)
    m1 = held(dev)
    one_step(actor)
    m2, r2 = held(dev), rss_bytes()
    ref = place("ref", spec.frozen())  # kept: a worker nobody holds is freed at once
    m3, r3 = held(dev), rss_bytes()
    mine = {"actor_params_mib": (m1 - m0) / MIB, "actor_after_step_mib": (m2 - m0) / MIB, "ref_mib": (m3 - m2) / MIB,
            "rss_actor_mib": (r2 - r0) / MIB, "rss_ref_mib": (r3 - r2) / MIB, "rss_total_mib": r3 / MIB}
    ranks = dist.gathered({k: round(v, 1) for k, v in mine.items()})
    return {"what": "memory", "model": args.model, "zero_stage": args.zero, "precision": args.precision,
            "processes": dist.world_size(), "device": dev, "ref_engine": type(ref.engine).__name__, "per_rank": ranks}


def steps(args) -> dict:
    """A pipeline for ``--steps`` steps: per-node seconds, tokens/s per process, peak memory."""
    import torch

    from rlflow import dist
    from rlflow.engine import Run
    from rlflow.loader import apply_overrides, load_pipeline
    from rlflow.models import setup_distributed

    setup_distributed()
    p = apply_overrides(load_pipeline(args.file), [*(args.set or []), f"pipeline.steps={args.steps}"])
    p = p.model_copy(update={"eval": None, "save_every": 0})
    from rlflow.graph import build

    out = Path(dist.gathered(tempfile.mkdtemp(prefix="rlflow-scale-"))[0])
    run = Run(p, build(p), out)
    run.setup()
    peaks = watch_peaks(run) if torch.cuda.is_available() else {}
    run.train()
    recs = run.history[1:] or run.history  # the first step warms up (allocator, kernels)
    nodes = {k: statistics.median(r["nodes"][k]["seconds"] for r in recs if k in r["nodes"]) for k in recs[-1]["nodes"]}
    gen = run.graph.generate()
    tokens = statistics.median(r["nodes"][gen.name]["tokens"] for r in recs) if gen else 0  # generated, all ranks
    step_s = statistics.median(r["seconds"] for r in recs)
    return {"what": "steps", "pipeline": p.name, "processes": dist.world_size(), "steps": args.steps, "settings": args.set or [],
            "step_s": round(step_s, 4), "node_s": {k: round(v, 4) for k, v in nodes.items()},
            "generated_tokens_per_s_per_process": round(tokens / step_s / dist.world_size(), 1),
            "peak_mib": {k: round(v / MIB, 1) for k, v in peaks.items()} or {"rss_max": peak_rss_mib()}}


def watch_peaks(run) -> dict[str, int]:
    """Peak GPU memory while each model works (its nodes and its update), filled in as the run goes."""
    import torch

    peaks: dict[str, int] = {}
    node_model = {n.name: (n.model_refs() or [None])[0] for n in run.pipeline.nodes}
    run_node, train_model = run._run_node, run._train_model

    def node(r, *a, **kw):
        torch.cuda.reset_peak_memory_stats()
        out = run_node(r, *a, **kw)
        m = node_model.get(r.spec.name)
        if m:
            peaks[m] = max(peaks.get(m, 0), torch.cuda.max_memory_allocated())
        return out

    def train(worker, *a, **kw):
        torch.cuda.reset_peak_memory_stats()
        out = train_model(worker, *a, **kw)
        peaks[worker.name] = max(peaks.get(worker.name, 0), torch.cuda.max_memory_allocated())
        return out

    run._run_node, run._train_model = node, train
    return peaks


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("--out", required=True)
    mk.add_argument("--hidden", type=int, default=512)
    mk.add_argument("--layers", type=int, default=8)
    mem = sub.add_parser("memory")
    mem.add_argument("--model", required=True)
    mem.add_argument("--zero", type=int, default=0)
    mem.add_argument("--precision", default="fp32")
    mem.add_argument("--offload", action="store_true")
    mem.add_argument("--offload-params", action="store_true")
    st = sub.add_parser("steps")
    st.add_argument("file")
    st.add_argument("--steps", type=int, default=4)
    st.add_argument("--set", action="append")
    args = ap.parse_args()
    if args.what == "make-model":
        return make_model(Path(args.out), args.hidden, args.layers)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t0 = time.perf_counter()
    result = memory(args) if args.what == "memory" else steps(args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
