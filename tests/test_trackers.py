"""Trackers (``rlflow run --log ...``): every metric of metrics.jsonl reaches each, read back
from what it wrote — the CSV file and TensorBoard's event files always (tensorboard is in
the dev extra; its tests skip without it), W&B and MLflow offline when installed."""

import csv
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlflow import trackers
from rlflow.cli import main
from rlflow.loader import UserError, load_pipeline

REPO = Path(__file__).parent.parent
has = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "wandb", "mlflow")}
RECORDS = [
    {"step": 1, "seconds": 0.5, "rows": 16, "reward/mean": 0.25, "loss/pg": -0.01,
     "nodes": {"generate": {"seconds": 0.3, "rows": 16, "tokens": 64, "tokens_per_s": 213.3}}},
    {"step": 2, "seconds": 0.4, "rows": 16, "reward/mean": 0.5, "loss/pg": 0.02, "eval/accuracy": 0.3, "kl/mean": 0.01,
     "nodes": {"generate": {"seconds": 0.2, "rows": 16, "tokens": 64, "tokens_per_s": 320.0}}},
]
SAMPLES = [{"step": 1, "prompt": "1+1=", "response": "2", "answer": "2", "reward": 1.0}]


def feed(tracker):
    """The engine's events of a two-step run with an evaluation before, at step 2 and after."""
    tracker.start(SimpleNamespace(pipeline=load_pipeline(REPO / "pipelines" / "grpo.py")))
    tracker.evaluated(0, {"eval/accuracy": 0.2})
    tracker.step(1, RECORDS[0])
    tracker.samples(1, SAMPLES)
    tracker.evaluated(2, {"eval/accuracy": 0.3})
    tracker.step(2, RECORDS[1])
    tracker.samples(2, SAMPLES)
    tracker.evaluated(2, {"eval/accuracy": 0.35})  # the final evaluation, after the last step
    tracker.end({"reward/start": 0.25, "reward/end": 0.5})


def test_flatten_names_every_number():
    flat = trackers.flatten(RECORDS[0])
    assert flat == {"time/step_s": 0.5, "rows": 16.0, "reward/mean": 0.25, "loss/pg": -0.01,
                    "time/generate/seconds": 0.3, "time/generate/tokens_per_s": 213.3}


def test_unknown_or_missing_trackers_are_refused_before_anything_loads(monkeypatch):
    with pytest.raises(UserError, match="RF111 --log csv,tensorbored: unknown tracker 'tensorbored'"):
        trackers.parse("csv,tensorbored")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"the wandb package is not installed \(pip install 'rlflow\[wandb\]'\)"):
        trackers.parse("wandb")
    assert trackers.parse("csv, csv") == ["csv"]


def test_csv_has_a_row_per_step_and_a_column_per_metric(tmp_path):
    feed(trackers.CsvTracker(tmp_path))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["eval/accuracy"] == "0.2" and rows[2]["eval/accuracy"] == "0.35"  # the last figure of step 2
    assert rows[1]["reward/mean"] == "0.25" and rows[2]["reward/mean"] == "0.5" and rows[2]["kl/mean"] == "0.01"
    assert rows[1]["time/generate/seconds"] == "0.3" and rows[1]["kl/mean"] == ""


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(not has["tensorboard"], reason="tensorboard is not installed (pip install 'rlflow[tensorboard]')")
def test_tensorboard_event_files_hold_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    feed(trackers.TensorBoardTracker(tmp_path))
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["reward/mean"] == [(1, 0.25), (2, 0.5)]
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 2, 2]
    assert scalars["time/generate/tokens_per_s"][1][1] == pytest.approx(320.0)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"config/text_summary", "samples/text_summary"} <= set(acc.Tags()["tensors"])


@pytest.mark.skipif(not has["wandb"], reason="wandb is not installed (pip install 'rlflow[wandb]')")
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    feed(trackers.WandbTracker(tmp_path))
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb")) and list((run / "files" / "media" / "table").glob("samples_*.table.json"))


@pytest.mark.skipif(not has["mlflow"], reason="mlflow is not installed (pip install 'rlflow[mlflow]')")
def test_mlflow_local_store_holds_metrics_params_and_artifacts(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "samples.jsonl").write_text(json.dumps(SAMPLES[0]) + "\n")
    feed(trackers.MlflowTracker(tmp_path))
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("rlflow").experiment_id])
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert run.data.params["nodes.4.kl"] == "k3"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.json", "samples.jsonl"}


def test_a_run_logs_to_csv_and_tensorboard_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    log = "csv,tensorboard" if has["tensorboard"] else "csv"
    assert main(["run", "grpo", "--steps", "2", "--out", str(out), "--log", log, "--set", "data.batch_size=2",
                 "--set", "generate.n=2", "--set", 'pipeline.eval={"size": 8}', "--threads", "1"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = {int(r["step"]): r for r in csv.DictReader((out / "metrics.csv").open())}
    assert sorted(rows) == [0, 1, 2]
    for rec in records:  # every number of every record is in the CSV
        for key, value in trackers.flatten(rec).items():
            assert float(rows[rec["step"]][key]) == pytest.approx(value), key
    if has["tensorboard"]:
        scalars = _scalars(out / "tensorboard")
        assert [v for _, v in scalars["reward/mean"]] == pytest.approx([r["reward/mean"] for r in records])
        assert {k for k in trackers.flatten(records[-1]) if not k.startswith("eval/")} <= set(scalars)
