"""Checkpoints and final models: written atomically, verified before use, never unpickled.

Layout of one checkpoint (``<run>/checkpoints/step_N/``)::

    manifest.json                      every other file: relative path, size, sha256
    state.rank<R>.safetensors          rank R's random state (torch and sampling generators)
    state.rank<R>.json                 rank R's step and data position
    <model>/model.safetensors, ...     each trainable model, loadable by ``from_pretrained``
    <model>/adapter_model.safetensors  ... or, of a LoRA model, its adapter alone (loadable by peft)
    <model>/deepspeed/state/*.pt       DeepSpeed's model, optimizer and scheduler state (of a
                                       LoRA model: the adapter's weights and optimizer state only)

A checkpoint is written under ``step_N.tmp`` and renamed to ``step_N`` once every rank
has written its part and the manifest is complete, so a killed run leaves either the
whole checkpoint or none (leftover ``.tmp``/``.old`` directories are ignored).

Loading unpickles nothing: the random and data state are safetensors and JSON; every
torch file is first read with ``torch.load(weights_only=True)`` (allowing only a few
plain DeepSpeed data types), and DeepSpeed's own loading runs with weights-only loading
forced, so a planted pickle can neither run code nor be half-loaded.

No checkpoint and no ``final/`` directory is ever written from non-finite weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from rlflow import dist

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
STEP_PATTERN = re.compile(r"step_(\d+)")
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
FINAL = "final"
HASH_CHUNK_BYTES = 1 << 20
# files that are (or may be) pickles: checked by name and by their first bytes
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
PICKLE_MAGIC = b"\x80"  # the PROTO opcode every pickle of protocol 2+ starts with
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# plain data holders DeepSpeed puts in its ZeRO optimizer state (module, name)
DEEPSPEED_SAFE_TYPES = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)

Say = Callable[[str], None]


class ResumeError(Exception):
    """A run directory or checkpoint that cannot be resumed (reported without a traceback)."""


class NonFiniteWeightsError(RuntimeError):
    """A model with NaN or infinite weights, which must not be saved."""


# --- paths ----------------------------------------------------------------------------------


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in the run directory ``out_dir``."""
    return Path(out_dir) / CHECKPOINTS / f"{STEP_PREFIX}{step}"


def step_of(checkpoint: Path) -> Optional[int]:
    """The step of a checkpoint directory name (``step_12`` -> 12); None for anything else,
    including the leftovers ``step_12.tmp`` and ``step_12.old``."""
    m = STEP_PATTERN.fullmatch(Path(checkpoint).name)
    return int(m.group(1)) if m else None


def _state_files(rank: int) -> tuple[str, str]:
    return f"state.rank{rank}.safetensors", f"state.rank{rank}.json"


def atomic_dir(final: Path) -> tuple[Path, Callable[[], None]]:
    """A fresh temporary sibling of ``final`` and a function that renames it into place.

    Creates the temporary directory (removing any leftover of an earlier attempt, and any
    ``.old`` left by a commit that was killed half-way). ``commit`` replaces an existing
    ``final`` by renaming it aside first, so there is never a moment with a partial one.
    """
    final = Path(final)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    old = final.with_name(final.name + OLD_SUFFIX)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)

    def commit() -> None:
        if final.exists():
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(final.parent)

    return tmp, commit


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- finite weights -------------------------------------------------------------------------


def _trainable(workers: dict[str, Any]) -> dict[str, Any]:
    return {name: w for name, w in workers.items() if w.trainable}


