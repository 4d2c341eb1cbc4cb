"""The settings tables of docs/nodes.md, generated from the specs and the variant registries.

Every table is read off what the code declares, never written a second time: the fields
of each node kind's spec (``model_fields``: annotation, default, bounds, description) and,
for the kinds with variants, each :class:`~rlflow.variants.Variant` (its function's
docstring, its spec's settings, the columns it reads and writes beyond its kind's own,
the model output a Loss needs, its gradient coefficient). ``rlflow docs --write``
puts the result between the markers of docs/nodes.md; ``rlflow docs --check`` and
tests/test_docs.py fail when the page is out of date. No torch import.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable as CallableABC
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

import rlflow.nodes  # noqa: F401  (registers the shipped variants)
from rlflow.spec import ADVANTAGES, FILTERS, LOSSES, Generate, RefLogprob, Score, Value
from rlflow.variants import VariantKind

BEGIN, END = "<!-- generated: variants -->", "<!-- end generated -->"
UNIFIED_BEGIN = "<!-- generated: unified view -->"
NODES_MD = Path(__file__).resolve().parent.parent / "docs" / "nodes.md"
ALGORITHMS_MD = NODES_MD.parent / "algorithms.md"
PIPELINES = NODES_MD.parent.parent / "pipelines"
PLAIN_KINDS = (Generate, Score, RefLogprob, Value)
VARIANT_KINDS = (ADVANTAGES, FILTERS, LOSSES)
NOT_SETTINGS = ("name", "variant")  # every node's name; a variant node's variant is its first argument
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


# --- one field -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text fit for a markdown table cell: reST literals as code, pipes escaped, one line."""
    return text.replace("``", "`").replace("|", "\\|").replace("\n", " ")


def type_name(ann: Any) -> str:
    """An annotation as a reader writes it: ``float``, ``int | None``, ``"k1" | "k2"``."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(named + (["None"] if type(None) in args else []))
    if origin is CallableABC:
        return "function"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def _nested(field: FieldInfo) -> list[Any]:
    """The field's own metadata and that of the ``Annotated`` types inside its annotation
    (``Optional[Annotated[float, Field(ge=0)]]`` keeps its bounds there)."""
    found, todo = list(field.metadata), [field.annotation]
    while todo:
        ann = todo.pop()
        if get_origin(ann) is Annotated:
            found.extend(ann.__metadata__)
        todo.extend(get_args(ann) if get_origin(ann) is not Literal else ())
    flat = []
    for m in found:
        flat.extend([m, *m.metadata] if isinstance(m, FieldInfo) else [m])
    return flat


def bounds(field: FieldInfo) -> str:
    """``> 0``, ``≥ 0, ≤ 1``: the numeric bounds pydantic checks, '' for none."""
    out = []
    for meta in _nested(field):
        for attr, sign in _BOUNDS:
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {getattr(meta, attr):g}")
    return ", ".join(dict.fromkeys(out))


def description(field: FieldInfo) -> str:
    texts = [field.description] + [m.description for m in _nested(field) if isinstance(m, FieldInfo)]
    return next((t for t in texts if t), "")


def default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else f"`{json.dumps(field.default_factory())}`"
    value = field.default
    return f"`{json.dumps(value)}`" if isinstance(value, (str, dict, list)) else f"`{value!r}`"


def field_table(spec: type[BaseModel], names: list[str]) -> list[str]:
    """A markdown table of the named fields of ``spec``: type, default, bounds, meaning."""
    lines = ["| setting | type | default | bounds | meaning |", "| --- | --- | --- | --- | --- |"]
    for name in names:
        f = spec.model_fields[name]
        cells = (f"`{name}`", f"`{type_name(f.annotation)}`", default(f), bounds(f), description(f))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


# --- kinds and variants --------------------------------------------------------------------------


def _summary(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return _cell(" ".join(doc.split("\n\n")[0].split()))


def _columns(cols: dict[str, str]) -> str:
    return ", ".join(f"`{c}`" for c in cols) or "—"


def _own_columns(kind: VariantKind) -> tuple[dict[str, str], dict[str, str]]:
    """The columns every variant of ``kind`` reads and writes, at the default settings."""
    reads, writes = [], []
    for v in kind.variants():
        spec = v.spec()
        reads.append({c: lvl for c, lvl in spec.reads().items() if c not in v.reads(spec)})
        writes.append({c: lvl for c, lvl in spec.writes().items() if c not in v.writes(spec)})
    common = lambda maps: {c: l for c, l in maps[0].items() if all(c in m for m in maps)}  # noqa: E731
    return common(reads), common(writes)


def plain_kinds() -> list[str]:
    """The field table of every node kind without variants."""
    out = ["### Nodes without variants", ""]
    for cls in PLAIN_KINDS:
        names = [n for n in cls.model_fields if n not in NOT_SETTINGS]
        out += [f"**`{cls.__name__}`** (`{cls.kind}`): {_summary(cls)}", "", *field_table(cls, names), ""]
    return out


def _variant_table(kind: VariantKind) -> list[str]:
    """One row per variant: what it is, the columns it adds, what a Loss needs, its coefficient."""
    variants = kind.variants()
    needs, coef = any(v.needs for v in variants), any(v.coefficient for v in variants)
    head = ["variant", "what it is", "also reads", "also writes"] + ["needs"] * needs + ["gradient coefficient"] * coef
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        spec = v.spec()
        cells = [f"`{v.name}`", _cell(v.summary), _columns(v.reads(spec)), _columns(v.writes(spec))]
        cells += [f"`{v.needs}`" if v.needs else "—"] * needs + [_cell(v.gradient_coefficient()) or "—"] * coef
        out.append("| " + " | ".join(cells) + " |")
    return out


def _kind_intro(kind: VariantKind) -> list[str]:
    """What every node of the kind reads, writes and takes, whatever its variant."""
    title = kind.kind.capitalize()
    reads, writes = _own_columns(kind)
    does = [f"reads {_columns(reads)}"] * bool(reads) + [f"writes {_columns(writes)}"] * bool(writes)
    names = [n for n in kind.base.model_fields if n not in NOT_SETTINGS]
    intro = f"`{title}(variant, ...)`." + (f" Every {kind.kind} node {' and '.join(does)}." if does else "")
    if not names:
        return [intro + " No fields beyond its variant's settings.", ""]
    return [intro + " Its fields, whatever the variant:", "", *field_table(kind.base, names), ""]


def variant_kind(kind: VariantKind) -> list[str]:
    """The base fields of one kind, its variants at a glance, then each variant's settings."""
    title = kind.kind.capitalize()
    out = [f"### {title} variants", "", *_kind_intro(kind)]
    out += [f"Columns a variant reads or writes beyond every {kind.kind} node's own, at its default settings "
            "(a setting may add some: the sections of this page say which).", "", *_variant_table(kind), ""]
    for v in kind.variants():
        body = field_table(v.spec, list(v.params)) if v.params else ["No settings."]
        out += [f"**`{title}(\"{v.name}\")`**", "", *body, ""]
    return out


