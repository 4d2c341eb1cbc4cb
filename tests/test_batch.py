"""Batch: row selection, group-preserving splits, concatenation with padding."""

import pytest
import torch

from rlflow.batch import Batch, mini_batch_groups


def make(groups, width=3):
    g = torch.tensor(groups)
    n = len(groups)
    return Batch({
        "group": g,
        "rewards": torch.arange(n, dtype=torch.float32),
        "response_mask": torch.ones(n, width),
        "prompt_ids": torch.full((n, 2), 7),
        "response": [f"r{i}" for i in range(n)],
    }, meta={"pad_id": 0})


def test_len_select_and_text_columns():
    b = make([0, 0, 1, 1, 2])
    s = b.select([4, 0])
    assert len(s) == 2
    assert s["rewards"].tolist() == [4.0, 0.0]
    assert s["response"] == ["r4", "r0"]
    assert b.select(torch.tensor([True, False, False, False, True]))["response"] == ["r0", "r4"]


def test_column_length_is_checked():
    b = make([0, 1])
    with pytest.raises(ValueError, match="has 3 rows, the batch has 2"):
        b["x"] = torch.zeros(3)
    with pytest.raises(KeyError, match="no column 'nope'"):
        b["nope"]


def test_repeat_interleave_keeps_samples_of_a_prompt_together():
    b = make([5, 6]).repeat_interleave(3)
    assert b["group"].tolist() == [5, 5, 5, 6, 6, 6]
    assert b["response"] == ["r0"] * 3 + ["r1"] * 3


def test_split_never_cuts_a_group():
    b = make([0, 0, 0, 1, 1, 2, 2, 2, 2])
    chunks = b.split(4)
    # groups of sizes 3, 2, 4: [0,0,0] then [1,1] (3+2 > 4) then [2,2,2,2]
    assert [c["group"].tolist() for c in chunks] == [[0, 0, 0], [1, 1], [2, 2, 2, 2]]
    assert sum(len(c) for c in chunks) == len(b)
    # a group larger than the size is a chunk of its own
    assert [len(c) for c in b.split(2)] == [3, 2, 4]
    # rows without groups split freely
    assert [len(c) for c in b.split(100)] == [9]


def test_mini_batches_of_whole_groups():
    b = make([0, 0, 1, 1, 2, 2, 3, 3])
    parts = [b.take_groups(ids) for ids in mini_batch_groups(b.groups(), 2)]
    assert [p["group"].tolist() for p in parts] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert len(mini_batch_groups(b.groups(), 1)) == 1
    # 5 groups in 4 parts: exactly 4 mini-batches (2, 1, 1, 1 groups), so every rank steps alike
    assert [len(p) for p in mini_batch_groups(range(5), 4)] == [2, 1, 1, 1]
    assert len(mini_batch_groups(range(5), 9)) == 5


def test_take_groups_follows_the_plan_and_skips_groups_held_elsewhere():
    b = make([4, 4, 5, 6, 6])
    assert b.groups() == [4, 5, 6]
    assert b.take_groups([6, 1, 4])["group"].tolist() == [6, 6, 4, 4]  # group 1 is on another rank
    empty = b.take_groups([1, 2])
    assert len(empty) == 0 and "group" in empty  # no rows, but every column


def test_non_contiguous_groups_are_refused():
    with pytest.raises(ValueError, match="not contiguous"):
        make([0, 1, 0]).split(2)


def test_shuffled_plan_keeps_groups_whole_and_is_seeded():
    b = make([0, 0, 1, 1, 2, 2, 3, 3])
    plan1 = mini_batch_groups(b.groups(), 1, torch.Generator().manual_seed(1))
    plan2 = mini_batch_groups(b.groups(), 1, torch.Generator().manual_seed(1))
    assert plan1 == plan2 and sorted(plan1[0]) == [0, 1, 2, 3]
    a1 = b.take_groups(plan1[0])["group"].tolist()
    assert all(a1[i] == a1[i + 1] for i in range(0, 8, 2))


def test_cat_pads_token_columns_right_and_prompts_left():
    a, b = make([0], width=2), make([1], width=4)
    b["prompt_ids"] = torch.full((1, 3), 9)
    c = Batch.cat([a, b])
    assert c["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert c["prompt_ids"].tolist() == [[0, 7, 7], [9, 9, 9]]  # left-padded with pad_id
    assert c["response"] == ["r0", "r0"]
    assert c["group"].tolist() == [0, 1]


def test_cat_refuses_mismatched_columns():
    a = make([0])
    b = make([1])
    b["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="cannot concatenate"):
        Batch.cat([a, b])
