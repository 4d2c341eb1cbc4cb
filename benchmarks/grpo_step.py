"""GRPO step time of rlflow on any Hugging Face causal-LM directory, with a hand-written
plain-PyTorch GRPO step on the same model and batch shapes as the baseline, side by side.

    .venv/bin/python benchmarks/grpo_step.py --model path/to/any/hf-causal-lm --threads 2
    .venv/bin/python benchmarks/grpo_step.py --model builtin:tiny-arith --threads 1 --steps 10 --warmup 3

Configuration (fixed, so that other frameworks can be run on the same work): 16 prompts x
8 samples x 16 new tokens, temperature 1, group-normalised advantages, clipped loss with
k3 KL in the loss (β = 0.04, seq-mean-token-mean), one optimizer step per batch, fp32
(``--precision bf16``: autocast, fp32 weights). Prints one JSON line: median / min / max
step seconds, completions/s, generated tokens/s, per-node median seconds, padding and MFU
of the last step, peak RSS, for rlflow and for the baseline, and their ratio.

The baseline is the same step by hand on the same model as rlflow places it (the same
sampler, the same padding-free log-prob function, the same fused GELU, the same autocast),
so that the ratio is what the engine costs, not what its optimisations save; for the same
reason rlflow then runs one thing at a time as the loop does (``concurrent_nodes=False``: no
node beside another, no early update forward). With ``--no-baseline`` (what the TRL
side-by-side runs) rlflow's step is its default one. The two take their steps in turn in one
process (who goes first alternates), so a busy machine slows both.
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


def grpo_pipeline(model: str, steps: int, name: str = "bench", ahead: bool = False, model_kw: dict | None = None,
                  **pipe_kw):
    """The benchmark's GRPO pipeline (TRL's GRPOTrainer work: PROMPTS x SAMPLES x NEW_TOKENS, k3 KL
    β = BETA in the loss). ``ahead``: the Generate node recomputes the old log-probs and the loss
    corrects the rollout per token (what ``rollout_ahead=1`` needs); ``model_kw`` go to the
    actor's Model, ``pipe_kw`` to the Pipeline."""
    from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, RefLogprob, Score
    from rlflow.arith import exact_match

    actor = Model(model, train=True, lr=1e-5, **(model_kw or {}))
    return Pipeline(name=name, data=Prompts("builtin:arith", batch_size=PROMPTS), models={"actor": actor, "ref": actor.frozen()},
                    nodes=[Generate("actor", n=SAMPLES, max_new_tokens=NEW_TOKENS, temperature=1.0, recompute_logprobs=ahead),
                           Score(rule=exact_match), RefLogprob("ref"), Advantage("group_norm"),
                           Loss("clip", kl_coef=BETA, kl="k3", agg="seq-mean-token-mean", rollout_is="token" if ahead else None)],
                    steps=steps, eval=None, **pipe_kw)


def rlflow_stepper(model: str, steps: int, precision: str = "fp32", overlap: bool = True):
    """A function that takes rlflow's next GRPO step: ``step(i) -> (response tokens, node seconds, record)``.
    ``overlap=False``: every node and forward one after the other (``concurrent_nodes=False``: no
    node beside another, no early update forward), as the plain loop does them."""
    from rlflow.engine import Run
    from rlflow.graph import build

    p = grpo_pipeline(model, steps, model_kw={"precision": precision}, concurrent_nodes=overlap)
    run = Run(p, build(p), Path(tempfile.mkdtemp(prefix="rlflow-bench-")))
    run.setup()

    def step(i: int):
        record, batch = run._step(i + 1)  # the engine's step: experience, update, the step's figures
        return int(batch["response_mask"].sum()), {k: t["seconds"] for k, t in record["nodes"].items()}, record

    return step, run.close


