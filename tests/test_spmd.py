"""The same pipeline file on two processes (torchrun, gloo on the CPU): each rank takes
its own prompts, statistics are all-reduced, and rank 0 writes the outputs."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import clean_env

FIX = Path(__file__).parent / "fixtures"


def test_two_processes_run_the_same_file(tmp_path):
    env = clean_env(DS_ACCELERATOR="cpu")
    # DeepSpeed JIT-builds a small op on first use; build it in one process first, since two
    # processes building it at once can crash one.
    subprocess.run([sys.executable, "-c", "from rlflow.models import setup_distributed; setup_distributed()"],
                   env=env, check=True, capture_output=True)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "rlflow", "run",
                        str(FIX / "spmd_grpo.py"), "--out", str(out), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [1, 2]  # one writer: rank 0
    assert records[0]["rows"] == 8  # 2 prompts x 4 samples on this rank
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "checkpoints" / "step_2" / "manifest.json").exists()
