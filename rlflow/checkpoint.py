"""Checkpoints: ``checkpoints/step_N/`` (weights, optimizer state, RNG and data position) and ``final/``.

Written under a temporary name and renamed, so a kill never leaves a broken one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rlflow import dist


class ResumeError(Exception):
    """A run directory that cannot be resumed (reported without a traceback)."""


def _state_file(rank: int) -> str:
    return "state.pt" if rank == 0 else f"state.rank{rank}.pt"


def atomic_dir(final: Path) -> tuple[Path, Callable[[], None]]:
    """A temporary sibling of ``final`` and a function that renames it into place."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    def commit() -> None:
        if final.exists():
            old = final.with_name(final.name + ".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)

    return tmp, commit


def save(out_dir: Path, step: int, workers: dict[str, Any], state: dict[str, Any]) -> Path:
    final = out_dir / "checkpoints" / f"step_{step}"
    final.parent.mkdir(parents=True, exist_ok=True)
    commit = None
    if dist.rank() == 0:
        tmp, commit = atomic_dir(final)
    dist.barrier()
    tmp = final.with_name(final.name + ".tmp")
    for name, w in workers.items():
        if w.trainable:
            w.save_pretrained(tmp / name)
            w.engine.save_checkpoint(str(tmp / name / "deepspeed"), tag="state")  # every rank its shard
    torch.save({"step": step, **state}, tmp / _state_file(dist.rank()))  # each rank its own random state
    dist.barrier()  # every rank has written before the rename
    if commit:
        commit()
    dist.barrier()
    return final


def latest(out_dir: Path) -> Path:
    ckpts = out_dir / "checkpoints"
    found = sorted(ckpts.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if ckpts.exists() else []
    found = [c for c in found if (c / "state.pt").exists()]
    if not found:
        raise ResumeError(f"no complete checkpoint in {ckpts} to resume from")
    return found[-1]


def load(checkpoint: Path, workers: dict[str, Any]) -> dict[str, Any]:
    for name, w in workers.items():
        if w.trainable:
            w.engine.load_checkpoint(str(checkpoint / name / "deepspeed"), tag="state")
    if not (checkpoint / _state_file(dist.rank())).exists():
        raise ResumeError(f"{checkpoint} has no state for rank {dist.rank()}: resume with the number of processes it was written by")
    return torch.load(checkpoint / _state_file(dist.rank()), weights_only=False)


def save_final(out_dir: Path, workers: dict[str, Any], policy: Optional[str]) -> None:
    trained = [n for n, w in workers.items() if w.trainable]
    for name in trained:
        target = out_dir / ("final" if name == policy or len(trained) == 1 else f"final-{name}")
        tmp, commit = atomic_dir(target) if dist.rank() == 0 else (target.with_name(target.name + ".tmp"), None)
        workers[name].save_pretrained(tmp)
        dist.barrier()
        if commit:
            commit()
