"""Every static check: one tiny invalid pipeline per failure, asserting code and message."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlflow import Advantage, Loss, Pipeline
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


# --- settings that do nothing: warnings (the pipeline still runs) ------------------------------


def warnings_of(pipeline):
    return {(p.code, p.node, p.field): p for p in build(pipeline).warnings}


def shipped(name, *sets):
    return apply_overrides(load_pipeline(REPO / "pipelines" / f"{name}.py"), list(sets))


def test_a_clip_that_cannot_bind_is_a_warning():
    # one optimizer step per batch on the policy's own samples: ρ = 1, the clip never binds
    w = warnings_of(shipped("grpo"))
    assert ("RF016", "loss", "variant") in w and "ρ is 1" in w["RF016", "loss", "variant"].line()
    assert "dual-clip" in warnings_of(shipped("grpo", "loss.dual_clip=3.0"))["RF016", "loss", "variant"].line()
    assert warnings_of(shipped("grpo", "pipeline.mini_batches=2")) == {}
    assert warnings_of(shipped("grpo", "pipeline.ppo_epochs=2")) == {}
    for name in ("gspo", "cispo", "sapo", "dapo", "reinforce_pp", "ppo"):  # several updates per batch
        assert not [k for k in warnings_of(shipped(name)) if k[0] == "RF016"], name
    # bf16 sampling log-probs differ from the training forward: ρ ≠ 1, no warning, unless recomputed
    assert warnings_of(shipped("grpo", "actor.precision=bf16")) == {}
    assert ("RF016", "loss", "variant") in warnings_of(shipped("grpo", "actor.precision=bf16", "generate.recompute_logprobs=true"))


def test_the_clip_of_samples_from_another_model_is_not_inert():
    # samples of a frozen model: ρ = π_θ/π_sampler is not 1 even at the first step
    p = shipped("rft")
    q = p.model_copy(update={"nodes": [*p.nodes[:2], Advantage("group_norm"), Loss("clip", model="actor")]})
    assert not [k for k in warnings_of(q) if k[0] == "RF016"]


def test_a_kl_estimator_or_target_without_a_coefficient_is_a_warning():
    w = warnings_of(shipped("grpo", "loss.kl_coef=0", "loss.kl=k2", "pipeline.mini_batches=2"))
    assert sorted(w) == [("RF010", "ref_logprob", "ref_logprobs"), ("RF017", "loss", "kl")]  # ref_logprobs unread now
    assert "kl_coef is 0" in w["RF017", "loss", "kl"].line()
    w = warnings_of(shipped("grpo", "loss.kl_coef=0", "loss.kl_target=1.0", "pipeline.mini_batches=2"))
    assert ("RF017", "loss", "kl_target") in w and ("RF017", "loss", "kl") not in w
    w = warnings_of(shipped("sft", "loss.kl_target=1.0"))
    assert "has no KL penalty" in w["RF017", "loss", "kl_target"].line()
    assert warnings_of(shipped("grpo", "loss.kl_target=1.0", "pipeline.mini_batches=2")) == {}  # β starts at 0.04
    w = warnings_of(shipped("grpo", "loss.kl_horizon=500", "pipeline.mini_batches=2"))
    assert list(w) == [("RF017", "loss", "kl_horizon")] and "without kl_target" in w["RF017", "loss", "kl_horizon"].line()
    # the default estimator next to a zero coefficient is not a choice; a config read back is not either
    ppo = shipped("ppo")
    assert warnings_of(ppo) == {} and warnings_of(Pipeline.from_config(ppo.to_config())) == {}


def test_lam_beside_length_alpha_and_lambda_critic_is_a_warning():
    assert warnings_of(shipped("vapo")) == {}
    w = warnings_of(shipped("vapo", "advantage.lam=0.9"))
    assert list(w) == [("RF018", "advantage", "lam")]
    p = shipped("vapo")
    by_hand = Advantage("gae", lam=0.95, lambda_critic=1.0, length_alpha=1.0)  # the default, but written down
    q = p.model_copy(update={"nodes": [by_hand if n.kind == "advantage" else n for n in p.nodes]})
    assert list(warnings_of(q)) == [("RF018", "advantage", "lam")]
    assert warnings_of(Pipeline.from_config(q.to_config())) == {}  # a config has every field: only values count
    assert warnings_of(shipped("vapo", "advantage.lambda_critic=null")) == {}  # lam is then λ_critic


def test_validate_prints_warnings_and_exits_0(capsys):
    assert main(["validate", str(REPO / "pipelines" / "grpo.py")]) == 0
    out = capsys.readouterr().out
    assert "1 warning(s)" in out and "RF016 warning" in out
