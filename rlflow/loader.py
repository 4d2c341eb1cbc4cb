"""Load a pipeline file and apply ``--set`` overrides, turning every mistake into a
``UserError`` with a stable code, the file, the line, and what would be valid.
No torch import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlflow.registry import UnknownName
from rlflow.spec import Model, Pipeline


class UserError(Exception):
    """Bad input from the user: reported as one clear message and exit code 2."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code} {message}")


def _line_in(path: Path, tb) -> str:
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


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
    """Import ``file`` and return its ``pipeline`` (or its only Pipeline object)."""
    path = Path(file)
    if not path.exists():
        raise UserError("RF100", f"{path}: no such pipeline file")
    if path.is_dir() or path.suffix != ".py":
        raise UserError("RF100", f"{path}: a pipeline file is a .py file")
    # the same in every process (not the salted hash()): rules are recorded in config.json
    # by module name, and resume compares that with the settings of the new process
    name = f"rlflow_pipeline_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so rules defined in the file can be found by name
    sys.path.insert(0, str(path.parent.resolve()))  # as when running a script: siblings import
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError("RF101", f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except ValidationError as e:
        raise UserError("RF103", f"{_line_in(path, e.__traceback__)}: invalid {format_validation_error(e)}") from e
    except UnknownName as e:
        raise UserError("RF104", f"{_line_in(path, e.__traceback__)}: {e}") from e
    except (ValueError, TypeError) as e:
        raise UserError("RF103", f"{_line_in(path, e.__traceback__)}: {type(e).__name__}: {e}") from e
    except ImportError as e:
        raise UserError("RF105", f"{_line_in(path, e.__traceback__)}: cannot import: {e}") from e
    except Exception as e:
        raise UserError("RF105", f"{_line_in(path, e.__traceback__)}: {type(e).__name__} while loading the pipeline: {e}") from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    found = getattr(module, "pipeline", None)
    if not isinstance(found, Pipeline):
        objs = [v for v in vars(module).values() if isinstance(v, Pipeline)]
        if len(objs) != 1:
            raise UserError("RF102", f"{path}: defines no `pipeline = Pipeline(...)` at module level"
                            + (f" (it has {len(objs)} Pipeline objects)" if objs else ""))
        found = objs[0]
    return found


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a plain string (pydantic still checks its type)


def apply_overrides(pipeline: Pipeline, sets: list[str]) -> Pipeline:
    """``--set name.param=value``: a node (by name), a model, ``data`` or ``pipeline``.

    Every override goes through the same validation as the file itself.
    """
    for item in sets:
        target, eq, raw = item.partition("=")
        owner, dot, param = target.partition(".")
        if not eq or not dot or not param:
            raise UserError("RF106", f"--set {item!r}: expected NAME.PARAM=VALUE, e.g. generate.n=16")
        value = _parse_value(raw)
        try:
            if owner == "pipeline":
                pipeline = Pipeline.model_validate({**dict(pipeline), param: value})
            elif owner == "data":
                d = pipeline.data
                new = type(d).model_validate({**d.model_dump(), param: value})
                pipeline = pipeline.model_copy(update={"data": new})
            elif owner in pipeline.models:
                models = dict(pipeline.models)
                models[owner] = Model.model_validate({**models[owner].model_dump(), param: value})
                pipeline = pipeline.model_copy(update={"models": models})
            else:
                node = pipeline.node(owner)
                if param not in type(node).model_fields:
                    raise UnknownName(f"parameter of node {owner!r}", param, sorted(type(node).model_fields))
                fields = {k: getattr(node, k) for k in type(node).model_fields}
                new = type(node).model_validate({**fields, param: value})
                pipeline = pipeline.model_copy(update={"nodes": [new if n is node else n for n in pipeline.nodes]})
            if owner == "pipeline" and param not in Pipeline.model_fields:
                raise UnknownName("pipeline parameter", param, sorted(Pipeline.model_fields))
        except ValidationError as e:
            raise UserError("RF103", f"--set {item!r}: invalid {format_validation_error(e)}") from e
        except UnknownName as e:
            known = f"; models: {', '.join(pipeline.models)}; or 'data', 'pipeline'" if e.what == "node" else ""
            raise UserError("RF106", f"--set {item!r}: {e}{known}") from e
    return pipeline
