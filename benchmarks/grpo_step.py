"""GRPO step time of rlflow on any Hugging Face causal-LM directory, with a hand-written
plain-PyTorch GRPO step on the same model and batch shapes as the baseline, side by side.

    .venv/bin/python benchmarks/grpo_step.py --model path/to/any/hf-causal-lm --threads 2
    .venv/bin/python benchmarks/grpo_step.py --model builtin:tiny-arith --threads 1 --steps 10 --warmup 3

Configuration (fixed, so that other frameworks can be run on the same work): 16 prompts x
8 samples x 16 new tokens, temperature 1, group-normalised advantages, clipped loss with
k3 KL in the loss (β = 0.04, seq-mean-token-mean), one optimizer step per batch, fp32.
Prints one JSON line: median / min / max step seconds, completions/s, generated tokens/s,
per-node median seconds, peak RSS, for rlflow and for the baseline, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, SAMPLES, NEW_TOKENS, BETA = 16, 8, 16, 0.04


def rlflow_steps(model: str, warmup: int, steps: int) -> dict:
    from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
    from rlflow.arith import exact_match
    from rlflow.engine import Run
    from rlflow.graph import build

    actor = Model(model, train=True, lr=1e-5)
    p = Pipeline(name="bench", data=Prompts("builtin:arith", batch_size=PROMPTS), models={"actor": actor, "ref": actor.frozen()},
                 nodes=[Generate("actor", n=SAMPLES, max_new_tokens=NEW_TOKENS, temperature=1.0), Score(rule=exact_match),
                        RefLogprob("ref"), Advantage("group_norm"),
                        Loss("clip", kl_coef=BETA, kl="k3", agg="seq-mean-token-mean")],
                 steps=warmup + steps, eval=None)
    run = Run(p, build(p), Path(tempfile.mkdtemp(prefix="rlflow-bench-")))
    run.setup()
    times, tokens, nodes = [], [], {}
    for i in range(warmup + steps):
        run.ctx.step = i + 1
        t0 = time.perf_counter()
        batch, node_times, _ = run.experience()
        run.update(batch, node_times)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            tokens.append(int(batch["response_mask"].sum()))
            for k, t in node_times.items():
                nodes.setdefault(k, []).append(t.seconds)
    run.close()
    return {"times": times, "tokens": tokens, "nodes": {k: round(statistics.median(v), 4) for k, v in nodes.items()}}


def baseline_steps(model: str, warmup: int, steps: int) -> dict:
    """The same GRPO step written by hand: no engine, no DeepSpeed."""
    import torch

    from rlflow.arith import exact_match, problems
    from rlflow.forward import decode, encode_prompts, response_logprobs, sample
    from rlflow.engine import train_pipeline
    from rlflow.models import load_tokenizer, resolve
    from transformers import AutoModelForCausalLM

    path = resolve(model, train=train_pipeline)
    tok = load_tokenizer(path)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    rows = problems("train", seed=0)
    gen = torch.Generator().manual_seed(0)
    times, tokens, nodes = [], [], {}
    for i in range(warmup + steps):
        batch = rows[(i * PROMPTS) % len(rows):][:PROMPTS]
        t0 = time.perf_counter()
        ids, mask = encode_prompts(tok, [r["prompt"] for r in batch for _ in range(SAMPLES)])
        s = sample(policy, ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.0, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, generator=gen)
        t1 = time.perf_counter()
        texts = decode(tok, s.response_ids, s.response_mask)
        r = torch.tensor([exact_match(t, {"answer": b["answer"]}) for t, b in zip(texts, [b for b in batch for _ in range(SAMPLES)])])
        with torch.no_grad():
            ref_lp = response_logprobs(ref, ids, mask, s.response_ids, s.response_mask)
        t2 = time.perf_counter()
        g = r.view(PROMPTS, SAMPLES)
        adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        lp = response_logprobs(policy, ids, mask, s.response_ids, s.response_mask)
        ratio = torch.exp(lp - s.logprobs)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        d = (ref_lp - lp).clamp(-20, 20)
        kl = (torch.exp(d) - 1 - d).clamp(-10, 10)
        m = s.response_mask
        loss = (((pg + BETA * kl) * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        t3 = time.perf_counter()
        if i >= warmup:
            times.append(t3 - t0)
            tokens.append(int(m.sum()))
            for k, v in (("generate", t1 - t0), ("score+ref", t2 - t1), ("update", t3 - t2)):
                nodes.setdefault(k, []).append(v)
    return {"times": times, "tokens": tokens, "nodes": {k: round(statistics.median(v), 4) for k, v in nodes.items()}}


def figures(r: dict) -> dict:
    t = r["times"]
    med = statistics.median(t)
    return {"step_s_median": round(med, 4), "step_s_min": round(min(t), 4), "step_s_max": round(max(t), 4),
            "completions_per_s": round(PROMPTS * SAMPLES / med, 1),
            "generated_tokens_per_s": round(statistics.median(n / s for n, s in zip(r["tokens"], t)), 1),
            "node_median_s": r["nodes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face causal-LM directory, hub id in the local cache, or builtin:tiny-arith")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rlflow.cli import _quiet_libraries

    _quiet_libraries()
    out = {"config": {"prompts": PROMPTS, "samples": SAMPLES, "max_new_tokens": NEW_TOKENS, "beta": BETA,
                      "threads": args.threads, "model": args.model, "steps": args.steps, "warmup": args.warmup}}
    out["rlflow"] = figures(rlflow_steps(args.model, args.warmup, args.steps))
    if not args.no_baseline:
        out["baseline_plain_torch"] = figures(baseline_steps(args.model, args.warmup, args.steps))
        out["rlflow_over_baseline"] = round(out["rlflow"]["step_s_median"] / out["baseline_plain_torch"]["step_s_median"], 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
