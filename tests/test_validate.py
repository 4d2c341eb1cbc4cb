"""Every static check: one tiny invalid pipeline per failure, asserting code and message."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlflow.cli import main
from rlflow.graph import build
from rlflow.loader import UserError, apply_overrides, load_pipeline

FIX = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def problems_of(name):
    pg = build(load_pipeline(FIX / f"{name}.py"))
    return {(p.code, p.node, p.field): p for p in pg.errors}


@pytest.mark.parametrize(
    "fixture, code, node, field, words",
    [
        ("duplicate_name", "RF001", "score", "name", "two nodes have this name"),
        ("cycle", "RF002", None, None, "cycle: "),
        ("missing_column", "RF003", "advantage", "rewards", "no node writes"),
        ("written_twice", "RF004", "score2", "rewards", "written by score, score2"),
        ("undeclared_model", "RF005", "ref_logprob", "model", "did you mean 'ref'"),
        ("trainable_without_loss", "RF006", "other", "train", "no Loss node trains it"),
        ("loss_on_frozen", "RF007", "loss", "model", "frozen"),
        ("level_mismatch", "RF008", "advantage", "rewards", "at level 'seq'"),
        ("group_advantage_n1", "RF009", "advantage", "variant", "n=1"),
        ("wrong_head", "RF011", "value", "model", "Value needs a critic"),
    ],
)
def test_each_static_check(fixture, code, node, field, words):
    found = problems_of(fixture)
    hits = [p for (c, n, f), p in found.items() if c == code and (node is None or n == node) and (field is None or f == field)]
    assert hits, f"expected {code} on {node}.{field}, found {[p.line() for p in found.values()]}"
    assert words in hits[0].line()


def test_all_problems_reported_at_once():
    # missing_column lacks rewards; with n=1 it also breaks the group check: both at once
    p = apply_overrides(load_pipeline(FIX / "missing_column.py"), ["generate.n=1"])
    codes = sorted({x.code for x in build(p).errors})
    assert codes == ["RF003", "RF009"]


def test_shipped_pipelines_are_valid():
    files = sorted((REPO / "pipelines").rglob("*.py"))
    files = [f for f in files if f.name != "__init__.py"]
    assert len(files) >= 2
    for f in files:
        pg = build(load_pipeline(f))
        assert not pg.errors, (f, [p.line() for p in pg.errors])


@pytest.mark.parametrize(
    "fixture, code, words",
    [
        ("syntax_error", "RF101", "syntax error"),
        ("no_pipeline", "RF102", "defines no `pipeline"),
        ("wrong_type", "RF103", "Generate.n"),
        ("misspelt_param", "RF103", "epsilon"),
        ("unknown_variant", "RF104", "did you mean 'group_norm'"),
    ],
)
def test_load_errors(fixture, code, words):
    with pytest.raises(UserError) as e:
        load_pipeline(FIX / f"{fixture}.py")
    assert e.value.code == code
    assert words.lower() in str(e.value).lower()


def test_load_error_names_the_line():
    with pytest.raises(UserError) as e:
        load_pipeline(FIX / "misspelt_param.py")
    assert "misspelt_param.py:4" in str(e.value)


@pytest.mark.parametrize(
    "args, words",
    [
        (["validate", "no/such/file.py"], "RF100"),
        (["validate", str(FIX / "syntax_error.py")], "RF101"),
        (["validate", str(FIX / "unknown_variant.py")], "RF104"),
        (["validate", str(FIX / "cycle.py")], "RF002"),
        (["run", str(FIX / "wrong_type.py")], "RF103"),
        (["run", str(FIX / "missing_model_path.py")], "RF107"),
        (["run", str(REPO / "pipelines" / "grpo.py"), "--set", "generate.n=zero"], "RF103"),
        (["run", str(REPO / "pipelines" / "grpo.py"), "--set", "generat.n=4"], "did you mean 'generate'"),
        (["run", str(REPO / "pipelines" / "grpo.py"), "--set", "generate.nn=4"], "did you mean 'n'"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words.lower() in err.lower()
    assert "Traceback" not in err


def test_debug_shows_traceback(capsys):
    assert main(["--debug", "validate", str(FIX / "no_pipeline.py")]) == 2
    assert main(["--debug", "run", str(FIX / "wrong_type.py")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_set_overrides_are_validated_and_applied():
    p = load_pipeline(REPO / "pipelines" / "grpo.py")
    q = apply_overrides(p, ["generate.n=16", "loss.eps=0.3", "actor.lr=3e-5", "data.batch_size=4", "pipeline.steps=7"])
    assert q.node("generate").n == 16 and q.node("loss").eps == 0.3
    assert q.models["actor"].lr == 3e-5 and q.data.batch_size == 4 and q.steps == 7
    assert p.node("generate").n == 8  # the original is untouched


def test_validate_imports_no_torch():
    code = ("import sys; from rlflow.cli import main; "
            f"rc = main(['validate', {str(REPO / 'pipelines' / 'grpo.py')!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
