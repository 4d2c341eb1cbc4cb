"""Prompts as the model reads them: chat messages through the tokenizer's chat template
(a tokenizer built here, with its own template), plain text as it is; and rows from the
``datasets`` library — files, a saved dataset, a Hugging Face name that is not cached."""

import json
import shutil

import pytest

from rlflow import Advantage, Eval, Generate, Loss, Model, Pipeline, Prompts, Score
from rlflow.arith import exact_match, make_tokenizer
from rlflow.data import DataError, DataStream, load_rows, make_batch, prompt_text
from rlflow.engine import Run
from rlflow.graph import build
from rlflow.inputs import check_inputs, is_dataset_name

# a small ChatML-like template: each message in role tags, then the opened assistant turn
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "add"}, {"role": "user", "content": "12+34="}]


@pytest.fixture
def tok():
    t = make_tokenizer()
    t.chat_template = TEMPLATE
    return t


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_messages_are_rendered_with_the_chat_template(tok):
    spec = Prompts("rows.jsonl", messages_field="messages")
    b = make_batch(spec, [{"messages": CHAT, "answer": "46"}], tok)
    text = "<system>add</system><user>12+34=</user><assistant>"  # the assistant turn opened
    assert b["prompt"] == [text]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b["prompt_ids"][0, -len(ids):].tolist() == ids and b["answer"] == ["46"]


def test_a_prompt_that_is_a_list_of_messages_is_rendered_and_plain_text_is_not(tok):
    spec = Prompts("rows.jsonl")
    assert prompt_text(spec, {"prompt": CHAT}, tok) == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt_text(spec, {"prompt": "12+34="}, tok) == "12+34="
    b = make_batch(spec, [{"prompt": "12+34=", "answer": "46"}], tok)
    assert b["prompt"] == ["12+34="] and b["prompt_ids"][0].tolist() == tok("12+34=")["input_ids"]


def test_chat_prompts_need_a_template():
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        prompt_text(Prompts("rows.jsonl", messages_field="messages"), {"messages": CHAT}, make_tokenizer())


@pytest.mark.parametrize("value, words", [
    ("12+34=", "is not a chat"),
    ([{"role": "user"}], "is a list but not of chat messages"),
    ([], "is not a chat"),
])
def test_bad_chats_are_found_before_any_model_loads(tmp_path, value, words):
    src = jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, "answer": "1"}, {"messages": value, "answer": "2"}])
    p = Pipeline(name="t", data=Prompts(src, messages_field="messages"), models={"actor": Model("builtin:tiny-arith-init", train=True)},
                 nodes=[Generate("actor", n=2), Score(rule=exact_match), Advantage("group_norm"), Loss("clip")])
    (problem,) = check_inputs(p)
    assert problem.code == "RF114" and f"d.jsonl:2: field 'messages' {words}" in problem.line()


def test_a_run_on_chat_prompts_trains_and_evaluates_on_the_rendered_prompts(tmp_path):
    """A local model whose tokenizer carries a chat template, chat rows for training and eval."""
    from rlflow.builtin import ensure_builtin
    from rlflow.models import load_tokenizer

    model = tmp_path / "chat-model"
    shutil.copytree(ensure_builtin("tiny-arith-init"), model)
    t = load_tokenizer(str(model))
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the bare question, in the model's alphabet
    t.save_pretrained(str(model))
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}="}], "answer": str(2 * a)} for a in range(10, 18)]
    src = jsonl(tmp_path / "chat.jsonl", rows)
    actor = Model(str(model), train=True, lr=1e-3)
    p = Pipeline(name="chat", data=Prompts(src, messages_field="messages", batch_size=2, eval_source=src),
                 models={"actor": actor}, nodes=[Generate("actor", n=2, max_new_tokens=4), Score(rule=exact_match),
                                                 Advantage("group_norm"), Loss("clip")], steps=1, eval=Eval(size=4))
    run = Run(p, build(p), tmp_path / "run")
    run.setup()
    summary = run.train()
    assert "eval/accuracy" in summary["eval_after"]
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] in {r["messages"][0]["content"] for r in rows} for s in samples)


# --- the datasets library ----------------------------------------------------------------------


def test_dataset_names_are_told_from_paths(tmp_path):
    assert is_dataset_name("openai/gsm8k") and is_dataset_name("gsm8k")
    assert not is_dataset_name("data/train.jsonl") and not is_dataset_name("./gsm8k") and not is_dataset_name("a/b/c")
    assert not is_dataset_name("builtin:arith") and not is_dataset_name(str(tmp_path))


def test_a_dataset_needs_the_datasets_library(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    p = Pipeline(name="t", data=Prompts("openai/gsm8k", subset="main"), models={"actor": Model("builtin:tiny-arith-init", train=True)},
                 nodes=[Generate("actor", n=2), Score(rule=exact_match), Advantage("group_norm"), Loss("clip")])
    (problem,) = check_inputs(p)
    assert problem.code == "RF108" and "needs the datasets library: pip install 'rlflow[data]'" in problem.line()


def test_a_dataset_name_not_in_the_cache_is_a_clear_error_when_offline(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    from rlflow import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(models, "_OFFLINE", None)
    with pytest.raises(DataError) as e:
        load_rows(Prompts("someorg/not-cached", subset="main"))
    assert e.value.code == "RF108"
    assert "dataset 'someorg/not-cached' (subset 'main') is not in the local Hugging Face cache" in str(e.value)
    assert "hf download --repo-type dataset someorg/not-cached" in str(e.value)


def test_csv_and_parquet_files_with_field_mapping(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"{a}+1=", "solution": a + 1} for a in range(10, 16)]
    (tmp_path / "q.csv").write_text("question,solution\n" + "".join(f"{r['question']},{r['solution']}\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "q.parquet"))
    for src in (tmp_path / "q.csv", tmp_path / "q.parquet"):
        spec = Prompts(str(src), prompt_field="question", answer_field="solution", batch_size=3)
        b = DataStream(spec, tok, seed=0).next()
        assert set(b["prompt"]) <= {r["question"] for r in rows} and b["answer"][0] == str(int(b["prompt"][0][:2]) + 1)


def test_a_dataset_directory_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]),
                               "test": datasets.Dataset.from_list([{"prompt": "2+2=", "answer": "4"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    spec = Prompts(str(tmp_path / "dd"), eval_split="test")
    assert load_rows(spec, "train") == [{"prompt": "1+1=", "answer": "2"}]
    assert load_rows(spec, "eval") == [{"prompt": "2+2=", "answer": "4"}]
    with pytest.raises(DataError, match="no split 'validation'; it has train, test"):
        load_rows(Prompts(str(tmp_path / "dd"), split="validation"))
