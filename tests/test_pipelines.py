"""Every shipped pipeline: a fast run of a couple of steps (default suite), and a
learning run at its full budget that must raise the held-out figure (marked slow:
`make test-slow`)."""

import json
import math
from pathlib import Path

import pytest

from rlflow.engine import Run
from rlflow.graph import build
from rlflow.loader import apply_overrides, load_pipeline
from rlflow.spec import LOSSES

PIPES = sorted(p for p in (Path(__file__).parent.parent / "pipelines").glob("*.py") if p.name != "__init__.py")
SMALL = {"data.batch_size=4", "pipeline.eval=null"}


def small(path):
    p = load_pipeline(path)
    sets = ["data.batch_size=4", "pipeline.eval=null"]
    if p.name == "sft":  # its own model is the untrained one; keep it
        sets.append("policy.micro_batch_size=2")
    return apply_overrides(p, sets)


@pytest.mark.parametrize("path", PIPES, ids=[p.stem for p in PIPES])
def test_pipeline_runs_two_steps(path, tmp_path):
    p = small(path)
    run = Run(p, build(p), tmp_path / p.name)
    run.setup()
    run.train(2)
    records = [json.loads(x) for x in (tmp_path / p.name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    losses = [k for k in records[-1] if k.startswith("loss/")]
    assert losses, records[-1]
    for r in records:  # a NaN or infinite loss fails the smoke test (json writes them as NaN/Infinity)
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in losses), r
        assert not any(v for k, v in r.items() if k.startswith("update/nonfinite_skipped/")), r
    policy = [n for n in p.nodes if n.stage == "update" and LOSSES[n.variant].entropy]
    trained = [r for r in records if "loss/pg" in r]  # (a value-pretraining phase leaves the actor idle)
    if policy:  # every step of a policy loss logs the policy's entropy and verl's ppo_kl
        assert all(math.isfinite(r["entropy/mean"]) and r["entropy/mean"] > 0 and math.isfinite(r["ppo_kl"])
                   for r in trained), records[-1]


# The figure each learning run must raise, and by how much (points of accuracy), within
# the pipeline's own step budget. Measured figures are in docs/algorithms.md.
LEARNING = {
    "grpo": ("eval/accuracy", 25), "dr_grpo": ("eval/accuracy", 15), "dapo": ("eval/accuracy", 15),
    "rloo": ("eval/accuracy", 15), "reinforce_pp": ("eval/accuracy", 15), "remax": ("eval/accuracy", 15),
    "ppo": ("eval/accuracy", 15), "vc_ppo": ("eval/accuracy", 15), "vapo": ("eval/accuracy", 15),
    "dpo": ("eval/preference_accuracy", 5), "online_dpo": ("eval/accuracy", 15), "grpo_lora": ("eval/accuracy", 15),
    "gspo": ("eval/accuracy", 15), "cispo": ("eval/accuracy", 15), "sapo": ("eval/accuracy", 15),
    "reinforce_pp_baseline": ("eval/accuracy", 15), "opo": ("eval/accuracy", 15), "gpg": ("eval/accuracy", 15),
    "rft": ("eval/accuracy", 15), "online_rft": ("eval/accuracy", 15),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEARNING) + ["reward_model"])
def test_pipeline_learns(name, tmp_path):
    p = load_pipeline(Path(__file__).parent.parent / "pipelines" / f"{name}.py")
    run = Run(p, build(p), tmp_path / name)
    run.setup()
    s = run.train()
    if name == "reward_model":
        assert s["eval_after"]["eval/rm_accuracy/rm"] >= 0.90
        return
    key, points = LEARNING[name]
    assert s["eval_after"][key] - s["eval_before"][key] >= points / 100, (s["eval_before"], s["eval_after"])
    if name in ("dpo", "online_dpo"):  # both the preference ranking and the task itself improve
        for k in ("eval/accuracy", "eval/preference_accuracy"):
            assert s["eval_after"][k] > s["eval_before"][k], k
    if name != "rft":  # rft's samples (and so its rewards) come from a frozen copy: they do not move
        assert s["reward/end"] is None or s["reward/end"] > s["reward/start"]


@pytest.mark.parametrize("path", PIPES, ids=[p.stem for p in PIPES])
def test_pipeline_file_is_short_and_explains_itself(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 40
    doc = text.split('"""')[1]
    assert "rlflow run pipelines/" in doc and "--set" in doc  # how to run it, and an override example
