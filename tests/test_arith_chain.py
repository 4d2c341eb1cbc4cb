"""builtin:arith-chain: its rows, tokenizer, reward rule and split; the length-by-correctness
metrics of Score; and builtin:tiny-arith-chain built through the same path as tiny-arith."""

import pytest
import torch

from rlflow import arith, arith_chain, builtin
from rlflow.arith_chain import exact_match, final_answer, signed_match
from rlflow.nodes.score import length_by_correctness


def test_rows_are_written_out_sums():
    assert arith_chain.steps((12, 34, 56)) == "12+34=46;46+56=102"
    assert arith_chain.steps((99, 99, 99, 99)) == "99+99=198;198+99=297;297+99=396"
    assert arith_chain.prompt((12, 34, 56)) == "12+34+56="
    for row in arith_chain.demonstrations("train", 200):
        terms = [int(t) for t in row["prompt"].rstrip("=").split("+")]
        assert len(terms) in (3, 4) and all(10 <= t <= 99 for t in terms)
        assert row["answer"] == str(sum(terms)) and row["completion"] == arith_chain.steps(tuple(terms))
        assert exact_match(row["completion"], row) == 1.0
        assert 17 <= len(row["completion"]) <= 31


def test_problems_and_pairs_follow_the_demonstrations():
    demos = arith_chain.demonstrations("eval", 50)
    assert arith_chain.problems("eval", 50) == [{"prompt": d["prompt"], "answer": d["answer"]} for d in demos]
    for p, d in zip(arith_chain.pairs("eval", 50), demos):
        assert p["chosen"] == d["completion"] and exact_match(p["chosen"], p) == 1.0
        assert exact_match(p["rejected"], p) == 0.0
        assert p["rejected"].rpartition("=")[0] == p["chosen"].rpartition("=")[0]  # only the last result differs
    assert arith_chain.pairs("eval", 50) == arith_chain.pairs("eval", 50)


def test_held_out_split_is_fixed_disjoint_and_seed_independent():
    ev = arith_chain.problems("eval")
    assert len(ev) == arith_chain.EVAL_SIZE == 500 and len({r["prompt"] for r in ev}) == 500
    assert arith_chain.problems("eval", seed=7) == ev
    assert ev[:2] == [{"prompt": "69+43+64+28=", "answer": "204"}, {"prompt": "49+15+29+83=", "answer": "176"}]
    train = arith_chain.problems("train")
    assert len(train) == arith_chain.TRAIN_SIZE and len({r["prompt"] for r in train}) == len(train)
    assert not {r["prompt"] for r in ev} & {r["prompt"] for r in train}
    shuffled = arith_chain.problems("train", seed=1)
    assert shuffled != train and sorted(shuffled, key=str) == sorted(train, key=str)
    with pytest.raises(ValueError, match="unknown split"):
        arith_chain.problems("test")


@pytest.mark.parametrize("response, reward", [
    ("12+34=46;46+56=102", 1.0),       # right
    (" 12+34=46;46+56=102 ", 1.0),     # surrounding space is stripped
    ("12+34=47;47+56=102", 1.0),       # a wrong step, the right final number: outcome only
    ("=102", 1.0),                     # no steps at all, still the final number after '='
    ("12+34=46;46+56=103", 0.0),       # wrong final
    ("12+34=46;46+56=", 0.0),          # nothing after the last '='
    ("102", 0.0),                      # malformed: no '='
    ("", 0.0),
    ("12+34=46;46+56=102;", 0.0),      # extra text after the final number
    ("12+34=46;46+56=102+1", 0.0),
    ("12+34=46;46+56=0102", 0.0),      # a leading zero is not the answer's text
    ("12+34=46;46+56=102;102+0=102", 1.0),  # an extra step that ends on the sum
])
def test_reward_rule_on_hand_written_cases(response, reward):
    row = {"prompt": "12+34+56=", "answer": "102"}
    assert exact_match(response, row) == reward
    assert signed_match(response, row) == 2 * reward - 1


def test_final_answer():
    assert final_answer("1+2=3;3+4=7") == "7" and final_answer("7") is None and final_answer("1=") == ""


