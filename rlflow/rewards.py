"""Ready reward rules for maths: answer extraction, exact and symbolic equivalence, format.

Each rule is ``fn(response_text, row) -> float`` as :class:`rlflow.Score` calls it, a
module-level function (so config.json names it and rule workers import it), and needs
nothing but the standard library except :func:`math_equivalent`, which uses
`math-verify <https://github.com/huggingface/Math-Verify>`_ (``pip install 'rlflow[math]'``)::

    Score(rules={"correct": math_exact, "format": (boxed_format, 0.1)})

The reference answer is read from ``row["answer"]`` the same way as the response's: a GSM8K
solution ending in ``#### 72`` gives ``72``, a MATH solution its last ``\\boxed{}``.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Optional

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.|$)", re.IGNORECASE | re.MULTILINE)


def boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) of ``text``, braces balanced; None without one."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def last_number(text: str) -> Optional[str]:
    """The last number written in ``text`` (``1,234.5``, ``-3``, ``3/4``), commas dropped; None without one."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a solution: the last ``\\boxed{}``, else what follows ``####``
    (GSM8K), else "the answer is X", else the last number."""
    if text is None:
        return None
    b = boxed(text)
    if b is not None:
        return b
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().rstrip(".") or None
    m = _ANSWER_IS.findall(text)
    if m:
        return m[-1].strip()
    return last_number(text)


def normalize(answer: str) -> str:
    """An answer with the wrapping that does not change it removed: spaces, ``$``, a trailing
    period, ``\\text{...}``, ``\\left``/``\\right``, thousands separators in a number."""
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", answer)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("$", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", s) else s


def _number(s: str) -> Optional[Fraction]:
    """``s`` as an exact number (``12``, ``-0.5``, ``3/4``, ``\\frac{3}{4}``), None if it is not one."""
    s = re.sub(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: Optional[str], reference: Optional[str]) -> bool:
    """Equal after :func:`normalize`, or equal as numbers (``72`` = ``72.0`` = ``144/2``)."""
    if predicted is None or reference is None:
        return False
    a, b = normalize(predicted), normalize(reference)
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and y is not None and x == y


def math_exact(response: str, row: dict) -> float:
    """1.0 when the response's final answer (:func:`extract_answer`) equals the reference's
    as text or as a number, else 0.0."""
    return float(same_answer(extract_answer(response), extract_answer(str(row.get("answer", "")))))


def math_equivalent(response: str, row: dict) -> float:
    """1.0 when the response's answer is mathematically equivalent to the reference's
    (math-verify: ``1/2`` = ``0.5`` = ``\\frac{1}{2}``, sets, intervals, expressions), else 0.0.

    Departure: the reference is first reduced to its final answer (:func:`extract_answer`,
    wrapped in ``\\boxed{}``), so a whole GSM8K or MATH solution can be the row's answer.
    """
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("rlflow.rewards.math_equivalent needs math-verify: pip install 'rlflow[math]'") from e
    main = threading.current_thread() is threading.main_thread()  # math-verify's time limits use signals
    limit = {"parsing_timeout": 5 if main else None}
    reference = extract_answer(str(row.get("answer", "")))
    if reference is None:
        return 0.0
    gold = parse("\\boxed{" + reference + "}", **limit)
    answer = extract_answer(response)
    pred = parse("\\boxed{" + answer + "}", **limit) if answer is not None else []
    return float(bool(gold and pred and verify(gold, pred, timeout_seconds=5 if main else None)))


def boxed_format(response: str, row: dict) -> float:
    """1.0 when the response ends its reasoning with exactly one non-empty ``\\boxed{...}``, else 0.0."""
    b = boxed(response)
    return float(b is not None and b != "" and response.count("\\boxed{") == 1)
