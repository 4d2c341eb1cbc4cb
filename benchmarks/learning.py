"""Does each pipeline learn? Runs shipped pipelines on the built-in task and reports the
held-out figures before and after, and the wall time.

    .venv/bin/python benchmarks/learning.py                       # every RL/preference pipeline, seed 0
    .venv/bin/python benchmarks/learning.py --pipelines grpo --seeds 0 1 2
    .venv/bin/python benchmarks/learning.py --pipelines ppo --steps 100 --set generate.n=2
    .venv/bin/python benchmarks/learning.py --task chain --pipelines grpo dr_grpo   # on builtin:arith-chain

Each run is `rlflow run` in a subprocess (1 torch thread unless --threads); prints one JSON
line per run and a last line with every run. Timings are of this machine and noisy.

`--task chain` runs the same files on `builtin:arith-chain` with `builtin:tiny-arith-chain`
(multi-term sums with written-out steps, responses of 17-31 tokens; docs/length.md): the
`--set` overrides of `rlflow.arith_chain.overrides_from_arith` (data, models, rules, length
budgets) go before the user's own `--set`, which can still change any of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = ["grpo", "grpo_lora", "dr_grpo", "gspo", "cispo", "sapo", "opo", "gpg", "dapo", "rloo", "reinforce_pp",
           "reinforce_pp_baseline", "remax", "ppo", "vc_ppo", "vapo", "dpo", "online_dpo", "rft", "online_rft", "reward_model"]


def task_overrides(task: str, file: Path) -> list[str]:
    """The ``--set`` overrides that move the pipeline ``file`` (written for builtin:arith) to ``task``."""
    if task == "arith":
        return []
    from rlflow.arith_chain import overrides_from_arith
    from rlflow.loader import load_pipeline

    return overrides_from_arith(load_pipeline(file))


def run_one(name: str, seed: int, steps: int | None, sets: list[str], threads: int, out_root: Path,
            task: str = "arith") -> dict:
    out = out_root / f"{name}-s{seed}"
    file = REPO / "pipelines" / f"{name}.py"
    sets = task_overrides(task, file) + sets
    cmd = [sys.executable, "-m", "rlflow", "run", str(file), "--seed", str(seed), "--out", str(out), "--quiet"]
    if steps:
        cmd += ["--steps", str(steps)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"pipeline": name, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:] or ["?"], "wall_s": round(wall, 1)}
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    figures = {k: {"before": round(before.get(k, float("nan")), 4), "after": round(v, 4),
                   "gain_points": round(100 * (v - before.get(k, float("nan"))), 1)} for k, v in after.items()}
    return {"pipeline": name, "task": task, "seed": seed, "steps": summary["steps"], "train_s": summary["seconds"], "wall_s": round(wall, 1),
            "reward_start": summary["reward/start"], "reward_end": summary["reward/end"], "eval": figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", nargs="+", default=DEFAULT)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, help="override every pipeline's step budget")
    ap.add_argument("--set", action="append", default=[], help="passed to rlflow run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", choices=["arith", "chain"], default="arith",
                    help="chain: run on builtin:arith-chain with builtin:tiny-arith-chain (default: the files as they are)")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rlflow-learning-"))
    results = []
    for name in args.pipelines:
        for seed in args.seeds:
            r = run_one(name, seed, args.steps, args.set, args.threads, root, args.task)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(json.dumps({"runs": results}))


if __name__ == "__main__":
    main()
