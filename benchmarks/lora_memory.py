"""What sharing a LoRA actor's base with its reference saves: the memory of the placed
actor + reference, with the reference as the actor's own module (adapter disabled, what
the engine does for ``actor.frozen()``) and as a second copy (what it does without LoRA).

    .venv/bin/python benchmarks/lora_memory.py                     # builtin:tiny-arith and a ~138M-parameter Llama
    .venv/bin/python benchmarks/lora_memory.py --models builtin:tiny-arith --precision fp32

Each (model, mode) is placed in a fresh process (1 torch thread) and both models run one
forward; the figures are the bytes of distinct parameter tensors over both workers, and
the growth of the process's resident memory across placement and forward (VmRSS, its
anonymous part RssAnon, and its proportional share Pss), with torch, transformers,
DeepSpeed and peft imported first. The larger model is a randomly initialised
Llama written to a temporary folder (no download): 12 layers, hidden 768, MLP 3072,
vocabulary 32000, tied embeddings. Prints one JSON line per (model, mode).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LARGE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=256)


def resident() -> dict[str, int]:
    """The process's resident memory in bytes: all of it (VmRSS), its anonymous part
    (RssAnon: memory the process wrote, not pages of a mapped file), and its proportional
    share (Pss: a page mapped twice, e.g. the same weights file loaded twice, counts once)."""
    fields = {}
    for f in ("/proc/self/status", "/proc/self/smaps_rollup"):
        fields.update(dict(line.split(":", 1) for line in Path(f).read_text().splitlines() if ":" in line))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "Pss")}


def write_large(directory: Path) -> str:
    """A random Llama of LARGE's shape, saved with the built-in model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlflow.builtin import ensure_builtin

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LARGE)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(ensure_builtin("tiny-arith-init"))).save_pretrained(directory)
    return str(directory)


def measure(path: str, mode: str, precision: str) -> dict:
    """Place a LoRA actor and its reference (``shared`` or ``copy``), run one forward of
    each (so every weight has been read), and measure."""
    import torch

    from rlflow import LoRA, Model
    from rlflow.forward import response_logprobs
    from rlflow.models import place, setup_distributed

    setup_distributed()  # imports torch, transformers and DeepSpeed before the first reading
    import peft  # noqa: F401

    actor = Model(path, train=True, precision=precision, lora=LoRA(r=16, alpha=32))
    gc.collect()
    before = resident()
    workers = {"actor": place("actor", actor)}
    workers["ref"] = workers["actor"].base_view("ref", actor.frozen()) if mode == "shared" else place("ref", actor.frozen())
    ids, mask = torch.full((4, 8), 5), torch.ones(4, 8, dtype=torch.long)
    with torch.no_grad():
        for w in workers.values():
            with w.forwards():
                response_logprobs(w.engine, ids, mask, ids[:, :4], mask[:, :4].float())
    gc.collect()
    after = resident()
    tensors = {p.data_ptr(): p.numel() * p.element_size() for w in workers.values() for p in w.module.parameters()}
    return {"model": path if path.startswith("builtin:") else "llama-138M (random)", "mode": mode, "precision": precision,
            "parameter_bytes": sum(tensors.values()), "rss_growth_bytes": after["VmRSS"] - before["VmRSS"],
            "anon_growth_bytes": after["RssAnon"] - before["RssAnon"], "pss_growth_bytes": after["Pss"] - before["Pss"],
            "trained_params": sum(p.numel() for p in workers["actor"].module.parameters() if p.requires_grad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["builtin:tiny-arith", "large"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--one", nargs=3, metavar=("PATH", "MODE", "PRECISION"), help=argparse.SUPPRESS)  # the child
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="rlflow-lora-memory-") as tmp:
        for model in args.models:
            path = write_large(Path(tmp) / "large") if model == "large" else model
            for precision in args.precision:
                for mode in ("copy", "shared"):
                    out = subprocess.run([sys.executable, __file__, "--one", path, mode, precision], env=env,
                                         capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(out.stderr)
                    print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
