#!/usr/bin/env bash
# TRL's GRPOTrainer against rlflow before and after a change, on a machine too busy for single runs.
# usage: benchmarks/side_by_side_reps.sh BEFORE_DIR AFTER_DIR        (env: REPS=4, THREADS="1 2")
# The commands of ../shared/bench/trl/side_by_side.sh (its TRL venv and tiny model, made on first use
# by that script), REPS times per thread count; within each repetition, one after the other: TRL,
# BEFORE's rlflow, AFTER's rlflow in fp32, AFTER's rlflow in bf16 (--precision bf16; TRL stays fp32).
# Each rlflow run is paired with the TRL run of its repetition; prints, per thread count, every
# ratio and their median. BEFORE_DIR and AFTER_DIR are checkouts with their own .venv.
set -euo pipefail
here=$(cd "$(dirname "$0")/../../shared/bench/trl" 2>/dev/null && pwd || echo /work/shared/bench/trl)
before=$(cd "${1:?before dir}" && pwd); after=$(cd "${2:?after dir}" && pwd)
TRL=${TRL_VENV:-$HOME/.cache/trl-bench-venv}/bin/python
work=${WORK:-$HOME/.cache/trl-bench-reps}; mkdir -p "$work"; cd "$work"
[ -d build/tiny_model ] || "$TRL" "$here/make_tiny_model.py" >/dev/null 2>&1
REPS=${REPS:-4}; THREADS=${THREADS:-1 2}
for t in $THREADS; do for rep in $(seq 1 "$REPS"); do
  "$TRL" "$here/trl_grpo_bench.py" --steps 10 --warmup 3 --prompts 16 --group 8 --max-new-tokens 16 \
      --model-path build/tiny_model --threads "$t" 2>/dev/null | tail -1 > "trl_t${t}_r${rep}.json"
  for v in before after bf16; do
    dir=$after; extra=""
    [ $v = before ] && dir=$before
    [ $v = bf16 ] && extra="--precision bf16"
    "$dir/.venv/bin/python" "$dir/benchmarks/grpo_step.py" --model "$work/build/tiny_model" --threads "$t" \
        --no-baseline $extra 2>/dev/null | tail -1 > "${v}_t${t}_r${rep}.json"
  done
done; done
python3 - "$work" "$REPS" $THREADS <<'PY'
import json, sys, statistics
work, reps, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for t in threads:
    trl = [json.load(open(f"{work}/trl_t{t}_r{r}.json"))["median_step_s"] for r in range(1, reps + 1)]
    row = {"threads": int(t), "trl_step_s": trl}
    for v in ("before", "after", "bf16"):
        s = [json.load(open(f"{work}/{v}_t{t}_r{r}.json"))["rlflow"]["step_s_median"] for r in range(1, reps + 1)]
        ratios = [round(a / b, 3) for a, b in zip(s, trl)]
        row[v] = {"step_s": s, "over_trl": ratios, "over_trl_median": statistics.median(ratios)}
    print(json.dumps(row))
PY
