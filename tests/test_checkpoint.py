"""Checkpoints and run directories: nothing lost, nothing let in.

Resume unpickles nothing (a planted pickle is refused and never runs), finds the newest
intact checkpoint (leftovers ignored, damaged ones named and skipped), a run directory is
locked and never reused by accident, resume refuses other settings unless told, and no
non-finite weight is ever written. On the tiny built-in model, few steps."""

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clean_env
from test_engine import grpo, run_of, weights

from rlflow import checkpoint, rundir, settings
from rlflow.checkpoint import NonFiniteWeightsError, ResumeError
from rlflow.cli import main
from rlflow.engine import Observer

FIXTURE = Path(__file__).parent / "fixtures" / "spmd_grpo.py"
# the fixture pipeline, as these tests run it: one process, checkpoints every step
CLI_SETTINGS = ["--quiet", "--steps", "2", "--set", "data.batch_size=4", "--set", "pipeline.save_every=1"]


class Plant:
    """Pickles into a call of ``open(marker, "w")``: unpickling it creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a torch file holding a pickle that writes ``marker`` when loaded."""
    path.unlink()
    torch.save({"module": Plant(marker), "optimizer_state_dict": Plant(marker)}, path)


def staged(stage):
    """The test pipeline with the actor under ZeRO ``stage``, a checkpoint every step."""
    p = grpo(seed=5, save_every=1, steps=3)
    actor = p.models["actor"].model_copy(update={"zero_stage": stage})
    return p.model_copy(update={"models": {"actor": actor, "ref": p.models["ref"]}})


class Messages(Observer):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def trained(request, tmp_path_factory):
    """A run directory with checkpoints of steps 1 and 2 (and the stage it used)."""
    root = tmp_path_factory.mktemp(f"trained{request.param}")
    run = run_of(staged(request.param), root)
    run.train(2)
    return root / "run", request.param


