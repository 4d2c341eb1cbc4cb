"""The architecture holds: a variant is one function, the engine knows no variant, the
config round-trips and reruns, compare hides nothing, functions stay small."""

import ast
import itertools
import json
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from rlflow import loss_variant
from rlflow.cli import main
from rlflow.graph import build, resolve
from rlflow.perf import MACHINE_DEPENDENT
from rlflow.loader import load_pipeline
from rlflow.nodes.loss import LossTerm, _floats
from rlflow.nodes.masked import AggMode, aggregate
from rlflow.settings import ABSENT, diff, flatten
from rlflow.spec import ADVANTAGES, FILTERS, LOSSES, Pipeline

REPO = Path(__file__).parent.parent
PIPES = sorted(p for p in (REPO / "pipelines").glob("*.py") if p.name != "__init__.py")
SOURCES = sorted((REPO / "rlflow").glob("*.py")) + sorted((REPO / "nodes").glob("*.py"))
MAX_FUNCTION_LINES = 60


# --- a variant declared here, in the test file, and nowhere else --------------------------


def scaled_reinforce(cols, counts, *, scale: Annotated[float, Field(gt=0, le=10)] = 2.0,
                     agg: AggMode = "token-mean") -> LossTerm:
    """Plain policy gradient scaled by a constant: -scale · A · log π (a test variant)."""
    per_token = -scale * cols["advantages"] * cols["logprobs"]
    loss = aggregate(per_token, cols["response_mask"], agg, counts)
    return LossTerm(loss, _floats({"loss/scaled_reinforce": loss}))


@pytest.fixture
def declared():
    loss_variant(needs="logprobs", reads={"advantages": "token"}, coefficient="scale·A")(scaled_reinforce)
    yield LOSSES["scaled_reinforce"]
    LOSSES.registry._items.pop("scaled_reinforce")


PIPELINE_USING_IT = '''"""GRPO with the test's own loss variant."""
from rlflow import Advantage, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import exact_match

actor = Model("builtin:tiny-arith", train=True, lr=1e-4)
pipeline = Pipeline(
    name="custom", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor},
    nodes=[Generate("actor", n=2, max_new_tokens=4), Score(rule=exact_match), Advantage("group_norm"),
           Loss("scaled_reinforce", model="actor", scale=3.0)],
    steps=2, eval=None,
)
'''


def test_a_variant_declared_in_a_test_runs_through_validate_graph_and_run(declared, tmp_path, capsys):
    f = tmp_path / "custom.py"
    f.write_text(PIPELINE_USING_IT)
    assert main(["validate", str(f)]) == 0
    assert main(["graph", str(f)]) == 0
    graph = capsys.readouterr().out
    assert "loss [loss:scaled_reinforce] @actor  scale=3" in graph and "← advantage: advantages" in graph
    bad = tmp_path / "bad.py"
    bad.write_text(PIPELINE_USING_IT.replace("scale=3.0", "scale=30.0"))  # its bound, from its annotation
    assert main(["validate", str(bad)]) == 2
    assert "less than or equal to 10" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(f), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss/scaled_reinforce"], float) for r in records)
    assert json.loads((out / "config.json").read_text())["nodes"][3]["scale"] == 3.0


# --- the config round-trips and reruns -----------------------------------------------------


@pytest.mark.parametrize("path", PIPES, ids=[p.stem for p in PIPES])
def test_every_shipped_pipeline_round_trips(path):
    p = load_pipeline(path)
    assert Pipeline.model_validate(json.loads(json.dumps(p.to_config()))) == p
    resolved = build(p).pipeline
    assert Pipeline.from_config(json.loads(json.dumps(resolved.to_config()))) == resolved
    assert resolve(resolved) is resolved  # resolving twice changes nothing


def test_a_rule_defined_in_a_pipeline_file_is_referenced_through_the_file(tmp_path):
    f = tmp_path / "own_rule.py"
    f.write_text(PIPELINE_USING_IT.replace("from rlflow.arith import exact_match\n", "")
                 .replace("Loss(\"scaled_reinforce\", model=\"actor\", scale=3.0)", "Loss(\"clip\", model=\"actor\")")
                 .replace('actor = Model', 'def exact_match(response, row):\n    return float(response == row["answer"])\n\n\nactor = Model'))
    cfg = load_pipeline(f).to_config()
    assert cfg["nodes"][1]["rules"]["exact_match"]["fn"] == f"{f.resolve()}:exact_match"
    again = Pipeline.from_config(json.loads(json.dumps(cfg)))
    assert again.nodes[1].rules["exact_match"].fn("7", {"answer": "7"}) == 1.0


def test_rerunning_a_runs_config_gives_the_same_metrics(tmp_path):
    sets = ["--set", "data.batch_size=4", "--set", "generate.n=2", "--set", "pipeline.eval=null", "--quiet"]
    assert main(["run", str(REPO / "pipelines" / "grpo.py"), "--steps", "2", "--out", str(tmp_path / "a"), *sets]) == 0
    assert main(["run", str(tmp_path / "a" / "config.json"), "--steps", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 0

    def metrics(run):
        recs = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "nodes") and not k.startswith(MACHINE_DEPENDENT)}
                for r in recs]

    assert metrics("a") == metrics("b") and len(metrics("a")) == 2
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads((tmp_path / "b" / "config.json").read_text())


