"""A pipeline's inputs, checked before any model loads: model paths and data files.

``rlflow validate`` and ``rlflow run`` call the same :func:`validate` (the graph's
checks, then these), so a run never rejects at start what ``validate`` passed. A jsonl
data file is read once, line by line, without keeping it: a line that is not a JSON
object, a row without a text field the source reads (text, or a chat for a prompt), or a
file without rows is found here, with the file and the line. Data read through the
``datasets`` library (a directory, a csv/json/parquet file, a Hugging Face dataset name)
is checked for existence and for the library only; its rows are read when the run
starts, and a dataset name that is not in the local cache is reported then, when the hub
cannot be reached. No model is loaded and no torch imported.

Codes (the catalogue is ``rlflow.graph.CODES``): RF107 a model path that cannot name a
model, RF108 data that does not exist, RF114 a data file that cannot be used as it is.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from rlflow.graph import PipelineGraph, Problem, build
from rlflow.loader import UserError
from rlflow.registry import UnknownName
from rlflow.models import check_path
from rlflow.spec import DataSource, Pairs, Pipeline

_JSON_TYPE = {int: "number", float: "number", bool: "boolean", list: "array", dict: "object", type(None): "null"}


class DataError(UserError):
    """Data that cannot be read or lacks a field: a ``UserError`` (exit 2, no traceback)."""

    def __init__(self, message: str, code: str = "RF114"):
        super().__init__(code, message)
        self.message = message


def check_source(spec: DataSource) -> Optional[str]:
    """Why ``spec.source`` cannot be found, or None. Cheap: reads no file."""
    return _missing(spec.source, spec.kind)


# files read without the datasets library; other data files go through it
NATIVE_SUFFIX = ".jsonl"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_dataset_name(src: str) -> bool:
    """Whether ``src`` names a Hugging Face dataset (``openai/gsm8k``) rather than a local
    path: nothing of that name here, no data-file suffix, not a path (``./``, ``/``, ``~``)."""
    if src.startswith("builtin:") or Path(src).expanduser().exists() or src.endswith(DATA_SUFFIXES):
        return False
    return bool(_DATASET_NAME.fullmatch(src))


def needs_datasets(src: str) -> bool:
    """Whether reading ``src`` takes the ``datasets`` library (all but builtin and jsonl)."""
    return not src.startswith("builtin:") and (is_dataset_name(src) or not src.endswith(NATIVE_SUFFIX)
                                                or Path(src).expanduser().is_dir())


def _missing(src: str, kind: Optional[str] = None) -> Optional[str]:
    if src.startswith("builtin:"):
        return _builtin_missing(src, kind)
    named = is_dataset_name(src)
    if not named and not Path(src).expanduser().exists():
        return f"data file {src!r} does not exist"
    if needs_datasets(src) and importlib.util.find_spec("datasets") is None:
        what = "the Hugging Face dataset" if named else "a directory" if Path(src).expanduser().is_dir() else "the file"
        return f"reading {what} {src!r} needs the datasets library: pip install 'rlflow[data]'"
    return None


def _builtin_missing(src: str, kind: Optional[str]) -> Optional[str]:
    """Why no registered provider serves ``src`` (its name, then the data kind), or None."""
    from rlflow import builtin

    try:
        provider = builtin.data_provider(src)
    except UnknownName as e:
        return str(e)
    if kind is not None and kind not in provider.kinds:
        return f"{src} serves no {kind} data; it serves: {', '.join(sorted(provider.kinds))}"
    return None


def iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line of a jsonl file; DataError (RF114)
    naming the file and line at the first line that is not a JSON object."""
    try:
        with Path(path).expanduser().open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: a row is a JSON object, found a JSON {_JSON_TYPE.get(type(row), 'value')}")
                yield i, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def check_rows(path: str, fields: dict[str, str]) -> None:
    """Every row of the jsonl file at ``path`` has each text field of ``fields``
    (setting -> field name) as a string, and there is at least one row."""
    rows = 0
    for i, row in iter_jsonl(path):
        rows += 1
        for setting, name in fields.items():
            if name not in row:
                has = ", ".join(repr(k) for k in sorted(row)) or "nothing"
                raise DataError(f"{path}:{i}: the row has no field {name!r} (it has {has}); "
                                f"{setting}= names the field to read")
            why = field_problem(setting, row[name])
            if why:
                raise DataError(f"{path}:{i}: field {name!r} {why}")
    if rows == 0:
        raise DataError(f"{path}: no rows")


def chat_problem(value: Any) -> Optional[str]:
    """Why ``value`` is not a chat (a non-empty list of ``{"role": str, "content": str}``), or None."""
    if not isinstance(value, list) or not value:
        return "is not a chat (a non-empty list of {\"role\", \"content\"} messages)"
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return 'is a list but not of chat messages (objects with a "role" and a "content" string)'
    return None


def field_problem(setting: str, value: Any) -> Optional[str]:
    """Why ``value`` cannot be the text field ``setting`` (a prompt may also be a chat), or None."""
    if setting == "messages_field" or (setting == "prompt_field" and isinstance(value, list)):
        return chat_problem(value)
    if not isinstance(value, str):
        return f"is not text (a JSON {_JSON_TYPE.get(type(value), 'value')})"
    return None


def check_data(src: str, fields: dict[str, str]) -> None:
    """DataError (RF108 missing, RF114 unusable) for the data at ``src``; None when it can be read."""
    why = _missing(src)
    if why:
        raise DataError(why, "RF108")
    if not src.startswith("builtin:") and not needs_datasets(src):  # datasets' rows are read when the run starts
        check_rows(src, fields)


def _data_sources(pipeline: Pipeline) -> list[tuple[str, str, str, dict[str, str]]]:
    """``(owner, field, source, text fields)`` of every data file the run reads."""
    d = pipeline.data
    out = [("data", "source", d.source, d.text_fields())]
    ev = pipeline.eval
    if ev is None:
        return out
    if d.eval_source and not d.source.startswith("builtin:"):
        out.append(("data", "eval_source", d.eval_source, d.text_fields()))
    if ev.pairs and d.kind != "pairs":
        out.append(("eval", "pairs", ev.pairs, Pairs(ev.pairs).text_fields()))
    return out


def check_inputs(pipeline: Pipeline) -> list[Problem]:
    """Every model path and data file of ``pipeline``, checked: one Problem each that fails."""
    problems = []
    for name, m in pipeline.models.items():
        why = check_path(m.path)
        if why:
            problems.append(Problem("RF107", name, "path", why, "a built-in name, a Hugging Face id or a model directory", m.path))
    for owner, field, src, fields in _data_sources(pipeline):
        try:
            check_data(src, fields)
        except DataError as e:
            problems.append(Problem(e.code, owner, field, e.message))
    return problems


def validate(pipeline: Pipeline) -> PipelineGraph:
    """Every check that needs no model: the graph's (:func:`rlflow.graph.build`) and the inputs'."""
    pg = build(pipeline)
    pg.problems.extend(check_inputs(pg.pipeline))
    return pg
