"""Generation alone, variants side by side: the sampling of the GRPO benchmark step.

    .venv/bin/python benchmarks/generate_ab.py --model PATH --threads 2 --precision bf16 \
        --variant default --variant generic:written_step=false,prefill_once=false --variant drop25:drop_done_at=0.25

``rlflow.forward.sample`` as the Generate node calls it (16 prompts of ``builtin:arith`` x 8
samples x up to 16 new tokens, each prompt's own generator), on a new batch of prompts each
round; every variant samples every batch, in an order that rotates. A variant sets
``written_step`` (``rlflow.decoding.WRITTEN_STEP``), ``prefill_once``
(``rlflow.forward.PREFILL_ONCE``) or ``drop_done_at`` (``rlflow.forward.DROP_DONE_AT``).
Prints one JSON line: each variant's median seconds, over the first's, and the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

PROMPTS, SAMPLES, NEW_TOKENS = 16, 8, 16


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in ("written_step", "prefill_once", "drop_done_at"):
            raise SystemExit(f"unknown setting {key!r}: written_step, prefill_once or drop_done_at")
        settings[key] = float(value) if key == "drop_done_at" else value.lower() == "true"
    return name, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--variant", action="append", required=True, help="NAME[:key=value,...] (the first is the reference)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import rlflow.forward as fw
    from ab_step import generation_switches
    from rlflow.arith import problems
    from rlflow.cli import _quiet_libraries
    from rlflow.models import disable_dropout, fuse_activations, load_tokenizer
    from transformers import AutoModelForCausalLM

    _quiet_libraries()
    tok = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    disable_dropout(model)
    fuse_activations(model)
    rows = problems("train", seed=0)
    variants = [parse_variant(v) for v in args.variant]

    def run(i: int, settings: dict) -> float:
        generation_switches(**settings)
        batch = rows[(i * PROMPTS) % len(rows):][:PROMPTS]
        ids, mask = fw.encode_prompts(tok, [r["prompt"] for r in batch for _ in range(SAMPLES)])
        group = torch.arange(len(batch)).repeat_interleave(SAMPLES)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
        with autocast:
            t0 = time.perf_counter()
            fw.sample(model, ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.0, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, generators=fw.prompt_generators(0, i, group))
            return time.perf_counter() - t0

    for i in range(2):  # warm-up
        for _, settings in variants:
            run(i, settings)
    times: list[list[float]] = [[] for _ in variants]
    for i in range(2, 2 + args.rounds):
        for j in [(i + k) % len(variants) for k in range(len(variants))]:
            times[j].append(run(i, variants[j][1]))
    ref = statistics.median(times[0])
    out = {"threads": args.threads, "precision": args.precision, "rounds": args.rounds, "variants": {}}
    for (name, settings), t in zip(variants, times):
        out["variants"][name] = {"settings": settings, "seconds_median": round(statistics.median(t), 4),
                                 "over_first": round(statistics.median(t) / ref, 3),
                                 "over_first_per_round_median": round(statistics.median(a / b for a, b in zip(t, times[0])), 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
