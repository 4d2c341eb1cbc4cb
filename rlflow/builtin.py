"""Built-in models, made on this machine (no download) and cached.

``builtin:tiny-arith-init`` is a freshly initialised ~0.66M-parameter Llama with a
character tokenizer for two-digit addition (``rlflow.arith``). ``builtin:tiny-arith``
is that model after the project's own SFT pipeline (``pipelines/sft.py``): trained on
first use, cached under ``$RLFLOW_CACHE`` (default ``~/.cache/rlflow``), and loaded
with ``from_pretrained`` like any Hugging Face model directory.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from rlflow.models import cache_dir

VERSION = "v2"  # bump when the model or data change, so stale caches are rebuilt


def _recipe_key(name: str) -> str:
    """The cache key of a built-in: it changes whenever its recipe does."""
    if name != "tiny-arith":
        return VERSION
    from rlflow import arith

    return f"{VERSION}-sft{arith.SFT_STEPS}x{arith.SFT_BATCH}-lr{arith.SFT_LR:g}-w{arith.SFT_WARMUP}"


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second process waits for the first build
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_builtin(name: str, *, on_build: Optional[Callable[[str], None]] = None) -> Path:
    """The directory of built-in model ``name``, building it first if it is not cached."""
    target = cache_dir() / "models" / f"{name}-{_recipe_key(name)}"
    if (target / "config.json").exists():
        return target
    say = on_build or (lambda msg: None)
    with _lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").exists():
            return target
        tmp = target.with_name(target.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        if name == "tiny-arith-init":
            _build_init(tmp)
        elif name == "tiny-arith":
            say(f"building builtin:tiny-arith (first use): SFT of a fresh model on builtin:arith, cached in {target}")
            t0 = time.perf_counter()
            _build_sft(tmp)
            say(f"built builtin:tiny-arith in {time.perf_counter() - t0:.0f}s")
        else:
            raise KeyError(name)
        tmp.rename(target)
    return target


def _build_init(directory: Path) -> None:
    from rlflow import arith

    tok = arith.make_tokenizer()
    model = arith.make_model(tok, seed=0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def _build_sft(directory: Path) -> None:
    from rlflow.engine import Run
    from rlflow.graph import build
    from rlflow.pipelines.sft import pipeline

    out = directory.with_name(directory.name + "-run")
    shutil.rmtree(out, ignore_errors=True)
    run = Run(pipeline, build(pipeline), out)
    run.setup()
    run.train()
    shutil.move(str(out / "final"), str(directory))
    shutil.rmtree(out, ignore_errors=True)
