"""Experiment trackers: a run's metrics to TensorBoard, Weights & Biases, MLflow or a CSV file.

``rlflow run FILE --log tensorboard,wandb,mlflow,csv`` adds one observer per tracker
beside the terminal view (rank 0 only). Every metric of metrics.jsonl goes to each
(flattened by :func:`flatten`: node timings become ``time/<node>/seconds`` and
``time/<node>/tokens_per_s``, the step's wall time ``time/step_s``), held-out figures at
the step they were measured (step 0 for the one before training), the resolved config, and
the samples where the tracker has tables or text.

Where each writes, inside the run directory unless configured otherwise:

- ``csv``: ``metrics.csv``, one row per step (and one for step 0's evaluation), a column
  per metric; no extra package.
- ``tensorboard``: ``tensorboard/`` event files (``pip install 'rlflow[tensorboard]'``):
  scalars, the config and the samples as text.
- ``wandb``: a run in project ``$WANDB_PROJECT`` (default ``rlflow``), under ``wandb/``;
  offline (``wandb sync`` later) when ``$WANDB_MODE`` is unset and the W&B server cannot
  be reached (``pip install 'rlflow[wandb]'``). The samples are logged as tables.
- ``mlflow``: a run in experiment ``rlflow`` at ``$MLFLOW_TRACKING_URI``, default a local
  store in ``mlruns/`` of the run directory (``pip install 'rlflow[mlflow]'``); the config
  as parameters and ``config.json``, samples.jsonl as an artifact at the end.

Unknown names and trackers whose package is missing are refused before anything loads
(RF111).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from rlflow.loader import UserError

# name -> (module that must be importable, the extra that installs it)
KNOWN = {"csv": (None, None), "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "mlflow": ("mlflow", "mlflow")}


def parse(value: Optional[str]) -> list[str]:
    """The tracker names of ``--log a,b`` (RF111 for an unknown one or a missing package)."""
    names = [x.strip() for x in (value or "").split(",") if x.strip()]
    for name in names:
        if name not in KNOWN:
            raise UserError("RF111", f"--log {value}: unknown tracker {name!r}; known: {', '.join(KNOWN)}")
        module, extra = KNOWN[name]
        if module and importlib.util.find_spec(module) is None:
            raise UserError("RF111", f"--log {name}: the {module} package is not installed (pip install 'rlflow[{extra}]')")
    return list(dict.fromkeys(names))


def make(names: list[str], out_dir: Path) -> list["Tracker"]:
    """One tracker per name, writing into ``out_dir``."""
    kinds = {"csv": CsvTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
    return [kinds[n](out_dir) for n in names]


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record under flat names (the step itself left out)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "nodes" and isinstance(v, dict):
            for node, t in v.items():
                out[f"time/{node}/seconds"] = float(t["seconds"])
                out[f"time/{node}/tokens_per_s"] = float(t.get("tokens_per_s", 0.0))
        elif k == "seconds":
            out["time/step_s"] = float(v)
        elif k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``nodes.0.eps -> "0.2"``: the config's leaves as strings (tracker parameters)."""
    out: dict[str, str] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)) and v:
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def samples_markdown(lines: list[dict[str, Any]]) -> str:
    """Samples as a markdown table (prompt, response, expected answer, reward)."""
    rows = ["| prompt | response | answer | reward |", "| --- | --- | --- | --- |"]
    for s in lines:
        cells = [str(s.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in ("prompt", "response", "answer", "reward")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


class Tracker:
    """An observer that sends a run's numbers somewhere. Subclasses implement :meth:`scalars`
    and may add :meth:`begin` (config), :meth:`table` (samples) and :meth:`finish`."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    # the engine's events
    def message(self, text: str) -> None: ...
    def doing(self, text: str) -> None: ...

    def start(self, run) -> None:
        self.begin(run.pipeline.to_config(), run.pipeline.name)

    def evaluated(self, step: int, figures: dict[str, float]) -> None:
        if figures:
            self.scalars(step, {k: float(v) for k, v in figures.items()})

    def step(self, step: int, record: dict[str, Any]) -> None:
        # held-out figures came through evaluated() at this step already
        self.scalars(step, {k: v for k, v in flatten(record).items() if not k.startswith("eval/")})

    def samples(self, step: int, lines: list[dict[str, Any]]) -> None:
        if lines:
            self.table(step, lines)

    def end(self, summary: dict[str, Any]) -> None:
        self.finish(summary)

    def close(self) -> None: ...

    # what a tracker implements
    def begin(self, config: dict[str, Any], name: str) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: raise NotImplementedError
    def table(self, step: int, lines: list[dict[str, Any]]) -> None: ...
    def finish(self, summary: dict[str, Any]) -> None: ...


class CsvTracker(Tracker):
    """``metrics.csv``: a row per step, a column per metric (the file is rewritten when a new
    metric appears, appended to otherwise)."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir)
        self.path = self.out_dir / "metrics.csv"
        self.rows: dict[int, dict[str, float]] = {}
        self.columns: list[str] = []
        self.written: set[int] = set()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        row = self.rows.setdefault(step, {})
        row.update(values)
        new = [k for k in values if k not in self.columns]
        self.columns += new
        if new or step in self.written:
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.writer(f).writerow(self._cells(step))
            self.written.add(step)

    def _cells(self, step: int) -> list[Any]:
        row = self.rows[step]
        return [step] + [row.get(c, "") for c in self.columns]

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step"] + self.columns)
            for step in sorted(self.rows):
                w.writerow(self._cells(step))
        self.written = set(self.rows)


class TensorBoardTracker(Tracker):
    """Event files in ``tensorboard/``: every metric as a scalar; config and samples as text."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def begin(self, config: dict[str, Any], name: str) -> None:
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, step: int, lines: list[dict[str, Any]]) -> None:
        self.writer.add_text("samples", samples_markdown(lines), step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _wandb_mode() -> str:
    """``$WANDB_MODE`` if set, else online when the W&B server answers within 2 s, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    from rlflow.models import _reachable

    return "online" if _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), 2.0) else "offline"


