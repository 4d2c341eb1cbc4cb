"""The built-in task and the untrained tiny model: tokenizer, model, data, reward."""

from __future__ import annotations

import pytest
import torch

from rlflow import arith


@pytest.fixture(scope="module")
def tokenizer():
    return arith.make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return arith.make_model(tokenizer, seed=0).eval()


# --- tokenizer -------------------------------------------------------------------------


def test_tokenizer_is_one_token_per_character(tokenizer):
    ids = tokenizer("37+45=")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["3", "7", "+", "4", "5", "="]
    # 12 characters + pad, eos, bos, unk; no special token is added around a text.
    assert len(tokenizer) == 16
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert None not in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)


def test_decode_skips_specials_and_joins_without_spaces(tokenizer):
    ids = [tokenizer.pad_token_id] + tokenizer("82")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "82"
    assert tokenizer.decode(tokenizer("12+34=46")["input_ids"]) == "12+34=46"


def test_tokenizer_pads_on_the_left(tokenizer):
    batch = tokenizer(["1+2=", "37+45="], padding=True)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"][0][:2] == [pad, pad]
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_tokenizer_round_trips_through_auto_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    for text in ["37+45=", "99+99=198", "10+10="]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    assert loaded.padding_side == "left"
    assert loaded.decode(loaded("82")["input_ids"] + [loaded.eos_token_id], skip_special_tokens=True) == "82"


# --- model -----------------------------------------------------------------------------


def test_model_is_small_and_matches_the_tokenizer(tokenizer, model):
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 5_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id


def test_model_init_depends_only_on_seed(tokenizer, model):
    before = torch.random.get_rng_state()
    same, other = (arith.make_model(tokenizer, seed=s) for s in (0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), same.parameters()))
    assert not all(torch.equal(x, z) for x, z in zip(model.parameters(), other.parameters()))


def test_model_round_trips_through_auto_model(tokenizer, model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("37+45=")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


# --- data ------------------------------------------------------------------------------


def _key(row: dict) -> str:
    return row["prompt"]


def test_eval_split_is_fixed_held_out_and_seed_independent():
    ev = arith.problems("eval")
    assert len(ev) == 500 and len({_key(r) for r in ev}) == 500
    assert arith.problems("eval", seed=7) == ev
    assert arith.problems("eval", 20) == ev[:20]


def test_train_is_the_rest_and_shuffled_by_seed():
    ev = {_key(r) for r in arith.problems("eval")}
    train0 = arith.problems("train", seed=0)
    train1 = arith.problems("train", seed=1)
    assert len(train0) == 8100 - 500
    assert ev.isdisjoint(_key(r) for r in train0)
    assert {_key(r) for r in train0} | ev == {f"{a}+{b}=" for a in range(10, 100) for b in range(10, 100)}
    assert arith.problems("train", seed=0) == train0  # deterministic
    assert train1 != train0 and sorted(map(_key, train1)) == sorted(map(_key, train0))
    assert arith.problems("train", 5, seed=1) == train1[:5]


def test_rows_have_prompt_and_correct_answer():
    for row in arith.problems("train", 200, seed=2) + arith.problems("eval", 200):
        a, b = row["prompt"].removesuffix("=").split("+")
        assert len(row["prompt"]) == 6 and 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert row["answer"] == str(int(a) + int(b))


def test_bad_split_or_n_raises():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        arith.problems("test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside 0..500"):
        arith.problems("eval", 501)


def test_exact_match():
    row = {"prompt": "37+45=", "answer": "82"}
    assert arith.exact_match("82", row) == 1.0
    assert arith.exact_match(" 82\n", row) == 1.0  # surrounding whitespace is stripped
    assert arith.exact_match("83", row) == 0.0
    assert arith.exact_match("820", row) == 0.0
    assert arith.exact_match("8 2", row) == 0.0
    assert arith.exact_match("", row) == 0.0


def test_pairs_reject_a_plausible_wrong_sum():
    rows = arith.pairs("train", seed=0) + arith.pairs("eval")
    assert len(rows) == 8100
    for row in rows:
        assert set(row) == {"prompt", "answer", "chosen", "rejected"}
        a, b = map(int, row["prompt"].removesuffix("=").split("+"))
        assert row["chosen"] == row["answer"] == str(a + b)
        assert row["rejected"] != row["chosen"]
        # off by one, a carry dropped or added, or the hundreds dropped
        assert int(row["rejected"]) - (a + b) in {-100, -10, -1, 1, 10}
    kinds = {int(r["rejected"]) - int(r["chosen"]) for r in rows}
    assert kinds == {-100, -10, -1, 1, 10}


def test_pairs_are_deterministic_and_follow_problems():
    assert arith.pairs("eval", 50, seed=4) == arith.pairs("eval", 50, seed=4)
    assert [r["prompt"] for r in arith.pairs("train", 30, seed=4)] == [
        r["prompt"] for r in arith.problems("train", 30, seed=4)
    ]
    # a different seed picks different wrong answers for the same problems
    assert [r["rejected"] for r in arith.pairs("eval", seed=0)] != [r["rejected"] for r in arith.pairs("eval", seed=1)]


def test_demonstrations_complete_with_the_answer():
    rows = arith.demonstrations("train", 10, seed=3)
    assert [{k: r[k] for k in ("prompt", "answer")} for r in rows] == arith.problems("train", 10, seed=3)
    for row in rows:
        assert set(row) == {"prompt", "answer", "completion"}
        assert row["completion"] == row["answer"]
        assert "<eos>" not in row["completion"]  # the data loader appends EOS
