"""Reward rules run isolated, in worker processes (rlflow.rules; DESIGN.md "Runs, outputs,
failures"): a hung, exiting, crashing or leaking rule fails with the rule, the sample and
the cause, and the pool goes on working. Rules used through the pool must be module-level
functions, so they are defined here at the top (a worker imports this module: keep its
imports light)."""

import ctypes
import math
import os
import sys
import textwrap
import time

import numpy as np
import pytest

from rlflow.rules import RewardRuleError, RulePool, RuleWarning

ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
TEXTS = ["1", "2", "3", "x"]


def exact(response, row):
    return float(response == row["answer"])


def sleepy(response, row):
    time.sleep(0.3)
    return 1.0


def stubborn(response, row):  # catches whatever is raised to stop it
    while True:
        try:
            time.sleep(0.05)
        except BaseException:  # noqa: BLE001
            pass


def exits(response, row):
    sys.exit(3)


def hard_exit(response, row):
    os._exit(0)


def segfault(response, row):
    ctypes.string_at(0)


def leaks(response, row):
    return float(len(bytearray(8 * 2**30)))


def numpy_scalar(response, row):
    return {"1": np.float32(0.5), "2": np.int64(2), "3": np.bool_(True), "x": True}[response]


def overflows(response, row):
    return 1e39 if response == "3" else 0.0


def not_a_number(response, row):
    return math.nan if response == "x" else 0.0


def worker_pid(response, row):
    return float(os.getpid())


@pytest.fixture(scope="module")
def pool():
    with RulePool(size=2, timeout_s=0.5, memory_mb=256) as p:
        yield p


def test_a_batch_is_scored_in_parallel():
    with RulePool(size=2) as p:
        assert p.score("exact", exact, TEXTS, ROWS) == [1.0, 1.0, 1.0, 0.0]  # workers started and warm
        t0 = time.perf_counter()
        assert p.score("sleepy", sleepy, TEXTS, ROWS) == [1.0] * 4
        elapsed = time.perf_counter() - t0
    assert elapsed / (4 * 0.3) < 0.75  # serially it takes 1.2 s; two workers take about half


def test_a_hung_rule_that_catches_exceptions_is_killed_at_its_limit(pool):
    t0 = time.perf_counter()
    with pytest.raises(RewardRuleError, match=r"'stubborn' hung: still running at its time limit of 0.5s") as e:
        pool.score("stubborn", stubborn, TEXTS, ROWS)
    assert time.perf_counter() - t0 < 30  # it never ends by itself: any bound shows it was stopped
    assert "on response '" in str(e.value) and "'answer': '" in str(e.value)
    assert pool.score("exact", exact, TEXTS, ROWS) == [1.0, 1.0, 1.0, 0.0]  # the worker was replaced


@pytest.mark.parametrize("rule, cause", [
    (exits, r"called sys.exit\(3\)"),
    (hard_exit, "took down its worker process: exited with code 0"),
    (segfault, "took down its worker process: killed by signal SIGSEGV"),
    (leaks, r"raised MemoryError \(a worker may use 256 MiB\)"),
])
def test_a_rule_that_exits_or_crashes_fails_with_the_cause_and_the_pool_goes_on(pool, rule, cause):
    with pytest.raises(RewardRuleError, match=f"reward rule '{rule.__name__}' {cause} on response '.' for row {{'prompt'"):
        pool.score(rule.__name__, rule, TEXTS, ROWS)
    assert pool.score("exact", exact, TEXTS, ROWS) == [1.0, 1.0, 1.0, 0.0]


def test_numpy_scalars_and_bools_are_rewards(pool):
    assert pool.score("numpy", numpy_scalar, TEXTS, ROWS) == [0.5, 2.0, 1.0, 1.0]


def test_a_value_that_overflows_float32_or_is_nan_is_refused_with_the_sample(pool):
    with pytest.raises(RewardRuleError, match=r"returned 1e\+39, which overflows float32.* on response '3' for row .*'answer': '3'"):
        pool.score("big", overflows, TEXTS, ROWS)
    with pytest.raises(RewardRuleError, match=r"returned nan \(not a finite number\) on response 'x' for row .*'answer': '4'"):
        pool.score("nan", not_a_number, TEXTS, ROWS)


def test_the_traceback_of_a_raising_rule_is_the_cause(pool):
    with pytest.raises(RewardRuleError, match="raised KeyError: 'answer' on response '.' for row {}") as e:
        pool.score("bad", exact, TEXTS, [{}] * 4)
    assert 'row["answer"]' in str(e.value.__cause__)


def test_a_rule_defined_in_a_pipeline_file_runs_in_a_worker(pool, tmp_path):
    from rlflow.loader import load_pipeline

    (tmp_path / "helper.py").write_text("SEVEN = '7'\n")  # a sibling module, as for a script
    (tmp_path / "pipe.py").write_text(textwrap.dedent("""
        import os
        from helper import SEVEN
        from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score

        def ends_in_7(response, row):
            return float(response.endswith(SEVEN))

        def pid(response, row):
            return float(os.getpid())

        pipeline = Pipeline(name="p", data=Prompts("builtin:arith", batch_size=2),
                            models={"actor": Model("builtin:tiny-arith-init", train=True)},
                            nodes=[Generate("actor", n=2, max_new_tokens=2), Score(rule=ends_in_7),
                                   Advantage("group_norm"), Loss("clip")])
    """))
    fn = load_pipeline(tmp_path / "pipe.py").node("score").rules["ends_in_7"].fn
    assert fn.__module__.startswith("rlflow_pipeline_")  # a module no other process can import by name
    assert pool.score("ends_in_7", fn, ["17", "18", "27", "7"], ROWS) == [1.0, 0.0, 1.0, 1.0]
    pids = pool.score("pid", sys.modules[fn.__module__].pid, TEXTS, ROWS)
    assert os.getpid() not in pids


def test_a_lambda_runs_in_this_process_with_a_warning(pool):
    with pytest.warns(RuleWarning, match="cannot be sent to a worker process"):
        assert pool.score("len", lambda r, row: len(r), ["ab", "c"], [{}, {}]) == [2.0, 1.0]


def test_sys_exit_in_a_pipeline_file_is_a_load_error(tmp_path, capsys):
    from rlflow.cli import main

    f = tmp_path / "quits.py"
    f.write_text("import sys\nsys.exit(0)\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "RF105" in err and f"{f}:2" in err and "sys.exit(0)" in err


def test_the_score_node_scores_in_worker_processes_and_closes_them():
    import torch

    from rlflow import Score
    from rlflow.batch import Batch
    from rlflow.node import Context
    from rlflow.nodes.score import ScoreRunner

    runner = ScoreRunner(Score(rules={"pid": worker_pid, "exact": (exact, 2.0)}))
    batch = Batch({"response": TEXTS, "prompt": [r["prompt"] for r in ROWS], "answer": [r["answer"] for r in ROWS],
                   "response_mask": torch.ones(4, 3), "truncated": torch.zeros(4, dtype=torch.bool)})
    runner.run(batch, Context(workers={}, generator=None))
    assert os.getpid() not in batch["rewards_pid"].tolist()
    assert batch["rewards_exact"].tolist() == [1.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(batch["rewards"], batch["rewards_pid"] + 2.0 * batch["rewards_exact"])
    workers = list(runner._own_pool._workers)
    runner.close()
    assert workers and all(w.proc.poll() is not None for w in workers)
