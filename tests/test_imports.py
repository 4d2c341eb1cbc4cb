"""The import graph of the package has no cycle (DESIGN.md "Layers": each layer imports
only the ones above it). Every import counts, those inside functions too."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).parent.parent
# where each package of rlflow lives (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"rlflow": ROOT / "rlflow", "rlflow.nodes": ROOT / "nodes", "rlflow.pipelines": ROOT / "pipelines"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the three packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for f in sorted(folder.glob("*.py")):
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return out


def imported(name: str, file: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``file`` (module ``name``) imports anywhere in its body."""
    package = name if file.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .a import b
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from rlflow import arith` names a module
    return {m for m in found if m in known and m != name}


def import_graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, file in mods.items():
        g.add_edges_from((name, target) for target in imported(name, file, set(mods)))
    return g


def test_the_graph_sees_imports_inside_functions():
    g = import_graph()
    assert g.has_edge("rlflow.engine", "rlflow.models")  # module level
    assert g.has_edge("rlflow.builtin", "rlflow.arith")  # inside a function
    assert g.has_edge("rlflow.pipelines.grpo", "rlflow.arith")  # from rlflow.arith import ...


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_the_runtime_knows_no_task():
    # DESIGN.md: builtin: names are providers looked up by name; one module loads the shipped ones
    # (a task module may build on another: arith_chain shares arith's tokenizer and model makers)
    g = import_graph()
    tasks = {"rlflow.arith", "rlflow.arith_chain"}
    for task in tasks:
        importers = {m for m in g.predecessors(task) if not m.startswith("rlflow.pipelines.")} - tasks
        assert importers == {"rlflow.builtin"}, task
    for provider_side in (*sorted(tasks), "rlflow.builtin", "rlflow.provider"):
        assert not nx.has_path(g, provider_side, "rlflow.engine"), provider_side