def test_tokenizer_adds_the_separator_and_round_trips():
    tok = arith_chain.make_tokenizer()
    assert len(tok) == 17 and tok.convert_tokens_to_ids(";") == 16
    text = "12+34+56=12+34=46;46+56=102"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    # the arith tokenizer's ids are unchanged (its cache key and weights with them)
    assert arith.make_tokenizer().get_vocab() == {k: v for k, v in tok.get_vocab().items() if k != ";"}


def test_the_chain_models_have_their_own_cache_keys():
    names = builtin.known_models()
    assert {"builtin:tiny-arith-chain", "builtin:tiny-arith-chain-init"} <= set(names)
    assert builtin.data_provider("builtin:arith-chain").rule is exact_match
    dirs = {builtin.model_dir(n).name for n in names}
    assert len(dirs) == len(names)


def test_length_by_correctness_on_a_hand_built_batch():
    lengths = torch.tensor([20, 31, 17, 40, 25])
    scores = torch.tensor([1.0, 0.0, 1.0, -1.0, 0.5])  # 0.5 is not > 0.5: incorrect
    m = length_by_correctness(lengths, scores)
    assert m["response_length/correct/mean"].sums == (37.0, 2.0) and m["response_length/correct/mean"] == 18.5
    assert m["response_length/incorrect/mean"].sums == (96.0, 3.0) and m["response_length/incorrect/mean"] == 32.0
    # a side without rows is absent, so rounds and ranks add up the rows they have: (37 + 96) / 5
    only = length_by_correctness(lengths[:1], scores[:1])
    assert list(only) == ["response_length/correct/mean"]
    assert (m["response_length/correct/mean"] + m["response_length/incorrect/mean"]) == pytest.approx(26.6)


def test_tiny_arith_chain_builds_through_the_sft_path(tmp_path, monkeypatch):
    from rlflow.engine import train_pipeline
    from rlflow.loader import apply_overrides

    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path / "cache"))
    recipe = arith_chain.sft_pipeline()
    short = apply_overrides(recipe, ["pipeline.steps=3", "data.batch_size=8", "pipeline.eval=null"])
    monkeypatch.setattr(arith_chain, "sft_pipeline", lambda: short)
    says = []
    path = builtin.ensure_builtin("builtin:tiny-arith-chain", train=train_pipeline, on_build=says.append)
    assert path.name.startswith(f"tiny-arith-chain-v3-sft{arith_chain.SFT_STEPS}-") and builtin.check_cached(path) is None
    assert "building builtin:tiny-arith-chain (first use)" in says[0] and "builtin:tiny-arith-chain-init" in says[0]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(";") == 16


def test_a_shipped_pipeline_moves_to_the_chain_task_by_overrides():
    import json
    from pathlib import Path

    from rlflow.arith_chain import MAX_NEW_TOKENS, overrides_from_arith
    from rlflow.loader import apply_overrides, load_pipeline

    root = Path(__file__).parent.parent / "pipelines"
    for name, budget in (("grpo", MAX_NEW_TOKENS), ("dapo", MAX_NEW_TOKENS + 2)):  # dapo keeps its overlong buffer
        p = load_pipeline(root / f"{name}.py")
        moved = apply_overrides(p, overrides_from_arith(p))
        text = json.dumps(moved.to_config())
        assert "rlflow.arith:" not in text and '"builtin:arith"' not in text and '"builtin:tiny-arith"' not in text
        assert moved.data.source == "builtin:arith-chain" and moved.node("generate").max_new_tokens == budget
        assert {m.path for m in moved.models.values()} == {"builtin:tiny-arith-chain"}
        assert [r.fn.__module__ for r in moved.node("score").rules.values()] == ["rlflow.arith_chain"]
        assert json.dumps(p.to_config()) != text  # the shipped file itself is unchanged
    sft = load_pipeline(root / "sft.py")
    moved = apply_overrides(sft, overrides_from_arith(sft))
    assert moved.eval.rule is exact_match and moved.eval.max_new_tokens == MAX_NEW_TOKENS
