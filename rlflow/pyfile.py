"""Import a Python file by path, once: pipeline files and the rules defined in them.

A pipeline file is imported as module ``rlflow_pipeline_<hash of its path>``, registered
in ``sys.modules`` so that functions defined in it can be found by reference. A rule
defined inside a pipeline file is written to ``config.json`` as ``<file>.py:<function>``
and found again through this module. No torch import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PREFIX = "rlflow_pipeline_"


def module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return PREFIX + digest


def import_file(path: str | Path, *, fresh: bool = True) -> ModuleType:
    """Execute the file at ``path`` as a module (again if ``fresh``, else reuse a loaded one).

    The file's folder is on ``sys.path`` while it runs, as when running a script, so it
    can import its siblings. Errors raised by the file propagate unchanged.
    """
    path = Path(path)
    name = module_name(path)
    if not fresh and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.parent.resolve())
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


def file_of(module_name_: str) -> str | None:
    """The file behind a module imported by :func:`import_file`, or None for any other module."""
    if not module_name_.startswith(PREFIX):
        return None
    module = sys.modules.get(module_name_)
    return getattr(module, "__file__", None)
