"""One declaration per variant: a function, its keyword-only parameters, one decorator.

An Advantage, Loss or Filter variant is declared once, where its maths is::

    @loss_variant(needs="logprobs", reads={"old_logprobs": "token", "advantages": "token"},
                  coefficient="clip(ρ)·A")
    def clip(cols, counts, *, eps: Annotated[float, Field(gt=0)] = 0.2, agg: AggMode = "token-mean"):
        '''PPO clipped surrogate ...'''

Everything else is read off that one function (FastAPI's lesson: the signature is the
declaration):

* the **name** is the function's name;
* the **spec** a pipeline file validates against is a pydantic model made with
  ``create_model`` from the keyword-only parameters — their types, defaults and bounds
  (``Annotated[float, Field(gt=0)]``) — on top of the node kind's base spec;
* the **registry entry** (a :class:`Variant`) holds the function, the spec, the columns
  it reads and writes, the model output it needs and its facts (``group_based``, ...);
* ``rlflow graph``, ``rlflow compare`` and the parameter tables of docs/nodes.md show
  the spec's fields.

No torch import: the node modules take torch from :mod:`rlflow.lazy`, and only the
keyword-only annotations are evaluated here, so validating a pipeline stays torch-free.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Optional, Union

from pydantic import create_model

from rlflow.registry import Registry

Columns = Mapping[str, str]  # column -> level
ColumnsOf = Union[Columns, Callable[[Any], Columns]]  # fixed, or a function of the spec
TextOf = Union[str, Callable[[Any], str]]  # fixed, or a function of the spec


def _columns(decl: Optional[ColumnsOf]) -> Callable[[Any], dict[str, str]]:
    if decl is None:
        return lambda spec: {}
    if callable(decl):
        return lambda spec: dict(decl(spec))
    fixed = dict(decl)
    return lambda spec: dict(fixed)


@dataclass(frozen=True)
class Variant:
    """A registered variant: the function and everything derived from its declaration."""

    kind: str  # node kind: "advantage", "loss", "filter"
    name: str
    fn: Callable[..., Any]
    spec: type  # the pydantic spec class of this variant
    params: tuple[str, ...]  # the function's keyword-only parameters, in order
    reads: Callable[[Any], dict[str, str]]  # spec -> batch columns read (beyond the kind's own)
    writes: Callable[[Any], dict[str, str]]  # spec -> batch columns written (beyond the kind's own)
    needs: Optional[str] = None  # model output a Loss needs: "logprobs" | "values" | "scores"
    coefficient: TextOf = ""  # the gradient coefficient on ∇log π (the unified view): a formula, or spec -> formula
    facts: dict[str, Any] = field(default_factory=dict)  # group_based, refills, mask, ...

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    def gradient_coefficient(self, spec: Any = None) -> str:
        """The unified view's gradient coefficient (DeepSeekMath §5.2.1) of this variant for
        ``spec`` (default: the variant at its default settings)."""
        if callable(self.coefficient):
            return self.coefficient(spec if spec is not None else self.spec())
        return self.coefficient

    def arguments(self, spec: Any) -> dict[str, Any]:
        """The keyword arguments of ``fn`` for a validated spec."""
        return {p: getattr(spec, p) for p in self.params}

    def __getattr__(self, name: str) -> Any:  # facts read like attributes: v.group_based
        facts = self.__dict__.get("facts", {})
        if name in facts:
            return facts[name]
        raise AttributeError(f"{self.kind} variant {self.__dict__.get('name')!r} has no {name!r}")


def _annotation(fn: Callable, param: inspect.Parameter) -> Any:
    """The parameter's annotation as an object (string annotations evaluated in fn's module)."""
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        raise TypeError(f"{fn.__name__}: parameter {param.name!r} needs a type annotation")
    if isinstance(ann, str):
        ann = eval(ann, inspect.unwrap(fn).__globals__)  # noqa: S307 - the module's own source text
    return ann


def keyword_parameters(fn: Callable) -> list[inspect.Parameter]:
    """The keyword-only parameters of ``fn``: a variant's settings."""
    params = list(inspect.signature(fn).parameters.values())
    kw = [p for p in params if p.kind is p.KEYWORD_ONLY]
    missing = [p.name for p in kw if p.default is inspect.Parameter.empty]
    if missing:
        raise TypeError(f"{fn.__name__}: every setting needs a default; {', '.join(missing)} has none")
    return kw


class VariantKind:
    """The variants of one node kind: a registry plus the decorator that fills it.

    ``base`` is the kind's base spec (fields every variant shares, e.g. a Loss's
    ``model`` and ``coef``); each variant's spec subclasses it with a ``variant``
    literal and the function's keyword-only parameters.
    """

    def __init__(self, kind: str, base: type, **default_facts: Any):
        self.kind = kind
        self.base = base
        self.default_facts = default_facts  # facts a variant has unless its decorator says otherwise
        self.registry: Registry[Variant] = Registry(f"{kind} variant")

    def declare(self, *, reads: Optional[ColumnsOf] = None, writes: Optional[ColumnsOf] = None,
                needs: Optional[str] = None, coefficient: TextOf = "", **facts: Any) -> Callable:
        """The decorator: ``@loss_variant(needs="logprobs", reads={...})``."""

        def register(fn: Callable) -> Callable:
            params = keyword_parameters(fn)
            spec = self._spec_class(fn, params)
            variant = Variant(self.kind, fn.__name__, fn, spec, tuple(p.name for p in params), _columns(reads),
                              _columns(writes), needs, coefficient, {**self.default_facts, **facts})
            self.registry.register(fn.__name__)(variant)
            spec.declared = variant
            return fn

        return register

    def _spec_class(self, fn: Callable, params: list[inspect.Parameter]) -> type:
        clash = [p.name for p in params if p.name in self.base.model_fields and p.name != "variant"]
        if clash:
            raise TypeError(f"{self.kind} variant {fn.__name__!r}: {', '.join(clash)} is a field every "
                            f"{self.kind} node has; name the setting otherwise")
        fields: dict[str, Any] = {"variant": (Literal[fn.__name__], fn.__name__)}
        for p in params:
            fields[p.name] = (_annotation(fn, p), p.default)
        title = f"{self.kind.capitalize()}[{fn.__name__}]"
        cls = create_model(title, __base__=self.base, __module__=fn.__module__, __doc__=inspect.getdoc(fn), **fields)
        return cls

    def __getitem__(self, name: str) -> Variant:
        return self.registry[name]

    def __contains__(self, name: object) -> bool:
        return name in self.registry

    def __iter__(self):
        return iter(self.registry.names())

    def names(self) -> list[str]:
        return self.registry.names()

    def variants(self) -> list[Variant]:
        return [self.registry[n] for n in self.registry.names()]

    def make(self, variant: str, /, **params: Any) -> Any:
        """A node of the named variant: ``Loss("clip", eps=0.2)``."""
        return self.registry[variant].spec(**params)


class Declared:
    """Mixin for a kind's base spec: the variant's declaration behind every spec instance."""

    declared: ClassVar[Optional[Variant]] = None
