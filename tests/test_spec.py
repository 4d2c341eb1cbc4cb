"""The spec layer agrees with the maths: every variant spec's fields are its function's
keyword arguments, with the same defaults (one list of names, one set of defaults)."""

import inspect

import pytest

from rlflow.nodes.advantage import ADVANTAGES
from rlflow.nodes.loss import LOSSES
from rlflow.registry import UnknownName
from rlflow.spec import ADVANTAGE_VARIANTS, LOSS_VARIANTS, Advantage, Generate, Loss, Model, Score


def kwargs_of(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def test_advantage_registries_agree():
    assert ADVANTAGE_VARIANTS.names() == ADVANTAGES.names()


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_advantage_spec_fields_are_the_function_kwargs(name):
    spec = Advantage(name)
    fields = spec.model_dump(exclude={"name", "variant", "kl"})
    assert fields == kwargs_of(ADVANTAGES[name].fn)
    assert spec.group_based == ADVANTAGES[name].group_based


def test_loss_registries_agree():
    assert LOSS_VARIANTS.names() == LOSSES.names()


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_spec_params_are_the_function_kwargs(name):
    spec = Loss(name)
    params = spec.fn_params()
    fn_kwargs = kwargs_of(LOSSES[name].fn)
    assert set(params) <= set(fn_kwargs)
    assert {k: fn_kwargs[k] for k in params} == params
    assert spec.needs == LOSSES[name].needs
    # the spec declares (at least) every batch column the maths reads
    assert LOSSES[name].reads(params) <= set(spec.reads())


def test_unknown_variant_lists_known_names_and_closest():
    with pytest.raises(UnknownName, match="Did you mean 'clip_higher'") as e:
        Loss("cliphigher")
    assert "known: bradley_terry, clip, clip_higher" in str(e.value)


def test_node_names_default_to_kind_and_positional_model():
    assert Generate("policy").name == "generate" and Generate("policy").model == "policy"
    assert Loss("value", model="critic").name == "loss"


def test_model_helpers():
    m = Model("builtin:tiny-arith", train=True, lr=3e-4)
    assert m.frozen().train is False and m.frozen().path == m.path
    c = m.critic(lr=1e-3)
    assert (c.head, c.train, c.lr) == ("value", True, 1e-3)


def test_score_needs_something_to_score():
    with pytest.raises(ValueError, match="needs a rule"):
        Score()


def test_rule_round_trips_through_its_name():
    s = Score(rule="rlflow.arith:exact_match")
    from rlflow.arith import exact_match

    assert s.rules["exact_match"].fn is exact_match
    dumped = s.model_dump(mode="json")
    assert dumped["rules"]["exact_match"]["fn"] == "rlflow.arith:exact_match"
    assert Score(rules=dumped["rules"]).rules["exact_match"].fn is exact_match
