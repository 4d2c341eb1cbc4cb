"""The spec layer is read off the variant declarations: each variant's spec fields are its
function's keyword-only parameters (same names, same defaults, same bounds) on top of its
kind's base fields; the registry is the only list of names."""

import inspect

import pytest
from pydantic import ValidationError

from rlflow.registry import UnknownName
from rlflow.spec import ADVANTAGES, FILTERS, LOSSES, Advantage, Filter, Generate, Loss, Model, Score

KINDS = {"advantage": (ADVANTAGES, Advantage), "loss": (LOSSES, Loss), "filter": (FILTERS, Filter)}
ALL = [(kind, name) for kind, (reg, _) in KINDS.items() for name in reg.names()]


def kwargs_of(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}:{n}" for k, n in ALL])
def test_spec_fields_are_the_function_kwargs(kind, name):
    registry, make = KINDS[kind]
    v = registry[name]
    node = make(name)
    base = set(registry.base.model_fields)
    own = {k: val for k, val in node.model_dump().items() if k not in base}
    assert own == kwargs_of(v.fn)  # the variant's settings: its function's, with its defaults
    assert node.variant == name and node.declared is v and type(node) is v.spec


def test_bounds_come_from_the_annotations():
    with pytest.raises(ValidationError, match="greater than 0"):
        Loss("clip", eps=0)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        Advantage("gae", lam=1.5)
    with pytest.raises(ValidationError, match="finite"):
        Loss("dpo", beta=float("inf"))
    with pytest.raises(ValidationError, match="Extra inputs"):
        Loss("clip", epsilon=0.2)


def test_unknown_variant_lists_known_names_and_closest():
    with pytest.raises(UnknownName, match="Did you mean 'clip_higher'") as e:
        Loss("cliphigher")
    assert f"known: {', '.join(LOSSES.names())}." in str(e.value)  # the registry's list, sorted


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
