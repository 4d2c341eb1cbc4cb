"""Nothing lost, nothing let in: every case of the catalogue of invalid input
(tests/invalid/catalogue.py) is one clear message with its code, exit 2, no traceback,
and a command that would run stops before any model loads."""

import os
import sys
import types
from pathlib import Path

import pytest

from invalid.catalogue import CASES, OK, Case

from rlflow.cli import main
from rlflow.graph import CODES as GRAPH_CODES
from rlflow.graph import WARNINGS
from rlflow.loader import CODES as FILE_CODES

REPO = Path(__file__).parent.parent


class EngineReached(AssertionError):
    """The command got as far as the engine: a model would have been loaded."""


def _no_engine() -> types.ModuleType:
    """A stand-in for ``rlflow.engine`` that fails the test if ``run`` reaches it."""
    engine = types.ModuleType("rlflow.engine")

    def run(*args, **kwargs):
        raise EngineReached("reached rlflow.engine.Run: the input was not rejected before the models load")

    engine.Run = run
    return engine


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _run(case: Case, tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    _write(tmp_path, case.files)
    if case.not_root:
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        (tmp_path / "ro").chmod(0o555)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "rlflow.engine", _no_engine())
    rc = main(case.argv)
    return rc, capsys.readouterr().err


def test_the_catalogue_is_large_and_covers_every_code():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES), "case ids are unique"
    errors = {c for c in {**GRAPH_CODES, **FILE_CODES} if c not in WARNINGS}  # warnings are tested in test_validate
    missing = errors - {c.code for c in CASES} - {"RF110"}  # RF110 needs several processes (test_spmd)
    assert not missing, f"no invalid case for {sorted(missing)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_input(case, tmp_path, monkeypatch, capsys):
    rc, err = _run(case, tmp_path, monkeypatch, capsys)
    assert rc == case.exit, err
    assert case.code in err, err
    assert case.phrase in err, err
    assert "Traceback" not in err and "EngineReached" not in err, err


def test_the_template_is_valid(tmp_path, monkeypatch, capsys):
    """The pipeline the cases change is valid, and `run` of it gets as far as the engine."""
    _write(tmp_path, OK)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "p.py"]) == 0, capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "rlflow.engine", _no_engine())
    assert main(["run", "p.py", "--out", "r", "--quiet"]) == 1
    assert "reached rlflow.engine.Run" in capsys.readouterr().err


def test_every_code_is_documented():
    """docs/dsl.md's table of codes is the catalogue: every code, none more."""
    text = (REPO / "docs" / "dsl.md").read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| RF")}
    assert rows == set(GRAPH_CODES) | set(FILE_CODES)


def test_report_shows_the_readable_steps_before_the_bad_line(tmp_path, monkeypatch, capsys):
    case = next(c for c in CASES if c.id == "report_truncated_metrics")
    rc, err = _run(case, tmp_path, monkeypatch, capsys)
    assert rc == 2 and "metrics.jsonl:2" in err
    _write(tmp_path, case.files)
    main(case.argv)
    out = capsys.readouterr().out
    assert "r: 1 step in 0.0s (did not finish)" in out and "generate" in out


def test_good_jsonl_data_passes(tmp_path, monkeypatch, capsys):
    """The data checks let good rows through: blank lines, extra fields, held-out rows."""
    rows = '{"prompt": "1+1=", "answer": "2", "id": 7}\n\n{"prompt": "2+2=", "answer": 4}\n'
    src = OK["p.py"].replace('Prompts("builtin:arith", batch_size=4)', 'Prompts("d.jsonl", batch_size=4, eval_source="d.jsonl")')
    _write(tmp_path, {"p.py": src, "d.jsonl": rows})
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "p.py"]) == 0, capsys.readouterr().err


def test_validate_imports_no_torch_when_it_rejects(tmp_path):
    """The input checks are torch-free too: validate of a bad data file, a bad model path and a
    bad config imports no torch."""
    import subprocess

    files = {}
    for case_id in ("data_bad_json_line", "missing_model_path", "config_rule_not_importable"):
        case = next(c for c in CASES if c.id == case_id)
        sub = tmp_path / case_id
        _write(sub, case.files)
        files[sub] = case.argv[1]
    calls = "; ".join(f"os.chdir({str(d)!r}); rcs.append(main(['validate', {f!r}]))" for d, f in files.items())
    code = (f"import os, sys; from rlflow.cli import main; rcs = []; {calls}; "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(0 if rcs == [2, 2, 2] else 1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