# --- compare hides no setting ------------------------------------------------------------------


def _covered(key: str, rows: dict) -> bool:
    return key in rows or any(key.startswith(r + ".") or key.startswith(r + "[") for r in rows)


def test_compare_of_every_pair_of_shipped_pipelines_lists_every_differing_setting():
    configs = {p.stem: resolve(load_pipeline(p)).to_config() for p in PIPES}
    for a, b in itertools.combinations(configs, 2):
        rows = dict(diff(configs[a], configs[b]))
        fa, fb = flatten(configs[a]), flatten(configs[b])
        for key in set(fa) | set(fb):
            if fa.get(key, ABSENT) != fb.get(key, ABSENT):
                assert _covered(key, rows), (a, b, key)
        assert rows, (a, b)  # no two shipped pipelines are identical


@pytest.mark.parametrize("path", [PIPES[[p.stem for p in PIPES].index(n)] for n in ("vc_ppo", "dapo", "online_dpo")],
                         ids=["vc_ppo", "dapo", "online_dpo"])
def test_compare_reports_each_changed_setting_of_a_copy(path, tmp_path):
    base = resolve(load_pipeline(path)).to_config()
    changed = 0
    for key, value in flatten(base).items():
        copy = _with_changed(base, key)
        if copy is None:
            continue
        rows = dict(diff(base, copy))
        assert list(rows) == [key], (key, rows)
        f = tmp_path / f"{changed}.json"
        f.write_text(json.dumps(copy))
        changed += 1
    assert changed >= 40  # every number, flag and choice of the pipeline was changed in turn


def _with_changed(cfg: dict, key: str):
    """A valid copy of ``cfg`` with the setting ``key`` changed, or None if it has no other valid value."""
    flat_value = flatten(cfg)[key]
    for candidate in _alternatives(flat_value):
        copy = json.loads(json.dumps(cfg))
        if _set(copy, key, candidate):
            try:
                Pipeline.from_config(copy)
            except Exception:
                continue
            return copy
    return None


def _alternatives(shown: str) -> list:
    try:
        v = json.loads(shown)
    except json.JSONDecodeError:
        v = shown
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, (int, float)):
        return [c for c in (v + 1, v / 2 if v else 0.5, v * 0.9, 0.1) if c != v]
    if v is None:
        return [1, 0.5, 4]
    return []


def _set(cfg: dict, key: str, value) -> bool:
    """Set the flattened ``key`` (``nodes.loss.eps``, ``phases[0].steps``) in ``cfg``."""
    obj, parts = cfg, key.replace("[", ".[").split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.startswith("["):
            idx = int(part[1:-1])
            if last:
                obj[idx] = value
                return True
            obj = obj[idx]
        elif isinstance(obj, list):  # a node, by name
            obj = next(x for x in obj if x.get("name") == part)
        elif last:
            obj[part] = value
            return True
        else:
            obj = obj[part]
    return False


# --- the engine knows no variant; functions stay small; one declaration per name -------------


def test_the_engine_names_no_variant_and_imports_no_maths():
    engine = (REPO / "rlflow" / "engine.py").read_text()
    names = LOSSES.names() + ADVANTAGES.names() + FILTERS.names()
    for name in names:
        assert f'"{name}"' not in engine and f"'{name}'" not in engine, name
    imports = [n for n in ast.walk(ast.parse(engine)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {getattr(n, "module", None) or n.names[0].name for n in imports}
    assert not any(m.startswith(("rlflow.nodes", "rlflow.forward")) for m in modules), modules
    assert "agg_constant" not in engine and "temperature" not in engine


def _decorator_name(d) -> str:
    d = d.func if isinstance(d, ast.Call) else d
    return d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")


def test_each_variant_is_declared_once():
    declared: dict[str, list[str]] = {}
    literals = []
    for f in SOURCES:
        tree = ast.parse(f.read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef) and any(_decorator_name(d).endswith("_variant") for d in n.decorator_list):
                declared.setdefault(n.name, []).append(f.name)
            if isinstance(n, ast.Subscript) and getattr(n.value, "id", "") == "Literal":
                literals.append(ast.unparse(n))
    names = LOSSES.names() + ADVANTAGES.names() + FILTERS.names()
    assert sorted(declared) == sorted(names) and all(len(v) == 1 for v in declared.values()), declared
    # no second list of the names: no Literal of variant names anywhere (the spec is made from the function);
    # "pairs" and "value" are also a data kind and a model head, which have literals of their own, and
    # "correct" is also a setting value of Loss("nll", where="correct")
    only_variants = set(names) - {"pairs", "value", "correct"}
    assert not [lit for lit in literals if any(f"'{n}'" in lit for n in only_variants)], literals


@pytest.mark.parametrize("path", SOURCES, ids=[f"{p.parent.name}/{p.name}" for p in SOURCES])
def test_no_function_is_longer_than_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_no_file_holds_a_merge_conflict_marker():
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    marked = [f for f in files if f.endswith((".py", ".md", ".toml", ".sh", ".txt", "Makefile", "run"))
              and any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in (REPO / f).read_text().splitlines())]
    assert not marked, marked
