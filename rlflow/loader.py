"""Load a pipeline file (or a run's ``config.json``) and apply ``--set`` overrides, turning
every mistake into a ``UserError`` with a stable code, the file, the line, and what would
be valid. No torch import.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlflow.pyfile import import_file
from rlflow.registry import UnknownName
from rlflow.spec import Model, Pipeline, RuleRefError

# The catalogue of the codes of files and command lines (the graph's are rlflow.graph.CODES):
# the tests assert these, so they never change meaning.
CODES = {
    "RF100": "no such pipeline file, or not a .py file or a JSON config",
    "RF101": "syntax error in the pipeline file",
    "RF102": "no pipeline object in the file, or several",
    "RF103": "invalid field: wrong type, out of range, not finite, or unknown",
    "RF104": "unknown node kind or variant",
    "RF105": "error while importing the pipeline file",
    "RF106": "bad --set: syntax, unknown node, model or parameter",
    "RF107": "model path that cannot name a model",
    "RF108": "data that does not exist",
    "RF109": "not a run directory, or one without checkpoints to resume",
    "RF110": "several processes but no --out",
    "RF111": "bad command-line argument",
    "RF112": "unusable run directory (--out)",
    "RF113": "unreadable line in a run's records",
    "RF114": "data file that cannot be used as it is",
    "RF115": "rule reference that cannot be imported",
}


class UserError(Exception):
    """Bad input from the user: reported as one clear message and exit code 2."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code} {message}")


def _line_in(path: Path, tb) -> str:
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def validation_code(err: ValidationError) -> str:
    """RF115 when a rule reference could not be imported, else RF103."""
    refs = [e for e in err.errors() if isinstance((e.get("ctx") or {}).get("error"), RuleRefError)]
    return "RF115" if refs else "RF103"


def format_validation_error(err: ValidationError) -> str:
    """One line per field: '<Spec>.<field>: <message> (got <value>)'."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        got = e.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) and e["type"] != "missing" else ""
        lines.append(f"{err.title}.{loc}: {e['msg']}{shown}")
    return "; ".join(lines)


def load_pipeline(file: str | Path) -> Pipeline:
    """The pipeline of a ``.py`` file (its ``pipeline``, or its only Pipeline object), or of a
    run's ``config.json``."""
    path = Path(file)
    if not path.exists():
        raise UserError("RF100", f"{path}: no such pipeline file")
    if path.is_dir() or path.suffix not in (".py", ".json"):
        raise UserError("RF100", f"{path}: a pipeline is a .py file or a run's config.json")
    if path.suffix == ".json":
        return load_config(path)
    try:
        module = import_file(path)
    except SyntaxError as e:
        raise UserError("RF101", f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except ValidationError as e:
        raise UserError(validation_code(e), f"{_line_in(path, e.__traceback__)}: invalid {format_validation_error(e)}") from e
    except UnknownName as e:
        raise UserError("RF104", f"{_line_in(path, e.__traceback__)}: {e}") from e
    except (ValueError, TypeError) as e:
        raise UserError("RF103", f"{_line_in(path, e.__traceback__)}: {type(e).__name__}: {e}") from e
    except ImportError as e:
        raise UserError("RF105", f"{_line_in(path, e.__traceback__)}: cannot import: {e}") from e
    except SystemExit as e:
        raise UserError("RF105", f"{_line_in(path, e.__traceback__)}: the pipeline file called sys.exit({e.code!r}) while "
                        "loading; a pipeline file declares a pipeline and must not exit") from None
    except Exception as e:
        raise UserError("RF105", f"{_line_in(path, e.__traceback__)}: {type(e).__name__} while loading the pipeline: {e}") from e
    found = getattr(module, "pipeline", None)
    if not isinstance(found, Pipeline):
        objs = [v for v in vars(module).values() if isinstance(v, Pipeline)]
        if len(objs) != 1:
            raise UserError("RF102", f"{path}: defines no `pipeline = Pipeline(...)` at module level"
                            + (f" (it has {len(objs)} Pipeline objects)" if objs else ""))
        found = objs[0]
    return found


def load_config(path: Path) -> Pipeline:
    """A pipeline from a run's ``config.json`` (what ``Pipeline.to_config`` wrote)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError("RF100", f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise UserError("RF100", f"{path}: a config is a JSON object, found {type(data).__name__}")
    try:
        return Pipeline.from_config(data)
    except ValidationError as e:
        raise UserError(validation_code(e), f"{path}: invalid {format_validation_error(e)}") from e
    except UnknownName as e:
        raise UserError("RF104", f"{path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - any other failure of a config is bad input too
        raise UserError("RF105", f"{path}: {type(e).__name__}: {e}") from e


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string (pydantic still checks its type)


def apply_overrides(pipeline: Pipeline, sets: list[str]) -> Pipeline:
    """``--set name.param=value``: a node (by name), a model, ``data`` or ``pipeline``.

    Every override goes through the same validation as the file itself; an unknown
    node, model or parameter is RF106 with the known names and the closest one.
    """
    for item in sets:
        target, eq, raw = item.partition("=")
        owner, dot, param = target.partition(".")
        if not eq or not dot or not owner or not param:
            raise UserError("RF106", f"--set {item!r}: expected NAME.PARAM=VALUE, e.g. generate.n=16")
        try:
            pipeline = _override(pipeline, owner, param, _parse_value(raw))
        except ValidationError as e:
            raise UserError(validation_code(e), f"--set {item!r}: invalid {format_validation_error(e)}") from e
        except UnknownName as e:
            known = f"; models: {', '.join(pipeline.models)}; or 'data', 'pipeline'" if e.what == "node" else ""
            raise UserError("RF106", f"--set {item!r}: {e}{known}") from e
    return pipeline


def _known(what: str, param: str, fields) -> None:
    if param not in fields:
        raise UnknownName(what, param, sorted(fields))


def _override(pipeline: Pipeline, owner: str, param: str, value: Any) -> Pipeline:
    """``pipeline`` with ``owner.param = value``, validated."""
    if owner == "pipeline":
        _known("pipeline parameter", param, Pipeline.model_fields)
        return Pipeline.model_validate({**dict(pipeline), param: value})
    if owner == "data":
        d = pipeline.data
        _known(f"parameter of data ({type(d).__name__})", param, type(d).model_fields)
        return pipeline.model_copy(update={"data": type(d).model_validate({**d.model_dump(), param: value})})
    if owner in pipeline.models:
        name, _, sub = param.partition(".")  # actor.lora.r=8: a setting of a model's nested spec
        _known(f"parameter of model {owner!r}", name, Model.model_fields)
        current = pipeline.models[owner].model_dump()
        if sub:
            if name != "lora":  # the one nested spec of a model
                raise UnknownName(f"parameter of model {owner!r}", param, sorted(Model.model_fields))
            value = {**(current["lora"] or {}), sub: value}  # a model without lora gets LoRA's defaults
        models = {**pipeline.models, owner: Model.model_validate({**current, name: value})}
        return pipeline.model_copy(update={"models": models})
    node = pipeline.node(owner)
    _known(f"parameter of node {owner!r}", param, type(node).model_fields)
    fields = {k: getattr(node, k) for k in type(node).model_fields}
    new = type(node).model_validate({**fields, param: value})
    return pipeline.model_copy(update={"nodes": [new if n is node else n for n in pipeline.nodes]})
