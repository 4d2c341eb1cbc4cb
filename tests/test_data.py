"""Data sources: jsonl, a saved `datasets` dataset (when installed), built-in splits."""

import json

import pytest
import torch

from rlflow.batch import Batch
from rlflow.builtin import ensure_builtin
from rlflow.data import DataError, DataStream, load_rows
from rlflow.models import load_tokenizer
from rlflow.spec import Demonstrations, Pairs, Prompts


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ensure_builtin("tiny-arith-init")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_prompts_batches_and_epochs(tmp_path, tok):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(10, 15)])
    s = DataStream(Prompts(src, batch_size=3), tok, seed=0)
    b1, b2 = s.next(), s.next()
    assert len(b1) == 3 and b1["prompt_ids"].shape == (3, 5)
    assert b2["group"].tolist() == [3, 4, 5]  # group ids keep counting across batches
    assert s.epoch == 1  # 6 rows drawn from 5: the second epoch started
    assert sorted(b1["answer"] + b2["answer"][:2]) == sorted(str(a + 1) for a in range(10, 15))


def test_stream_is_seeded_and_restores_its_position(tmp_path, tok):
    a = DataStream(Prompts("builtin:arith", batch_size=4), tok, seed=1)
    a.next()
    state = a.state()
    want = a.next()["prompt"]
    b = DataStream(Prompts("builtin:arith", batch_size=4), tok, seed=1)
    b.load_state(state)
    assert b.next()["prompt"] == want


def test_ranks_share_the_global_batch(tok):
    # batch_size is global: the ranks' shares, in rank order, are the one-process batch, row for
    # row and tensor for tensor (prompts padded to the global batch's width), groups included
    one = DataStream(Prompts("builtin:arith", batch_size=5), tok, seed=0)
    ranks = [DataStream(Prompts("builtin:arith", batch_size=5), tok, seed=0, rank=r, world=2) for r in (0, 1)]
    for _ in range(2):
        whole, shares = one.next(), [s.next() for s in ranks]
        assert [len(s) for s in shares] == [2, 3]  # whole prompts, sizes differing by at most one
        joined = Batch.cat(shares)
        assert joined["prompt"] == whole["prompt"]
        for k in ("prompt_ids", "prompt_mask", "group"):
            assert torch.equal(joined[k], whole[k]), k


def test_more_processes_than_prompts_is_refused(tok):
    with pytest.raises(DataError, match="batch_size is 2 but there are 3 processes"):
        DataStream(Prompts("builtin:arith", batch_size=2), tok, seed=0, rank=0, world=3)


def test_demonstrations_append_eos(tok):
    b = DataStream(Demonstrations("builtin:arith", batch_size=2), tok, seed=0).next()
    for i in range(2):
        n = int(b["response_mask"][i].sum())
        assert b["response_ids"][i, n - 1] == tok.eos_token_id
        assert tok.decode(b["response_ids"][i, : n - 1]) == b["answer"][i]


def test_pairs_are_two_rows_sharing_a_group(tok):
    b = DataStream(Pairs("builtin:arith", batch_size=3), tok, seed=0).next()
    assert len(b) == 6 and b["chosen"].tolist() == [1.0, 0.0] * 3
    assert b["group"].tolist() == [0, 0, 1, 1, 2, 2]
    assert all(b["response"][2 * i] != b["response"][2 * i + 1] for i in range(3))


def test_missing_field_names_the_row(tmp_path, tok):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1="}, {"question": "2+2="}])
    with pytest.raises(DataError, match="row 1 has no field 'prompt'"):
        DataStream(Prompts(src), tok, seed=0)


def test_bad_json_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "1+1="}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        load_rows(Prompts(str(p)))


def test_builtin_eval_split_is_held_out():
    train = {r["prompt"] for r in load_rows(Prompts("builtin:arith"), "train")}
    held = {r["prompt"] for r in load_rows(Prompts("builtin:arith"), "eval")}
    assert len(held) == 500 and not train & held


def test_saved_datasets_dataset(tmp_path, tok):
    datasets = pytest.importorskip("datasets")  # optional dependency
    datasets.Dataset.from_list([{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 20)]).save_to_disk(str(tmp_path / "ds"))
    b = DataStream(Prompts(str(tmp_path / "ds"), batch_size=4), tok, seed=0).next()
    assert len(b) == 4 and all(p.endswith("=") for p in b["prompt"])
    assert isinstance(b["prompt_ids"], torch.Tensor)
