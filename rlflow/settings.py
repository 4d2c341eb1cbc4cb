"""Every setting of a resolved pipeline config as a flat ``path -> value`` map, and their diff.

``rlflow compare`` shows the diff of several pipelines (files or runs' config.json), and
``--resume`` refuses a configuration that differs from the run's. Paths read like
``--set`` targets: ``nodes.loss.eps``, ``models.actor.lr``, ``data.batch_size``,
``phases[0].train``, ``steps``. No torch import.
"""

from __future__ import annotations

import json
from typing import Any

ABSENT = "—"  # a setting one config has and the other has not
NOT_SETTINGS = ("name", "description")  # labels of a pipeline, not settings


def _show(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v)


def _summary(obj: dict[str, Any]) -> str:
    """One line for a whole object (a node, a model, a rule) that only one side has."""
    if "kind" in obj:
        return obj["kind"] + (f":{obj['variant']}" if "variant" in obj else "")
    if "path" in obj:
        return f"{obj['path']} ({'trainable' if obj.get('train') else 'frozen'})"
    if "fn" in obj:
        return str(obj["fn"])
    return ", ".join(f"{k}={_show(v)}" for k, v in obj.items())


def _walk(cfg: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(setting path -> value, object path -> one-line summary)."""
    values: dict[str, str] = {}
    objects: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            if prefix:
                objects[prefix] = _summary(v)
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
            for x in v:
                walk(f"{prefix}.{x['name']}", {k: y for k, y in x.items() if k != "name"})
        elif isinstance(v, list) and v:
            for i, x in enumerate(v):
                walk(f"{prefix}[{i}]", x)
        else:
            values[prefix] = _show(v)

    walk("", {k: v for k, v in cfg.items() if k not in NOT_SETTINGS})
    return values, objects


def flatten(cfg: dict[str, Any]) -> dict[str, str]:
    """``{"nodes": [{"name": "loss", "eps": 0.2}]}`` -> ``{"nodes.loss.eps": "0.2"}``.

    Lists of named objects (nodes) are keyed by name, other lists by index; empty
    containers are kept as values so that an added or removed phase is a difference.
    """
    return _walk(cfg)[0]


def _inside(key: str, prefix: str) -> bool:
    return key.startswith(prefix + ".") or key.startswith(prefix + "[")


def diff(*configs: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Every setting whose value differs between ``configs``, in first-seen order. An object
    (node, model, phase, rule) that some configs lack is one row with its summary."""
    walked = [_walk(c) for c in configs]
    flats = [w[0] for w in walked]
    objects = [w[1] for w in walked]
    partial = [o for o in dict.fromkeys(k for obj in objects for k in obj) if not all(o in obj for obj in objects)]
    top = [o for o in partial if not any(_inside(o, q) for q in partial if q != o)]
    rows: list[tuple[str, list[str]]] = []
    seen_top: set[str] = set()
    for k in dict.fromkeys(k for f in flats for k in f):
        # an object some configs lack, or that is a plain value in others (lora: null)
        owner = next((o for o in top if k == o or _inside(k, o)), None)
        if owner is not None:
            if owner not in seen_top:
                seen_top.add(owner)
                rows.append((owner, [obj.get(owner, f.get(owner, ABSENT)) for obj, f in zip(objects, flats)]))
            continue
        values = [f.get(k, ABSENT) for f in flats]
        if len(set(values)) > 1:
            rows.append((k, values))
    return rows


def describe(rows: list[tuple[str, list[str]]]) -> str:
    """One line per difference of two configs: ``path: old -> new``."""
    return "\n".join(f"  {path}: {' -> '.join(values)}" for path, values in rows)