class WandbTracker(Tracker):
    """A W&B run (offline when the server cannot be reached): metrics, config, sample tables."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir)
        self.run = None

    def begin(self, config: dict[str, Any], name: str) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlflow"), name=self.out_dir.name,
                              dir=str(self.out_dir), config=config, mode=_wandb_mode(), reinit="finish_previous")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def table(self, step: int, lines: list[dict[str, Any]]) -> None:
        if self.run is not None:
            cols = ["prompt", "response", "answer", "reward"]
            self.run.log({"samples": self.wandb.Table(columns=cols, data=[[s.get(c) for c in cols] for s in lines])}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            for k in ("reward/start", "reward/end"):
                if summary.get(k) is not None:
                    self.run.summary[k] = summary[k]
            self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


_MLFLOW_NAME = re.compile(r"[^\w\-. /]")


class MlflowTracker(Tracker):
    """An MLflow run (a local store in the run directory unless ``$MLFLOW_TRACKING_URI``)."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir)
        self.active = False

    def begin(self, config: dict[str, Any], name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store needs no server
            mlflow.set_tracking_uri((self.out_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlflow"))
        mlflow.start_run(run_name=self.out_dir.name)
        self.active = True
        params = {_MLFLOW_NAME.sub("_", k)[:250]: v[:6000] for k, v in flat_config(config).items()}
        mlflow.log_params(params)
        mlflow.log_dict(config, "config.json")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.active:
            self.mlflow.log_metrics({_MLFLOW_NAME.sub("_", k): v for k, v in values.items()}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.active and (self.out_dir / "samples.jsonl").exists():
            self.mlflow.log_artifact(str(self.out_dir / "samples.jsonl"))
        self.close()

    def close(self) -> None:
        if self.active:
            self.mlflow.end_run()
            self.active = False
