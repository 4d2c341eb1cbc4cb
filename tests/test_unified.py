"""The unified view (DeepSeekMath §5.2.1): data source · reward function · gradient coefficient,
read off each pipeline's nodes, never written per pipeline; `rlflow compare` opens with it."""

from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from rlflow import Generate, Loss, loss_variant
from rlflow.cli import main
from rlflow.graph import resolve
from rlflow.loader import apply_overrides, load_pipeline
from rlflow.spec import ADVANTAGES, FILTERS, KL_GRADIENT, LOSSES, Demonstrations, KlEstimator, Pairs, Prompts
from rlflow.unified import not_in_effect, unified_view

REPO = Path(__file__).parent.parent
PIPES = sorted(p for p in (REPO / "pipelines").glob("*.py") if p.name != "__init__.py")


def view(name, *sets):
    return unified_view(resolve(apply_overrides(load_pipeline(REPO / "pipelines" / f"{name}.py"), list(sets))))


def test_every_variant_data_source_and_estimator_declares_its_part():
    for kind in (ADVANTAGES, LOSSES, FILTERS):
        for v in kind.variants():
            assert v.gradient_coefficient().strip(), (kind.kind, v.name)
    for cls in (Prompts, Demonstrations, Pairs):
        assert cls.data_source
    assert Generate.data_source != Generate.data_source_frozen
    from typing import get_args
    assert set(KL_GRADIENT) == set(get_args(KlEstimator))


@pytest.mark.parametrize("path", PIPES, ids=[p.stem for p in PIPES])
def test_every_shipped_pipeline_has_a_unified_view(path):
    v = unified_view(resolve(load_pipeline(path)))
    assert v.data_source and v.reward_function and v.gradient_coefficient and v.kl


def test_the_views_of_known_methods():
    assert view("sft").data_source == "human demonstrations" and view("sft").gradient_coefficient == "1"
    rft, online = view("rft"), view("online_rft")
    assert rft.data_source == "prompts; samples of a frozen model ('sampler'), n=8"
    assert online.data_source == "prompts; samples of the current policy, n=8"
    assert rft.gradient_coefficient == online.gradient_coefficient == "1[rewards > 0.5]"  # RFT's I(o correct)
    grpo = view("grpo")
    assert grpo.gradient_coefficient.startswith("A·ρ, 0 where the clip binds")
    assert "β·(π_ref/π_θ - 1)" in grpo.gradient_coefficient  # DeepSeekMath's GRPO coefficient, from k3
    assert grpo.gradient_coefficient.endswith("A = (R - mean_g R) / (std_g R + ε)")
    assert view("ppo").reward_function == "exact_match - β·k1(π_old, π_ref) per token"
    assert view("rloo").reward_function == "exact_match - β·k1(π_old, π_ref) summed per sequence"
    assert view("dpo").data_source == "preference pairs (offline)" and view("dpo").reward_function == "preference labels"
    assert view("online_dpo").gradient_coefficient.startswith("1[o is its group's best or worst] · (±β·σ(-βh)")
    assert view("vapo").gradient_coefficient.count("0.1·(1[R > 0])") == 1  # the NTP term, weighted by its coef


def test_grpo_and_gspo_differ_in_the_gradient_coefficient_only():
    a, b = view("grpo"), view("gspo")
    assert (a.data_source, a.reward_function, a.kl) == (b.data_source, b.reward_function, b.kl)
    assert a.gradient_coefficient != b.gradient_coefficient and "s_i" in b.gradient_coefficient


def test_the_kl_shown_is_the_kl_in_effect():
    assert view("ppo").kl == "in the reward: k1(π_old, π_ref), β=0.01"  # the loss's default k3 is off
    assert view("grpo").kl == "in the loss: k3(π_θ, π_ref), β=0.04"
    assert view("grpo", "loss.kl_coef=0", "loss.kl=k2").kl == "—"
    assert view("grpo", "loss.kl_target=0.5").kl == "in the loss: k3(π_θ, π_ref), β=0.04, adaptive to KL 0.5 (horizon 10000)"
    ppo = load_pipeline(REPO / "pipelines" / "ppo.py")
    assert not_in_effect(ppo, "nodes.loss.kl") == "off: kl_coef=0"
    assert not_in_effect(ppo, "nodes.advantage.kl") is None
    assert not_in_effect(ppo, "nodes.advantage.kl_horizon") == "off: no kl_target"


def test_a_variant_declared_in_a_test_brings_its_coefficient(tmp_path):
    @loss_variant(needs="logprobs", reads={"advantages": "token"}, coefficient=lambda s: f"{s.scale:g}·A")
    def scaled_pg_unified_test(cols, counts, *, scale: Annotated[float, Field(gt=0)] = 2.0):
        """-scale · A · lp (a test variant)."""

    try:
        p = load_pipeline(REPO / "pipelines" / "opo.py")
        q = p.model_copy(update={"nodes": [*p.nodes[:-1], Loss("scaled_pg_unified_test", scale=3.0)]})
        assert unified_view(q).gradient_coefficient.startswith("3·A; A = R - Σ_g |o|·R")
    finally:
        LOSSES.registry._items.pop("scaled_pg_unified_test")


def test_compare_opens_with_the_unified_view_and_marks_an_inert_kl(capsys):
    assert main(["compare", str(REPO / "pipelines" / "ppo.py"), str(REPO / "pipelines" / "reinforce_pp_baseline.py")]) == 0
    out = capsys.readouterr().out
    assert out.index("unified view") < out.index("what differs")
    for label in ("data source D", "reward function", "gradient coefficient GC", "KL penalty"):
        assert label in out.split("what differs")[0]
    assert "k3 (off: kl_coef=0)" in out  # ppo's loss: never shown as if k3 acted


def test_compare_of_grpo_and_gspo_is_the_loss_node_and_the_schedule(capsys):
    assert main(["compare", str(REPO / "pipelines" / "grpo.py"), str(REPO / "pipelines" / "gspo.py")]) == 0
    out = capsys.readouterr().out.split("what differs")[1]
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert rows and all(r.startswith("nodes.loss.") or r == "mini_batches" for r in rows), rows
