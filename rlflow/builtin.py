"""The ``builtin:`` names: shipped providers looked up by name, and the models they build.

A ``builtin:`` data source or model is served by a provider registered under its name
(:mod:`rlflow.provider`). The first lookup here imports the providers that ship with
rlflow (:mod:`rlflow.arith`: ``builtin:arith``, ``builtin:tiny-arith-init`` and
``builtin:tiny-arith``); nothing else in the runtime names them.

Built models are made on this machine on first use and cached under ``$RLFLOW_CACHE``
(default ``~/.cache/rlflow``) in ``models/<name>-<VERSION>-<recipe key>/``, a directory
``from_pretrained`` loads. A build runs in one torch thread, so the weights do not depend
on the thread count of the process that happens to build them, and leaves the caller's
random state as it was. A cache entry is checked on every use; a damaged one is reported
with its path rather than loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from rlflow.provider import DATA, MODELS, DataProvider, ModelProvider, Say, Train

if TYPE_CHECKING:
    from rlflow.spec import Pipeline

# Bump when the cache layout or the build conditions change, so that every stale entry is
# rebuilt. v3: built in one torch thread, recipe keys derived from the providers.
VERSION = "v3"
PREFIX = "builtin:"

_loaded = False


class CacheError(Exception):
    """A cached built-in model that is damaged; the message names it and how to rebuild it."""


def _shipped() -> None:
    """Register the providers that ship with rlflow, once, before the first lookup."""
    global _loaded
    if not _loaded:
        from rlflow import arith, arith_chain  # noqa: F401  (register their providers on import)

        _loaded = True


def data_provider(source: str) -> DataProvider:
    """The provider of data ``source`` (``"builtin:arith"``); raises ``UnknownName``."""
    _shipped()
    return DATA[source]


def model_provider(path: str) -> ModelProvider:
    """The provider of model ``path`` (``"builtin:tiny-arith"``); raises ``UnknownName``."""
    _shipped()
    return MODELS[path]


def known_data() -> list[str]:
    """Every registered built-in data source, sorted."""
    _shipped()
    return DATA.names()


def known_models() -> list[str]:
    """Every registered built-in model, sorted."""
    _shipped()
    return MODELS.names()


def eval_rule(pipeline: "Pipeline") -> Optional[Callable[[str, dict], float]]:
    """The rule held-out evaluation scores the policy's answers with, or None.

    The pipeline decides, in this order: its ``Eval.rule``; the first rule of its first
    Score node; the default rule of its data provider (a ``builtin:`` source whose
    provider declares one, e.g. exact match for ``builtin:arith``).
    """
    ev = getattr(pipeline, "eval", None)
    if ev is not None and getattr(ev, "rule", None) is not None:
        return ev.rule
    scores = [n for n in pipeline.nodes if n.kind == "score" and n.rules]
    if scores:
        return next(iter(scores[0].rules.values())).fn
    source = pipeline.data.source
    return data_provider(source).rule if source.startswith(PREFIX) else None


# --- the model cache --------------------------------------------------------------------


def cache_dir() -> Path:
    """Where rlflow caches what it builds: ``$RLFLOW_CACHE``, default ``~/.cache/rlflow``."""
    return Path(os.environ.get("RLFLOW_CACHE", Path.home() / ".cache" / "rlflow"))


def model_dir(path: str) -> Path:
    """The cache directory of built-in model ``path`` under its current recipe."""
    provider = model_provider(path)
    name = path[len(PREFIX):]
    return cache_dir() / "models" / f"{name}-{VERSION}-{provider.key()}"


def _bad_safetensors(file: Path) -> Optional[str]:
    """Why ``file`` is not a whole safetensors file (header and data), or None."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"{file.name} is truncated ({size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"{file.name} is unreadable ({type(e).__name__})"
    return None if size == 8 + n + end else f"{file.name} has {size} bytes, its header says {8 + n + end}"


def check_cached(directory: Path) -> Optional[str]:
    """Why the built model in ``directory`` cannot be loaded, or None. Reads headers only."""
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return "config.json is missing or unreadable"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return "it has no weights (no *.safetensors file)"
    for file in weights:
        why = _bad_safetensors(file)
        if why:
            return why
    if not (directory / "tokenizer_config.json").exists():
        return "it has no tokenizer (no tokenizer_config.json)"
    return None


def _damaged(path: str, directory: Path, why: str) -> CacheError:
    return CacheError(f"the cached {path} in {directory} is damaged: {why}. Delete it to rebuild it on the next "
                      f"run (rm -r '{directory}'), or set RLFLOW_CACHE to another directory")


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second process waits for the first build
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def one_thread_and_own_rng():
    """Run the body in one torch thread with its own random state; restore both after.

    The weights a build makes then depend neither on the caller's thread count (reduction
    order changes the floating point sums) nor on, or change, the caller's random state.
    """
    import random

    import torch

    threads, state = torch.get_num_threads(), random.getstate()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(state)


def ensure_builtin(path: str, *, train: Optional[Train] = None, on_build: Optional[Say] = None) -> Path:
    """The directory of built-in model ``path``, building and caching it on first use.

    ``train`` is passed to the provider (models built by a training run need it);
    ``on_build`` receives progress messages. A bare name (``"tiny-arith-init"``) is taken
    as ``"builtin:tiny-arith-init"``. Raises :class:`CacheError` for a damaged entry.
    """
    path = path if path.startswith(PREFIX) else PREFIX + path
    target = model_dir(path)
    if not target.exists():
        with _lock(target.parent / f".{target.name}.lock"):
            if not target.exists():
                _build(model_provider(path), target, train, on_build or (lambda msg: None))
    why = check_cached(target)
    if why:
        raise _damaged(path, target, why)
    return target


def _build(provider: ModelProvider, target: Path, train: Optional[Train], say: Say) -> None:
    """Build into a temporary sibling of ``target``, check it, and rename it into place."""
    tmp = target.with_name(target.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    with one_thread_and_own_rng():
        provider.build(tmp, say, train)
    why = check_cached(tmp)
    if why:
        raise CacheError(f"building {provider.name} in {tmp} made no loadable model: {why}")
    tmp.rename(target)
