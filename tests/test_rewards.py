"""rlflow.rewards: answer extraction, exact and symbolic equivalence, the format reward; and the
GSM8K example that uses them (validates without its model)."""

import json
from pathlib import Path

import pytest

from rlflow.loader import load_pipeline
from rlflow.rewards import (boxed, boxed_format, extract_answer, last_number, math_equivalent, math_exact, normalize,
                            same_answer)
from rlflow.rules import RulePool

EXAMPLE = Path(__file__).parent.parent / "pipelines" / "examples"


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last one, braces balanced
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{7}", "7"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
])
def test_boxed(text, expected):
    assert boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),  # GSM8K's reference format
    ("#### 1,234", "1,234"),
    ("Thus the answer is 18.", "18"),
    ("first 12, then 3,500.25 and -4", "-4"),
    ("\\boxed{9} and later 10", "9"),  # a box wins over the last number
    ("nothing numeric", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_number_and_normalize():
    assert last_number("a -3.5 and 12,000 b") == "12000" and last_number("3/4 of it") == "3/4"
    assert normalize(" $1,234$. ") == "1234" and normalize("\\text{ cm}") == "cm" and normalize("\\left(1,2\\right)") == "(1,2)"


@pytest.mark.parametrize("pred, ref, same", [
    ("72", "72", True), ("72.0", "72", True), ("144/2", "72", True), ("\\frac{3}{4}", "0.75", True),
    ("1,000", "1000", True), ("$5$", "5", True), ("71", "72", False), (None, "72", False), ("x+1", "1+x", False),
])
def test_same_answer_is_textual_or_numeric(pred, ref, same):
    assert same_answer(pred, ref) is same


def test_math_exact_on_gsm8k_rows():
    row = {"answer": "Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72"}
    assert math_exact("48 + 24 = 72, so \\boxed{72}", row) == 1.0
    assert math_exact("I think it is 72.", row) == 1.0  # the last number, without a box
    assert math_exact("\\boxed{70}", row) == 0.0 and math_exact("", row) == 0.0


def test_boxed_format():
    assert boxed_format("so \\boxed{3}", {}) == 1.0
    assert boxed_format("3", {}) == 0.0 and boxed_format("\\boxed{}", {}) == 0.0
    assert boxed_format("\\boxed{3} or \\boxed{4}", {}) == 0.0  # one answer, not a spread bet


def test_math_equivalent_is_symbolic():
    pytest.importorskip("math_verify", reason="math-verify is not installed (pip install 'rlflow[math]')")
    assert math_equivalent("\\boxed{\\frac{1}{2}}", {"answer": "0.5"}) == 1.0
    assert math_equivalent("\\boxed{x + 1}", {"answer": "\\boxed{1+x}"}) == 1.0  # exact match would say no
    assert math_equivalent("the answer is \\boxed{3}", {"answer": "#### 4"}) == 0.0
    assert math_equivalent("no answer at all", {"answer": "#### 4"}) == 0.0


def test_math_equivalent_without_math_verify_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_math_verify(name, *a, **kw):
        if name.startswith("math_verify"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(ImportError, match=r"pip install 'rlflow\[math\]'"):
        math_equivalent("\\boxed{1}", {"answer": "1"})


def test_the_rules_run_in_reward_workers():
    """Module-level functions: the rule pool imports them by reference in its worker processes."""
    rows = [{"answer": "#### 72", "prompt": "q"}, {"answer": "#### 5", "prompt": "q"}]
    with RulePool(size=1) as pool:
        assert pool.score("correct", math_exact, ["\\boxed{72}", "\\boxed{6}"], rows, timeout_s=60) == [1.0, 0.0]
        assert pool.score("format", boxed_format, ["\\boxed{72}", "6"], rows, timeout_s=60) == [1.0, 0.0]


def test_the_gsm8k_example_validates_and_its_rows_score_with_its_rules():
    from rlflow.inputs import validate

    p = load_pipeline(EXAMPLE / "gsm8k_grpo.py")
    assert not validate(p).errors  # its model is a hub id: validate loads no model, cached or not
    assert p.models["actor"].path == "Qwen/Qwen2.5-0.5B-Instruct" and p.data.messages_field == "messages"
    for name in ("gsm8k_train.jsonl", "gsm8k_test.jsonl"):
        for line in (EXAMPLE / name).read_text().splitlines():
            row = json.loads(line)
            answer = row["answer"].rsplit("#### ", 1)[1]
            assert math_exact(f"... so \\boxed{{{answer}}}", row) == 1.0
            assert row["messages"][-1]["role"] == "user"