def copy_of(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# --- nothing let in -------------------------------------------------------------------------


def test_the_planted_pickle_runs_when_unpickled(tmp_path):
    # the attack is real: a plain (pickle) load writes the marker
    plant_file, marker = tmp_path / "x.pt", tmp_path / "marker"
    torch.save({}, plant_file)
    plant(plant_file, marker)
    torch.load(plant_file, weights_only=False)
    assert marker.exists()


def test_a_planted_pickle_in_any_checkpoint_file_is_refused(trained, tmp_path):
    # every file of the checkpoint (DeepSpeed's .pt files included), with the manifest left
    # as written (the hash catches it) or rewritten to match (the weights-only check does)
    src, stage = trained
    run = run_of(staged(stage), tmp_path, "fresh")
    step = src / "checkpoints" / "step_2"
    files = [p.relative_to(step) for p in sorted(step.rglob("*")) if p.is_file() and p.name != checkpoint.MANIFEST]
    assert any(f.suffix == ".pt" for f in files) and (stage == 0 or any("optim_states" in f.name for f in files))
    marker = tmp_path / "marker"
    for rel in files:
        for forge in (False, True):
            ckpt = tmp_path / "ckpt"
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.copytree(step, ckpt)
            plant(ckpt / rel, marker)
            if forge:
                checkpoint.write_manifest(ckpt, 2)
            with pytest.raises(ResumeError, match="refusing|damaged") as e:
                checkpoint.load(ckpt, run.workers)
            assert str(ckpt / rel) in str(e.value)
            assert not marker.exists(), (rel, forge)


def test_deepspeed_itself_loads_weights_only(trained, tmp_path, monkeypatch):
    # defence in depth: even with the up-front check skipped, DeepSpeed's own torch.load
    # of a planted (manifest-matching) file does not unpickle it
    src, stage = trained
    run = run_of(staged(stage), tmp_path, "fresh")
    ckpt = copy_of(src, tmp_path) / "checkpoints" / "step_2"
    marker = tmp_path / "marker"
    for f in (ckpt / "actor" / "deepspeed" / "state").glob("*.pt"):
        plant(f, marker)
    checkpoint.write_manifest(ckpt, 2)
    monkeypatch.setattr(checkpoint, "check_loadable", lambda *a: None)
    with pytest.raises(Exception):
        checkpoint.load(ckpt, run.workers)
    assert not marker.exists()


# --- nothing lost ---------------------------------------------------------------------------


def test_resume_is_exact_under_zero2(tmp_path):
    full = run_of(staged(2), tmp_path, "full")
    full.train(3)
    part = run_of(staged(2), tmp_path, "part")
    part.train(2)
    again = run_of(staged(2), tmp_path, "part")
    assert again.resume() == 2
    again.train(3)
    torch.testing.assert_close(weights(again), weights(full), rtol=0, atol=0)


def test_leftover_tmp_and_old_directories_are_ignored(trained, tmp_path):
    src, stage = trained
    out = copy_of(src, tmp_path)
    ckpts = out / "checkpoints"
    (ckpts / "step_3.tmp" / "actor").mkdir(parents=True)  # a write killed half-way
    shutil.copytree(ckpts / "step_2", ckpts / "step_2.old")  # a replace killed half-way
    (ckpts / "step_10.tmp").mkdir()
    assert checkpoint.latest(out) == ckpts / "step_2"
    run = run_of(staged(stage), tmp_path)
    assert run.resume() == 2


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous(trained, tmp_path):
    src, stage = trained
    out = copy_of(src, tmp_path)
    bad = next((out / "checkpoints" / "step_2" / "actor" / "deepspeed" / "state").glob("*optim_states.pt" if stage else "*.pt"))
    bad.write_bytes(bad.read_bytes()[:1000])
    said = Messages()
    run = run_of(staged(stage), tmp_path)
    run.observer = said
    assert run.resume() == 1
    assert any(str(bad) in line and "truncated" in line for line in said.lines), said.lines
    # with every checkpoint damaged there is nothing to resume from: a clear error, no guess
    (out / "checkpoints" / "step_1" / "state.rank0.json").write_text("{}")
    with pytest.raises(ResumeError, match="no intact checkpoint") as e:
        checkpoint.latest(out)
    assert str(bad) in str(e.value) and "state.rank0.json" in str(e.value)


def test_no_checkpoint_and_no_final_model_from_non_finite_weights(tmp_path):
    run = run_of(grpo(), tmp_path)
    with torch.no_grad():
        next(run.workers["actor"].module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="non-finite.*'actor'"):
        run.checkpoint(1)
    with pytest.raises(NonFiniteWeightsError):
        run.save_final()
    out = tmp_path / "run"
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not list(out.glob("final*"))


# --- run directories ------------------------------------------------------------------------


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    first = run_of(grpo(), tmp_path)
    with pytest.raises(rundir.RunDirError, match="in use by another run"):
        run_of(grpo(), tmp_path)
    # another process: refused too, with the holder's pid
    r = subprocess.run([sys.executable, "-c", f"from rlflow.rundir import lock; lock({str(tmp_path / 'run')!r})"],
                       env=clean_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "in use by another run" in r.stderr
    assert main(["run", str(FIXTURE), "--out", str(tmp_path / "run"), *CLI_SETTINGS]) == 2
    first.close()  # a finished run lets go
    rundir.lock(tmp_path / "run").release()


def test_an_existing_run_directory_needs_resume(tmp_path, capsys):
    for marker in rundir.RUN_MARKERS:
        out = tmp_path / marker
        out.mkdir()
        (out / marker).write_text("{}\n")
        assert main(["run", str(FIXTURE), "--out", str(out), *CLI_SETTINGS]) == 2
        assert "already holds a run" in capsys.readouterr().err
        assert (out / marker).read_text() == "{}\n"  # untouched


def test_default_run_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")  # the same second
    names = [rundir.default_out("grpo", tmp_path) for _ in range(3)]
    assert len(set(names)) == 3 and all(n.is_dir() for n in names)
    assert names[0].name == "grpo-20260101-000000"


def test_a_pipeline_file_records_the_same_settings_in_every_process():
    # rules defined in the file are recorded by module name: it must not vary by process
    code = f"import json; from rlflow.loader import load_pipeline; print(json.dumps(load_pipeline({str(FIXTURE)!r}).to_config()))"
    configs = [json.loads(subprocess.run([sys.executable, "-c", code], env=clean_env(PYTHONHASHSEED=seed), check=True,
                                         capture_output=True, text=True).stdout) for seed in ("1", "2")]
    assert settings.diff(*configs) == []


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run directory made by ``rlflow run``: 2 steps, checkpoints of both."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", str(FIXTURE), "--out", str(out), *CLI_SETTINGS]) == 0
    return out


def test_resume_with_other_settings_is_refused_unless_overridden(cli_run, tmp_path, capsys):
    out = copy_of(cli_run, tmp_path)
    before = (out / "config.json").read_text()
    assert main(["run", str(FIXTURE), "--resume", str(out), *CLI_SETTINGS, "--set", "loss.eps=0.3"]) == 2
    err = capsys.readouterr().err
    assert "nodes.loss.eps: 0.2 -> 0.3" in err and "steps:" not in err and "--resume-override" in err
    assert (out / "config.json").read_text() == before
    more = [*CLI_SETTINGS, "--steps", "3", "--set", "loss.eps=0.3"]
    assert main(["run", str(FIXTURE), "--resume", str(out), *more, "--resume-override"]) == 0
    assert json.loads((out / "config.json").read_text())["nodes"][-1]["eps"] == 0.3
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_through_the_cli_refuses_a_planted_pickle(cli_run, tmp_path, capsys):
    out = copy_of(cli_run, tmp_path)
    marker = tmp_path / "marker"
    for step in (1, 2):
        ckpt = out / "checkpoints" / f"step_{step}"
        plant(next((ckpt / "actor" / "deepspeed" / "state").glob("*.pt")), marker)
        checkpoint.write_manifest(ckpt, step)
    assert main(["run", str(FIXTURE), "--resume", str(out), *CLI_SETTINGS]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "model_states.pt" in err and "Traceback" not in err
    assert not marker.exists()
