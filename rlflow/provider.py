"""What a provider is: the runtime side of a ``builtin:`` name.

A pipeline names its data (``Prompts("builtin:arith")``) and its models
(``Model("builtin:tiny-arith")``); a *provider* registered under that name supplies
them. The runtime knows no task (DESIGN.md "Layers"): it looks names up in the two
registries below, never compares them with a known string. A task module registers its
providers at import (``rlflow.arith`` registers the shipped ones); :mod:`rlflow.builtin`
loads the shipped providers on the first lookup and caches the models they build.

This module is pure: the standard library and :mod:`rlflow.registry` only, so a task
module can import it without importing the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from rlflow.registry import Registry

if TYPE_CHECKING:
    from rlflow.spec import Pipeline

Rows = list[dict[str, Any]]
Say = Callable[[str], None]
Train = Callable[["Pipeline", Path], Path]
"""``train(pipeline, out_dir)``: run ``pipeline`` to the end in ``out_dir`` and return the
directory of its final model. The engine supplies it (``rlflow.engine.train_pipeline``),
so a provider can train a model without importing the engine."""


@dataclass(frozen=True)
class DataProvider:
    """Rows of a built-in data source.

    Attributes:
        name: the name pipelines use, e.g. ``"builtin:arith"``.
        rows: ``rows(kind, split)`` -> every row of ``split`` (``"train"`` or ``"eval"``)
            for data of ``kind`` (one of :attr:`kinds`), or None when there is no such split.
        kinds: the data kinds it serves: ``"prompts"``, ``"demonstrations"``, ``"pairs"``.
        rule: the evaluation rule ``rule(response_text, row) -> float`` that a pipeline on
            this data uses when it names none (no ``Eval.rule`` and no Score node).
    """

    name: str
    rows: Callable[[str, str], Optional[Rows]]
    kinds: frozenset[str] = frozenset({"prompts", "demonstrations", "pairs"})
    rule: Optional[Callable[[str, dict], float]] = None


@dataclass(frozen=True)
class ModelProvider:
    """A built-in model, made on this machine and cached by :mod:`rlflow.builtin`.

    Attributes:
        name: the name pipelines use, e.g. ``"builtin:tiny-arith"``.
        build: ``build(directory, say, train)`` writes a directory that ``from_pretrained``
            loads (model and tokenizer). ``say`` reports progress to the user; ``train`` is
            the engine's :data:`Train` (None where the caller supplied none). It runs in one
            torch thread with the random state restored afterwards (see ``rlflow.builtin``).
        key: ``key()`` -> a short string that changes whenever the recipe does (code,
            settings, the models it starts from), so that a stale cache is rebuilt.
        slow: whether a build takes long enough to announce it (a training run).
    """

    name: str
    build: Callable[[Path, Say, Optional[Train]], None]
    key: Callable[[], str]
    slow: bool = field(default=False)


DATA: Registry[DataProvider] = Registry("built-in data source")
MODELS: Registry[ModelProvider] = Registry("built-in model")


def data_provider(name: str, *, kinds: Optional[set[str]] = None, rule: Optional[Callable] = None):
    """Register ``rows(kind, split)`` as the provider of data ``name``::

        @data_provider("builtin:arith", rule=exact_match)
        def _rows(kind, split): ...
    """

    def add(rows: Callable[[str, str], Optional[Rows]]):
        extra = {"kinds": frozenset(kinds)} if kinds else {}
        DATA.register(name)(DataProvider(name, rows, rule=rule, **extra))
        return rows

    return add


def model_provider(name: str, *, key: Callable[[], str], slow: bool = False):
    """Register ``build(directory, say, train)`` as the provider of model ``name``::

        @model_provider("builtin:tiny-arith-init", key=lambda: "seed0")
        def _build(directory, say, train): ...
    """

    def add(build: Callable[[Path, Say, Optional[Train]], None]):
        MODELS.register(name)(ModelProvider(name, build, key, slow))
        return build

    return add
