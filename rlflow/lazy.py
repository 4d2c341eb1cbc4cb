"""Modules imported on first use, so that declaring a node variant imports no torch.

The node library declares its variants where their maths is (``nodes/*.py``), and the
spec layer reads those declarations to validate a pipeline file. ``rlflow validate``
must stay fast and torch-free, so the node modules take torch from here: ``torch.exp``
imports torch the first time it is called, and every later lookup is a plain attribute.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable


class LazyModule:
    """A stand-in for ``import name`` that imports the module on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # later lookups skip __getattr__
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")


def no_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` without importing torch when the function is defined."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