def markdown() -> str:
    """Every settings table, as the markdown that goes between the markers of docs/nodes.md."""
    lines = ["*Generated from the code by `rlflow docs --write`; do not edit by hand (`rlflow docs --check` "
             "and `tests/test_docs.py` fail when this is out of date). Every node also takes `name` "
             "(default: its kind).*", ""]
    lines += plain_kinds()
    for kind in VARIANT_KINDS:
        lines += variant_kind(kind)
    return "\n".join(lines).rstrip() + "\n"


# --- docs/nodes.md -------------------------------------------------------------------------------


def unified_markdown() -> str:
    """The unified view of every shipped pipeline (rlflow.unified), read off its nodes, as the
    markdown between the unified-view markers of docs/algorithms.md."""
    from rlflow.graph import resolve
    from rlflow.loader import load_pipeline
    from rlflow.unified import markdown as table

    files = sorted(f for f in PIPELINES.glob("*.py") if f.name != "__init__.py")
    rows = [(f"`{f.stem}`", resolve(load_pipeline(f))) for f in files]
    return ("*Generated from the pipelines' nodes by `rlflow docs --write` (`tests/test_docs.py` fails when it is "
            "out of date); `rlflow compare A B` opens with the same table.*\n\n" + table(rows))


def graph_markdown(name: str) -> str:
    """``rlflow graph pipelines/<name>.py`` as plain text in a code block (docs/algorithms.md)."""
    import io

    from rich.console import Console

    from rlflow.graph import build
    from rlflow.loader import load_pipeline
    from rlflow.view import render_graph

    console = Console(file=io.StringIO(), width=160, record=True, color_system=None)
    console.print(render_graph(build(load_pipeline(PIPELINES / f"{name}.py"))))
    text = "\n".join(line.rstrip() for line in console.export_text().splitlines())
    return f"```\n{text}\n```\n"


BLOCKS = {BEGIN: markdown, UNIFIED_BEGIN: unified_markdown}  # marker -> what goes after it, up to END
GRAPH_BEGIN = re.compile(r"<!-- generated: graph (\w+) -->")  # a pipeline's graph: its file's stem


def _blocks(text: str) -> dict[str, Any]:
    """The generated blocks ``text`` has: marker -> function giving its content."""
    found = {begin: make for begin, make in BLOCKS.items() if begin in text}
    for m in GRAPH_BEGIN.finditer(text):
        found[m.group(0)] = lambda name=m.group(1): graph_markdown(name)
    return found


def replace_block(text: str, block: str, begin: str = BEGIN) -> str:
    """``text`` with what lies between ``begin`` and the next end marker replaced by ``block``."""
    start = text.find(begin)
    end = text.find(END, start)
    if start < 0 or end < start:
        raise ValueError(f"no '{begin}' ... '{END}' markers in the page")
    return text[: start + len(begin)] + "\n" + block + text[end:]


def updated(path: Path = NODES_MD) -> tuple[str, str]:
    """(the page as it is, the page with every generated block it has regenerated)."""
    text = new = path.read_text()
    found = _blocks(text)
    if not found:
        raise ValueError(f"no '{BEGIN}' (or '{UNIFIED_BEGIN}', or a pipeline's graph) ... '{END}' markers in the page")
    for begin, make in found.items():
        new = replace_block(new, make(), begin)
    return text, new
