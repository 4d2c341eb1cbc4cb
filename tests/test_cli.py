"""The real CLI: an end-to-end GRPO run on the built-in tiny model, and the views."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import clean_env

from rlflow.cli import main

REPO = Path(__file__).parent.parent
PIPES = REPO / "pipelines"
FIX_DIR = Path(__file__).parent / "fixtures"


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


def test_a_shipped_pipeline_is_found_by_name(capsys):
    assert main(["graph", "grpo"]) == 0 and "grpo  5 nodes, 2 models" in capsys.readouterr().out
    assert main(["validate", "dapo", "gsm8k_grpo"]) == 0
    out = capsys.readouterr().out
    assert "dapo: ok (dapo: 5 nodes, 1 model)" in out and "gsm8k_grpo: ok" in out
    assert main(["run", "grpp"]) == 2
    assert "RF100 grpp: no such pipeline file, nor a shipped pipeline of that name; did you mean 'grpo'?" in capsys.readouterr().err


def test_debug_is_accepted_after_the_command(capsys):
    assert main(["run", str(FIX_DIR / "wrong_type.py"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["graph", "grpo", "--debug"]) == 0


def test_every_argument_of_every_command_has_help():
    import argparse

    from rlflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    assert all(a.help for a in sub._choices_actions)  # every command too
    graph_all = next(a for a in sub.choices["graph"]._actions if a.dest == "all")
    assert "every parameter" in graph_all.help and "data source" in graph_all.help
