#!/usr/bin/env bash
# The GPU check of rlflow (docs/scaling.md), for a machine with NVIDIA GPUs. The project never
# needs one to build and pass its tests (make test); this is the check to run where there is.
#
#   benchmarks/gpu_check.sh              # every GPU of the machine
#   NGPU=4 STEPS=5 benchmarks/gpu_check.sh
#
# 1. installs (make install: the CUDA build of torch when nvidia-smi is present),
# 2. runs the CUDA tests (tests/test_cuda.py: GRPO and PPO in fp32 and bf16, a ZeRO-3 reference),
# 3. runs GRPO and PPO for STEPS steps in bf16 under ZeRO-2 and ZeRO-3 (every model, the frozen
#    reference too), on 1 GPU and on NGPU GPUs, with benchmarks/scale.py,
# 4. prints one JSON line: per configuration, the step time, the seconds of each node,
#    generated tokens/s per GPU and the peak GPU memory of each model.
# Without CUDA it says so and exits with status 2 before installing anything.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi missing or it lists no device); nothing to check." >&2
    echo "gpu_check: rlflow builds and passes its tests without one: make test" >&2
    exit 2
fi
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-4}
PY=.venv/bin/python
LOG=${LOG:-runs/gpu_check}
mkdir -p "$LOG"

make install >&2
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: nvidia-smi sees a GPU but torch.cuda.is_available() is False (a CPU build of torch in .venv?)" >&2
    exit 2
fi
$PY -m pytest -q tests/test_cuda.py >&2

run() {  # run NAME NPROC FILE SETTINGS...: one JSON line into $LOG/NAME.json
    local name=$1 nproc=$2 file=$3
    shift 3
    local sets=()
    for s in "$@"; do sets+=(--set "$s"); done
    $PY -m torch.distributed.run --nproc_per_node "$nproc" --master_port $((29500 + RANDOM % 1000)) \
        benchmarks/scale.py steps "$file" --steps "$STEPS" "${sets[@]}" | tail -n 1 > "$LOG/$name.json"
    echo "gpu_check: $name done" >&2
}

for zero in 2 3; do
    for n in 1 "$NGPU"; do
        common=("actor.precision=bf16" "ref.precision=bf16" "actor.zero_stage=$zero" "ref.zero_stage=$zero")
        run "grpo-zero$zero-${n}gpu" "$n" pipelines/grpo.py "${common[@]}"
        run "ppo-zero$zero-${n}gpu" "$n" pipelines/ppo.py "${common[@]}" "critic.precision=bf16" "critic.zero_stage=$zero"
        [ "$n" = 1 ] && [ "$NGPU" = 1 ] && break
    done
done

$PY - "$LOG" <<'EOF'
import json, pathlib, sys
results = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
print(json.dumps({"gpu_check": "ok", "gpus": int(__import__("torch").cuda.device_count()), "runs": results}))
EOF