def _first_non_finite(worker: Any) -> Optional[str]:
    """The name of the first parameter of ``worker`` with a NaN or infinity, or None.
    Under ZeRO-3 a parameter's local shard (``ds_tensor``) is what this rank holds."""
    import torch

    for name, p in worker.module.named_parameters():
        local = getattr(p, "ds_tensor", None)
        t = local if local is not None else p
        if t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def check_finite(workers: dict[str, Any], what: str) -> None:
    """Raise NonFiniteWeightsError if any trainable model has a non-finite weight.

    Collective: every rank checks what it holds and all ranks raise together.
    ``what`` names what was about to be written, for the message.
    """
    bad = {name: p for name, w in _trainable(workers).items() if (p := _first_non_finite(w))}
    if dist.all_reduce_min(0 if bad else 1) == 1:
        return
    if bad:
        where = ", ".join(f"model {m!r} parameter {p!r}" for m, p in bad.items())
        raise NonFiniteWeightsError(f"not writing {what}: non-finite (NaN/inf) weights in {where}")
    raise NonFiniteWeightsError(f"not writing {what}: another rank holds non-finite (NaN/inf) weights")


# --- the manifest ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every file under ``directory`` but its manifest."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST)


def write_manifest(directory: Path, step: int) -> Path:
    """Write ``manifest.json`` listing every file under ``directory`` (path, size, sha256),
    each flushed to disk first, so that a manifest never describes bytes still in flight."""
    files = []
    for p in _files(directory):
        _fsync(p)
        files.append({"path": p.relative_to(directory).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)})
    body = {"format": MANIFEST_FORMAT, "step": step, "world_size": dist.world_size(), "files": files}
    path = directory / MANIFEST
    with path.open("w") as f:
        f.write(json.dumps(body, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _read_manifest(checkpoint: Path) -> dict[str, Any]:
    """The parsed manifest; ResumeError if it is missing or malformed."""
    path = checkpoint / MANIFEST
    try:
        body = json.loads(path.read_text())
        entries = body["files"]
        if not all(isinstance(e["path"], str) and isinstance(e["size"], int) and isinstance(e["sha256"], str)
                   for e in entries):
            raise ValueError("malformed file entry")
    except FileNotFoundError:
        raise ResumeError(f"{path} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{path} is unreadable ({e})") from None
    return body


def verify(checkpoint: Path) -> Optional[str]:
    """Why ``checkpoint`` is not intact, or None when every file matches its manifest.

    Intact means: the manifest reads, every listed file exists with its size and sha256,
    and there is no file the manifest does not list.
    """
    checkpoint = Path(checkpoint)
    try:
        entries = _read_manifest(checkpoint)["files"]
    except ResumeError as e:
        return str(e)
    listed = set()
    for e in entries:
        path = checkpoint / e["path"]
        listed.add(path)
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != e["size"]:
            return f"{path} has {size} bytes, the manifest says {e['size']} (truncated or changed)"
        if _sha256(path) != e["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupt or changed)"
    extra = [p for p in _files(checkpoint) if p not in listed]
    if extra:
        return f"{extra[0]} is not in the manifest"
    return None


# --- saving ---------------------------------------------------------------------------------


def _write_state(directory: Path, rank: int, step: int, state: dict[str, Any]) -> None:
    """This rank's random and data state: tensors as safetensors, the rest as JSON."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    tensor_file, json_file = _state_files(rank)
    save_file(tensors, str(directory / tensor_file))
    (directory / json_file).write_text(json.dumps({"step": step, **rest}) + "\n")


def save(out_dir: Path, step: int, workers: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_<step>/`` in the run directory ``out_dir`` and return it.

    ``workers``: the placed models (only trainable ones are saved: weights through
    ``save_pretrained`` as safetensors, optimizer and scheduler through DeepSpeed).
    ``state``: this rank's random and data state, e.g. ``{"generator": ByteTensor,
    "torch": ByteTensor, "data": {"epoch": 0, "pos": 8, "groups_served": 8}}``; tensors
    go to safetensors, everything else must be JSON-able.

    Collective: every rank calls it. Rank 0 creates the temporary directory, writes the
    shared files and the manifest, and renames it into place; each rank writes its own
    DeepSpeed shard and state file. Raises NonFiniteWeightsError (writing nothing) if any
    trainable weight is not finite.
    """
    out_dir = Path(out_dir)
    trainable = _trainable(workers)
    final = checkpoint_dir(out_dir, step)
    check_finite(trainable, f"{final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    commit = None
    if dist.rank() == 0:
        _, commit = atomic_dir(final)
    dist.barrier()  # the temporary directory exists
    tmp = final.with_name(final.name + TMP_SUFFIX)
    for name, w in trainable.items():
        w.save_trained(tmp / name)  # rank 0 writes; under ZeRO-3 every rank gathers
        w.engine.save_checkpoint(str(tmp / name / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,  # every rank its shard
                                 exclude_frozen_parameters=w.lora)  # LoRA: the base is the model's own path
    _write_state(tmp, dist.rank(), step, state)
    dist.barrier()  # every rank has written
    if commit:
        write_manifest(tmp, step)
        commit()
    dist.barrier()  # nobody returns before the checkpoint exists
    return final


def save_final(out_dir: Path, workers: dict[str, Any], policy_name: Optional[str]) -> list[Path]:
    """Each trained model as a directory ``from_pretrained`` loads: the policy (or the only
    trained model) in ``final/``, any other in ``final-<name>/``. Returns the directories.

    Collective, atomic per directory; raises NonFiniteWeightsError (writing nothing) if any
    trainable weight is not finite.
    """
    out_dir = Path(out_dir)
    trained = _trainable(workers)
    check_finite(trained, f"the final models in {out_dir}")
    written = []
    for name, w in trained.items():
        target = out_dir / (FINAL if name == policy_name or len(trained) == 1 else f"{FINAL}-{name}")
        commit = None
        if dist.rank() == 0:
            _, commit = atomic_dir(target)
        dist.barrier()
        w.save_pretrained(target.with_name(target.name + TMP_SUFFIX))
        dist.barrier()
        if commit:
            commit()
        written.append(target)
    return written


# --- finding and loading --------------------------------------------------------------------


def latest(out_dir: Path, say: Optional[Say] = None) -> Path:
    """The newest intact checkpoint of the run directory ``out_dir``.

    Leftover ``step_N.tmp`` / ``step_N.old`` directories are ignored. A checkpoint whose
    files do not match its manifest is reported through ``say`` (by path and reason) and
    the next newest is tried. ResumeError when there is none intact.
    """
    root = Path(out_dir) / CHECKPOINTS
    found = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None),
                   key=step_of, reverse=True) if root.is_dir() else []
    if not found:
        raise ResumeError(f"no checkpoint in {root} to resume from (set pipeline.save_every to write them)")
    damaged = []
    for ckpt in found:
        why = verify(ckpt)
        if why is None:
            return ckpt
        damaged.append(why)
        if say:
            say(f"skipping damaged checkpoint {ckpt}: {why}")
    raise ResumeError(f"no intact checkpoint in {root}; damaged: " + "; ".join(damaged))


def _is_torch_file(path: Path) -> bool:
    """Whether ``path`` is (or might be) a torch/pickle file, by name or by first bytes."""
    if path.suffix in TORCH_SUFFIXES:
        return True
    with path.open("rb") as f:
        head = f.read(len(ZIP_MAGIC))
    return head.startswith(PICKLE_MAGIC) or head == ZIP_MAGIC


def _safe_types() -> list[type]:
    import importlib

    types = []
    for module, name in DEEPSPEED_SAFE_TYPES:
        with contextlib.suppress(ImportError, AttributeError):
            types.append(getattr(importlib.import_module(module), name))
    return types


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every ``torch.load`` (DeepSpeed's included, whatever it asks for) is a
    weights-only load that also accepts the plain DeepSpeed types of DEEPSPEED_SAFE_TYPES."""
    import torch

    saved = {k: os.environ.get(k) for k in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)
    try:
        with torch.serialization.safe_globals(_safe_types()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_loadable(checkpoint: Path, paths: list[str]) -> None:
    """Read every torch/pickle file among ``paths`` (relative to ``checkpoint``) with
    ``torch.load(weights_only=True)``; ResumeError naming the first one that is refused."""
    import torch

    for rel in paths:
        path = checkpoint / rel
        if not _is_torch_file(path):
            continue
        try:
            with weights_only_loads():
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means: do not let DeepSpeed near it
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ResumeError(f"refusing to resume from {checkpoint}: {path} is not a plain weights file "
                              f"(weights-only loading refused it: {reason})") from None


def _read_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensor_file, json_file = _state_files(rank)
    try:
        state = json.loads((checkpoint / json_file).read_text())
        tensors = load_file(str(checkpoint / tensor_file))
    except FileNotFoundError:
        raise ResumeError(f"{checkpoint} has no state for rank {rank}: resume with the number of "
                          "processes it was written by") from None
    except Exception as e:  # noqa: BLE001 - bad JSON, a safetensors header that does not parse, ...
        raise ResumeError(f"{checkpoint}: rank {rank}'s state is unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ResumeError(f"{checkpoint / json_file} has no step")
    return {**state, **tensors}


def load(checkpoint: Path, workers: dict[str, Any]) -> dict[str, Any]:
    """Restore every trainable worker (weights, optimizer, scheduler) from ``checkpoint``
    and return this rank's state: ``{"step": int, "generator": ..., "torch": ..., "data": ...}``.

    Verifies the manifest, then reads every torch file weights-only before DeepSpeed sees
    any, then lets DeepSpeed load with weights-only loading forced. ResumeError (with the
    models untouched) on anything damaged, foreign or unsafe.
    """
    checkpoint = Path(checkpoint)
    why = verify(checkpoint)
    if why:
        raise ResumeError(f"checkpoint {checkpoint} is damaged: {why}")
    manifest = _read_manifest(checkpoint)
    if manifest.get("world_size", dist.world_size()) != dist.world_size():
        raise ResumeError(f"{checkpoint} was written by {manifest['world_size']} processes; resume with as many "
                          f"(this run has {dist.world_size()})")
    check_loadable(checkpoint, [e["path"] for e in manifest["files"]])
    state = _read_state(checkpoint, dist.rank())
    trainable = _trainable(workers)
    for name in trainable:
        if not (checkpoint / name / DEEPSPEED_DIR / DEEPSPEED_TAG).is_dir():
            raise ResumeError(f"{checkpoint} has no state for model {name!r}")
    for name, w in trainable.items():
        custom = _adapter_loader(checkpoint / name) if w.lora else None
        with weights_only_loads():
            loaded, _ = w.engine.load_checkpoint(str(checkpoint / name / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                                 custom_load_fn=custom)
        if loaded is None:
            raise ResumeError(f"DeepSpeed could not load {checkpoint / name / DEEPSPEED_DIR}")
    return state


def _adapter_loader(where: Path) -> Callable[..., None]:
    """DeepSpeed's module loading for a LoRA model, whose checkpoint holds the trained
    (adapter) parameters only: exactly this model's adapter, or ResumeError."""

    def load_adapter(src: dict[str, Any], dst: Any) -> None:
        # this rank's shapes: under ZeRO-3 a parameter and its saved entry are both empty placeholders
        # (DeepSpeed restores the partitions from the optimizer state)
        shapes = {n: tuple(p.shape) for n, p in dst.named_parameters() if p.requires_grad}
        missing, extra = sorted(set(shapes) - set(src)), sorted(set(src) - set(shapes))
        if missing or extra:
            first = (missing or extra)[0]
            raise ResumeError(f"{where} does not hold this model's adapter: {len(missing)} of its weights missing, "
                              f"{len(extra)} others (first: {first}); was it written with the same lora settings?")
        misfit = [k for k, v in src.items() if tuple(v.shape) != shapes[k]]
        if misfit:  # another rank
            raise ResumeError(f"{where}: the adapter does not fit this model: {misfit[0]} has shape "
                              f"{tuple(src[misfit[0]].shape)}, the model's is {shapes[misfit[0]]}")
        dst.load_state_dict(src, strict=False)  # the frozen base is the model's own, from its path

    return load_adapter
