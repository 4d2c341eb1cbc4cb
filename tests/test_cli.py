"""The real CLI: an end-to-end GRPO run on the built-in tiny model, and the views."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import clean_env

from rlflow.cli import main

REPO = Path(__file__).parent.parent
PIPES = REPO / "pipelines"


def rlflow(*args, **kw):
    env = clean_env()
    return subprocess.run([sys.executable, "-m", "rlflow", *args], capture_output=True, text=True, env=env, **kw)


def test_grpo_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "run"
    r = rlflow("run", str(PIPES / "grpo.py"), "--steps", "3", "--out", str(out), "--set", "data.batch_size=4",
               "--set", "generate.n=4", "--set", 'pipeline.eval={"size": 40}', timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    # not a TTY: the graph, plain per-step lines, then the summary
    assert "stage 1" in r.stdout and "generate [generate] @actor" in r.stdout
    assert "step 3" in r.stdout and "held-out greedy accuracy" in r.stdout
    assert "ref_logprob" in r.stdout and "share" in r.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["rows"] == 16 for x in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_after"]["eval/accuracy"] <= 1.0
    assert (out / "final" / "config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["batch_size"] == 4 and cfg["nodes"][0]["n"] == 4  # the overrides are recorded
    rep = rlflow("report", str(out))
    assert rep.returncode == 0 and "reward" in rep.stdout and "last samples" in rep.stdout


def test_graph_shows_nodes_models_and_edges(capsys):
    assert main(["graph", str(PIPES / "grpo.py")]) == 0
    text = capsys.readouterr().out
    for words in ("actor: builtin:tiny-arith", "ref: builtin:tiny-arith", "advantage [advantage:group_norm]",
                  "← score: rewards", "← ref_logprob: ref_logprobs", "kl_coef=0.04", "agg=seq-mean-token-mean",
                  "update: 1 epoch x 1 mini-batch"):
        assert words in text, words


def test_graph_shows_refill_loop_and_phases(capsys):
    assert main(["graph", str(PIPES / "dapo.py")]) == 0
    assert "↺ refills: re-runs generate, score on fresh prompts" in capsys.readouterr().out
    assert main(["graph", str(PIPES / "vapo.py")]) == 0
    assert "steps 1-20: trains only critic" in capsys.readouterr().out


def test_compare_grpo_and_dr_grpo_shows_exactly_the_differences(capsys):
    assert main(["compare", str(PIPES / "grpo.py"), str(PIPES / "dr_grpo.py")]) == 0
    text = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines()
            if line.startswith("│")}
    assert rows["nodes.advantage.variant"] == ["group_norm", "group_center"]
    assert rows["nodes.loss.agg"] == ["seq-mean-token-mean", "seq-mean-token-sum-norm"]
    assert rows["nodes.loss.agg_constant"] == ["null", "4"]  # resolved from generate.max_new_tokens
    assert rows["models.ref"] == ["builtin:tiny-arith (frozen)", "—"] and rows["nodes.ref_logprob"] == ["ref_logprob", "—"]
    assert not any(k.startswith("nodes.generate") for k in rows)  # identical settings are not shown


def test_list_names_every_pipeline(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for f in PIPES.glob("*.py"):
        if f.name != "__init__.py":
            assert f.name in text


def test_validate_every_shipped_pipeline(capsys):
    files = [str(f) for f in sorted(PIPES.rglob("*.py"))]
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len([f for f in files if not f.endswith("__init__.py")])
