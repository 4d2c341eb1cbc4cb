"""Response length of correct and of incorrect samples over training, as data.

The Dr. GRPO paper (arXiv 2503.20783, Fig. 5) finds that GRPO's per-response 1/|o| lets
incorrect responses grow longer while correct ones do not; on `builtin:arith` responses
are 3-4 tokens, so the task for this is `builtin:arith-chain` (docs/length.md).

    .venv/bin/python benchmarks/length.py --run grpo dr_grpo --steps 120 --out runs/length
    .venv/bin/python benchmarks/length.py runs/length/grpo-s0 runs/length/dr_grpo-s0 --every 10
    .venv/bin/python benchmarks/length.py runs/length/*-s0 --markdown   # the tables of docs/length.md

With `--run`, the pipelines are first run on the chain task by benchmarks/learning.py's
`run_one` (1 torch thread, seed 0 unless --seed) into `--out`. Then each run's
metrics.jsonl is read: Score's `response_length/correct/mean` and
`response_length/incorrect/mean`, `reward/mean` and the engine's `response_length/mean`,
averaged over windows of `--every` steps (the mean of the per-step means, over the steps
that have the key). Prints one JSON line: per run, the window ends and the curves, and the
held-out accuracy before and after from summary.json (with --markdown, tables instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = {"correct": "response_length/correct/mean", "incorrect": "response_length/incorrect/mean",
        "all": "response_length/mean", "reward": "reward/mean"}


def window_means(records: list[dict], key: str, every: int) -> list[float | None]:
    """The mean of ``key`` over each window of ``every`` steps (None where no step has it)."""
    last = max((r["step"] for r in records), default=0)
    out = []
    for end in range(every, last + every, every):
        vals = [r[key] for r in records if end - every < r["step"] <= end and isinstance(r.get(key), (int, float))]
        out.append(round(sum(vals) / len(vals), 3) if vals else None)
    return out


def curves(run: Path, every: int) -> dict:
    """The length curves and the held-out figures of one run directory."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max((r["step"] for r in records), default=0)
    out = {"steps": [min(end, last) for end in range(every, last + every, every)]}
    out.update({name: window_means(records, key, every) for name, key in KEYS.items()})
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        out["eval_before"] = s["eval_before"].get("eval/accuracy")
        out["eval_after"] = s["eval_after"].get("eval/accuracy")
    return out


def markdown(result: dict) -> str:
    """One table per run: window end, then each curve's value."""
    parts = []
    for name, c in result.items():
        rows = [f"**{name}** (held-out accuracy {_pct(c.get('eval_before'))} → {_pct(c.get('eval_after'))})", "",
                "| steps ≤ | correct | incorrect | all (trained rows) | reward/mean |", "| --- | --- | --- | --- | --- |"]
        for i, step in enumerate(c["steps"]):
            cells = [_num(c[k][i]) for k in ("correct", "incorrect", "all", "reward")]
            rows.append(f"| {step} | " + " | ".join(cells) + " |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def _num(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run directories to read")
    ap.add_argument("--run", nargs="+", default=[], metavar="PIPELINE", help="shipped pipelines to run on the chain task first")
    ap.add_argument("--steps", type=int, help="with --run: override each pipeline's step budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="with --run: passed to rlflow run")
    ap.add_argument("--out", type=Path, default=Path("runs/length"), help="with --run: where the runs go")
    ap.add_argument("--every", type=int, default=10, help="steps per window")
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/length.md instead of JSON")
    args = ap.parse_args()
    runs = list(args.runs)
    if args.run:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from learning import run_one

        for name in args.run:
            r = run_one(name, args.seed, args.steps, args.set, 1, args.out, task="chain")
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(args.out / f"{name}-s{args.seed}")
    result = {run.name: curves(run, args.every) for run in runs}
    print(markdown(result) if args.markdown else json.dumps(result))


if __name__ == "__main__":
    main()