def baseline_stepper(model: str, precision: str = "fp32"):
    """The same GRPO step written by hand, no engine, no DeepSpeed: ``step(i)`` as :func:`rlflow_stepper`'s."""
    import contextlib

    import torch

    from rlflow.arith import exact_match, problems
    from rlflow.forward import decode, encode_prompts, response_logprobs, sample
    from rlflow.engine import train_pipeline
    from rlflow.models import disable_dropout, fuse_activations, load_tokenizer, resolve
    from transformers import AutoModelForCausalLM

    path = resolve(model, train=train_pipeline)
    tok = load_tokenizer(path)
    policy = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    for m in (policy, ref):  # the model as rlflow places it
        disable_dropout(m)
        fuse_activations(m)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    rows = problems("train", seed=0)
    gen = torch.Generator().manual_seed(0)

    def step(i: int):
        batch = rows[(i * PROMPTS) % len(rows):][:PROMPTS]
        t0 = time.perf_counter()
        ids, mask = encode_prompts(tok, [r["prompt"] for r in batch for _ in range(SAMPLES)])
        with autocast():
            s = sample(policy, ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.0, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, generator=gen)
        t1 = time.perf_counter()
        texts = decode(tok, s.response_ids, s.response_mask)
        r = torch.tensor([exact_match(t, {"answer": b["answer"]}) for t, b in zip(texts, [b for b in batch for _ in range(SAMPLES)])])
        with torch.no_grad(), autocast():
            ref_lp = response_logprobs(ref, ids, mask, s.response_ids, s.response_mask)
        t2 = time.perf_counter()
        g = r.view(PROMPTS, SAMPLES)
        adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        with autocast():
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
        return int(m.sum()), {"generate": t1 - t0, "score+ref": t2 - t1, "update": t3 - t2}, {}

    return step, lambda: None


def interleaved(steppers: dict, warmup: int, steps: int) -> dict[str, dict]:
    """Every stepper's steps in turn (who goes first alternates): per stepper, the timed steps'
    seconds, response tokens and node seconds, and the last step's record."""
    out = {name: {"times": [], "tokens": [], "nodes": {}, "record": {}} for name in steppers}
    names = list(steppers)
    for i in range(warmup + steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            n_tokens, nodes, record = steppers[name](i)
            dt = time.perf_counter() - t0
            if i >= warmup:
                r = out[name]
                r["times"].append(dt)
                r["tokens"].append(n_tokens)
                r["record"] = record
                for k, v in nodes.items():
                    r["nodes"].setdefault(k, []).append(v)
    for r in out.values():
        r["nodes"] = {k: round(statistics.median(v), 4) for k, v in r["nodes"].items()}
        r["last_step"] = {k: v for k, v in r.pop("record").items() if k.startswith(("perf/mfu", "padding_frac/"))}
    return out


def figures(r: dict) -> dict:
    t = r["times"]
    med = statistics.median(t)
    return {"step_s_median": round(med, 4), "step_s_min": round(min(t), 4), "step_s_max": round(max(t), 4),
            "completions_per_s": round(PROMPTS * SAMPLES / med, 1),
            "generated_tokens_per_s": round(statistics.median(n / s for n, s in zip(r["tokens"], t)), 1),
            "node_median_s": r["nodes"], **({"last_step": r["last_step"]} if r.get("last_step") else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face causal-LM directory, hub id in the local cache, or builtin:tiny-arith")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast over fp32 weights, both sides")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rlflow.cli import _quiet_libraries

    _quiet_libraries()
    out = {"config": {"prompts": PROMPTS, "samples": SAMPLES, "max_new_tokens": NEW_TOKENS, "beta": BETA,
                      "threads": args.threads, "model": args.model, "steps": args.steps, "warmup": args.warmup,
                      "precision": args.precision}}
    steppers, closers = {}, []
    # against the plain loop, the engine's cost alone: its overlaps off (the loop runs one thing at a time)
    steppers["rlflow"], close = rlflow_stepper(args.model, args.warmup + args.steps, args.precision,
                                               overlap=args.no_baseline)
    closers.append(close)
    if not args.no_baseline:
        steppers["baseline_plain_torch"], close = baseline_stepper(args.model, args.precision)
        closers.append(close)
    results = interleaved(steppers, args.warmup, args.steps)
    for close in closers:
        close()
    for name, r in results.items():
        out[name] = figures(r)
    if not args.no_baseline:
        rounds = [a / b for a, b in zip(results["rlflow"]["times"], results["baseline_plain_torch"]["times"])]
        out["rlflow_over_baseline"] = round(out["rlflow"]["step_s_median"] / out["baseline_plain_torch"]["step_s_median"], 3)
        out["rlflow_over_baseline_per_step_median"] = round(statistics.median(rounds), 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
