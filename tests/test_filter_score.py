"""Filter keep rules and Score shaping against hand-computed values (ALGORITHMS.md §7, §9.2)."""

import math

import pytest
import torch

from rlflow.batch import Batch
from rlflow.nodes.filter import best_worst, dynamic_keep, first_groups, group_spread
from rlflow.nodes.score import RewardRuleError, apply_rule, overlong_penalty


def test_group_spread_is_population_std_per_group():
    # group 0: {1, -1} -> mean 0, population std 1; group 1: {1, 1, 1} -> 0; group 7: {0, 1, 1, 1}
    # -> mean 0.75, E[x²] = 0.75, var = 0.75 - 0.5625 = 0.1875, std = 0.4330127
    metric = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 1, 1, 1, 7, 7, 7, 7])
    s = group_spread(metric, group)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0] + [math.sqrt(0.1875)] * 4, dtype=torch.float64))


def test_all_equal_floats_give_exactly_zero_spread():
    metric = torch.full((4,), 0.1) * 3  # 0.30000001 everywhere: no rounding noise survives the shift
    assert group_spread(metric, torch.zeros(4, dtype=torch.long)).max() == 0.0


def test_dynamic_keep_drops_zero_variance_groups_and_respects_tolerance():
    metric = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5 + 1e-9], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    assert dynamic_keep(metric, group, 1e-6).tolist() == [False, False, True, True, False, False]
    assert dynamic_keep(metric, group, 0.0).tolist() == [False, False, True, True, True, True]


def test_best_worst_pairs_and_ties():
    rewards = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 0.2, 0.9, 0.9])
    group = torch.tensor([3, 3, 3, 5, 5, 8, 8, 8])
    c, r, ties = best_worst(rewards, group, drop_ties=True)
    # group 3: best row 1 (1.0), worst row 0 (0.0); group 5 ties (1.0, 1.0) -> dropped;
    # group 8: best row 6 (first 0.9), worst row 5 (0.2)
    assert c.tolist() == [1, 6] and r.tolist() == [0, 5] and ties == 1
    # ties broken (TRL): group 5's first row chosen, its second rejected; the others unchanged
    c, r, ties = best_worst(rewards, group)
    assert c.tolist() == [1, 3, 6] and r.tolist() == [0, 4, 5] and ties == 1


def test_pairs_two_samples_the_rule_picks_one_and_a_tie_is_broken_or_dropped():
    from rlflow.nodes.filter import pairs

    # n = 2 (the paper): group 0 prefers its second sample; group 1 ties (both wrong)
    cols = {"rewards": torch.tensor([0.0, 1.0, 0.0, 0.0]), "group": torch.tensor([0, 0, 1, 1])}
    kept = pairs(cols)
    assert kept.keep.tolist() == [1, 0, 2, 3] and kept.columns["chosen"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert kept.metrics == {"filter/pairs": 2.0, "filter/ties_broken": 1.0}
    kept = pairs(cols, ties="drop")
    assert kept.keep.tolist() == [1, 0] and kept.metrics == {"filter/pairs": 1.0, "filter/ties_dropped": 1.0}


def test_correct_keeps_the_rows_above_the_threshold():
    from rlflow.nodes.filter import correct

    kept = correct({"rewards": torch.tensor([1.0, 0.0, 0.5, 0.51, -1.0])})
    assert kept.keep.tolist() == [True, False, False, True, False]  # > 0.5, strictly
    assert kept.metrics["filter/keep_frac"] == pytest.approx(0.4)
    kept = correct({"acc": torch.tensor([1.0, -1.0])}, metric="acc", threshold=0.0)  # a ±1 rule
    assert kept.keep.tolist() == [True, False]


def test_first_groups_truncates_to_whole_groups():
    b = Batch({"group": torch.tensor([4, 4, 9, 9, 2, 2]), "x": torch.arange(6)})
    assert first_groups(b, 2)["x"].tolist() == [0, 1, 2, 3]


def test_overlong_penalty_matches_dapo():
    # L_max = 20, L_cache = 4: no penalty up to 16, then (16 - |y|)/4, -1 at the max.
    lengths = torch.tensor([10, 16, 17, 18, 20])
    pen = overlong_penalty(lengths, max_len=20, buffer=4, factor=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, 0.5), 0.5 * pen)


def test_apply_rule_passes_the_row_and_weights_nothing_itself():
    seen = []

    def rule(resp, row):
        seen.append((resp, row["answer"]))
        return 1.0 if resp == row["answer"] else 0.0

    out = apply_rule("r", rule, ["12", "13"], [{"answer": "12"}, {"answer": "12"}])
    assert out.tolist() == [1.0, 0.0] and seen == [("12", "12"), ("13", "12")]


def test_apply_rule_accepts_bools_and_ints():
    assert apply_rule("b", lambda r, row: r == "x", ["x", "y"], [{}, {}]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("value", [float("inf"), None, "1"])
def test_apply_rule_refuses_non_numbers(value):
    with pytest.raises(RewardRuleError, match="not a finite number"):
        apply_rule("v", lambda r, row: value, ["a"], [{"answer": "b"}])
