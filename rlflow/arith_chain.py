"""The built-in task ``builtin:arith-chain`` and the tiny model ``builtin:tiny-arith-chain``.

A task where the response length matters: a sum of three or four two-digit terms, answered
with its written-out steps, left to right, joined by ``;``::

    prompt   "12+34+56="
    response "12+34=46;46+56=102"          (answer "102")

Responses are 17 to 31 characters (one token each) plus EOS, against 3 to 4 tokens on
``builtin:arith``; how long they are depends on the number of terms and of digits in the
partial sums. Terms are drawn from 10..99, the count (3 or 4) with equal odds. A fixed
500 problems, drawn with a fixed seed, are the held-out eval split, the same whatever the
seed; the train split is 50,000 other problems (never one of the eval ones), drawn with a
second fixed seed and shuffled by the pipeline's seed.

The reward rule is :func:`exact_match`: outcome only, the steps are not checked (see it
for exactly what counts). The model is ``builtin:tiny-arith``'s tiny Llama over the
character tokenizer of :mod:`rlflow.arith` with ``;`` added to the vocabulary, so it has
its own cache keys and never changes ``builtin:tiny-arith``'s. It is trained by the
shipped ``pipelines/examples/sft_chain.py`` with the ``SFT_*`` settings below, chosen to
stop at a moderate held-out accuracy so that RL has room to improve it.

Importing this module registers the data source ``builtin:arith-chain`` (default
evaluation rule :func:`exact_match`) and the models ``builtin:tiny-arith-chain-init`` and
``builtin:tiny-arith-chain``. It imports only the standard library and pure rlflow
modules at module level (validation must not import torch).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rlflow import arith
from rlflow.arith import Split
from rlflow.provider import Say, Train, data_provider, model_provider

if TYPE_CHECKING:
    import transformers

    from rlflow.spec import Pipeline

# Settings of pipelines/examples/sft_chain.py, the SFT run that makes builtin:tiny-arith-chain
# from make_model(seed=0): AdamW, constant lr, token-mean NLL on the steps + EOS. Measured
# with the pipeline itself and the current engine (1 CPU thread, seed 0, greedy accuracy on
# the 500 held-out problems every 50 steps): 0.4 / 0.2 / 1.2 / 2.0 / 1.2 / 4.8 / 3.0 / 4.0 %
# at steps 50..400, then a steep rise: 21.4 % at 450, 53.8 % at 500, 88 % at 700. The rise's
# timing moves with how float operations are ordered: with the engine before the packed
# forwards and fused AdamW it came ~300 steps later (19.4 % at 750, 69 % at 800), so a code
# change that reorders floats can move the built model out of the 15-40 % it aims at.
SFT_LR = 1e-3
SFT_BATCH = 64
SFT_STEPS = 450
SFT_WARMUP = 0
# The longest correct response is 31 characters + EOS ("99+99=198;198+99=297;297+99=396");
# 40 leaves a response room to grow past the correct length before it is truncated.
MAX_NEW_TOKENS = 40

TERMS = (3, 4)
OPERANDS = arith.OPERANDS
EVAL_SIZE = 500
TRAIN_SIZE = 50_000
_EVAL_SEED = 20250601  # fixed forever: changing either seed changes the splits
_TRAIN_SEED = 20250602

CHARS = arith.CHARS + ";"
SHAPE = arith.SHAPE  # max_position_embeddings 64 > 12 prompt + 40 response tokens
INIT_SEED = 0
_INIT_REVISION = 1


# --- data ------------------------------------------------------------------------------


def steps(terms: tuple[int, ...]) -> str:
    """The written-out sum of ``terms`` left to right: ``(12, 34, 56)`` -> ``"12+34=46;46+56=102"``."""
    total, parts = terms[0], []
    for t in terms[1:]:
        parts.append(f"{total}+{t}={total + t}")
        total += t
    return ";".join(parts)


def prompt(terms: tuple[int, ...]) -> str:
    """``(12, 34, 56)`` -> ``"12+34+56="``."""
    return "+".join(map(str, terms)) + "="


def _draw(rng: random.Random) -> tuple[int, ...]:
    count = rng.choice(TERMS)
    return tuple(rng.choice(OPERANDS) for _ in range(count))


def _distinct(rng: random.Random, size: int, taken: set) -> list[tuple[int, ...]]:
    """``size`` problems drawn with ``rng``, none in ``taken`` nor repeated (``taken`` grows)."""
    out = []
    while len(out) < size:
        terms = _draw(rng)
        if terms not in taken:
            taken.add(terms)
            out.append(terms)
    return out


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[tuple[int, ...], ...]]:
    """The eval problems in their fixed order, and the train problems in canonical order."""
    taken: set = set()
    held_out = _distinct(random.Random(_EVAL_SEED), EVAL_SIZE, taken)
    rest = _distinct(random.Random(_TRAIN_SEED), TRAIN_SIZE, taken)
    return {"eval": tuple(held_out), "train": tuple(rest)}


def _terms(split: Split, n: int | None, seed: int) -> list[tuple[int, ...]]:
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; known: 'eval', 'train'")
    return arith.take(list(_splits()[split]), split, n, seed)


def problems(split: Split, n: int | None = None, *, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt": "12+34+56=", "answer": "102"}`` of ``split``.

    ``"eval"`` is a fixed held-out set of 500 problems in a fixed order; ``seed`` does not
    change it. ``"train"`` is 50,000 others, shuffled by ``seed``. ``n`` takes the first
    ``n`` rows (``None``: all of them).
    """
    return [{"prompt": prompt(t), "answer": str(sum(t))} for t in _terms(split, n, seed)]


def demonstrations(split: Split, n: int | None = None, *, seed: int = 0) -> list[dict]:
    """SFT rows ``{"prompt", "answer", "completion"}``; the completion is the written-out sum
    (:func:`steps`). The EOS token is appended by the data loader, not here."""
    return [{"prompt": prompt(t), "answer": str(sum(t)), "completion": steps(t)} for t in _terms(split, n, seed)]


def pairs(split: Split, n: int | None = None, *, seed: int = 0) -> list[dict]:
    """Preference rows ``{"prompt", "answer", "chosen", "rejected"}``: ``chosen`` is the
    written-out sum; ``rejected`` the same steps with a plausible slip in the last result
    (:func:`rlflow.arith.wrong_sum`), so its final answer is wrong. Each problem's
    ``rejected`` depends only on the problem and ``seed``."""
    rows = []
    for t in _terms(split, n, seed):
        rng = random.Random(f"{seed}:{prompt(t)}")  # str seeds hash with sha512: stable across runs
        good = steps(t)
        last = sum(t[:-1])
        bad = good[: good.rindex("=") + 1] + arith.wrong_sum(last, t[-1], rng)
        rows.append({"prompt": prompt(t), "answer": str(sum(t)), "chosen": good, "rejected": bad})
    return rows


def final_answer(response: str) -> Optional[str]:
    """What follows the last ``=`` of the stripped response, or None without an ``=``."""
    head, eq, tail = response.strip().rpartition("=")
    return tail if eq else None


def exact_match(response: str, row: dict) -> float:
    """The rule reward: 1.0 iff the text after the last ``=`` of the stripped response is
    exactly the answer (the sum, in digits, no sign or leading zero), else 0.0.

    Outcome only: the steps before it are not checked, so ``"12+34=47;47+56=102"`` and
    ``"=102"`` count; ``"102"`` (no ``=``), ``"...=102;"`` or ``"...=102 x"`` (text after
    the number) and ``"...=0102"`` do not. Same role as :func:`rlflow.arith.exact_match`,
    hence the same name (``reward/exact_match`` in the metrics of either task).
    """
    return 1.0 if final_answer(response) == row["answer"] else 0.0


def signed_match(response: str, row: dict) -> float:
    """The ±1 verifier reward of DAPO, VC-PPO and VAPO: +1 iff :func:`exact_match`, else -1."""
    return 2.0 * exact_match(response, row) - 1.0


# --- providers: builtin:arith-chain, builtin:tiny-arith-chain(-init) --------------------

_MAKERS = {"prompts": problems, "demonstrations": demonstrations, "pairs": pairs}


@data_provider("builtin:arith-chain", kinds=set(_MAKERS), rule=exact_match)
def _rows(kind: str, split: Split) -> list[dict]:
    """Every row of ``split`` for data of ``kind`` (train rows in seed-0 order)."""
    return _MAKERS[kind](split)


def make_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """:func:`rlflow.arith.make_tokenizer` over ``"0123456789+=;"``: ids as there, ``;`` is 16."""
    return arith.make_tokenizer(CHARS)


def _init_key() -> str:
    return arith.init_key(CHARS, SHAPE, INIT_SEED, _INIT_REVISION)


@model_provider("builtin:tiny-arith-chain-init", key=_init_key)
def _build_init(directory: Path, say: Say, train: Optional[Train]) -> None:
    """A freshly initialised model over the chain vocabulary and its tokenizer."""
    tok = make_tokenizer()
    arith.make_model(tok, seed=INIT_SEED, shape=SHAPE).save_pretrained(directory)
    tok.save_pretrained(directory)


def sft_pipeline() -> "Pipeline":
    """The recipe of ``builtin:tiny-arith-chain``: ``pipelines/examples/sft_chain.py``."""
    return arith.shipped_pipeline("examples/sft_chain.py")


def _sft_key() -> str:
    return arith.sft_key(sft_pipeline(), SFT_STEPS, _init_key())


@model_provider("builtin:tiny-arith-chain", key=_sft_key)
def _build_sft(directory: Path, say: Say, train: Optional[Train]) -> None:
    """``builtin:tiny-arith-chain-init`` after :func:`sft_pipeline`, run by ``train``."""
    arith.build_by_training("builtin:tiny-arith-chain", sft_pipeline(), directory, say, train)


# --- running a pipeline written for builtin:arith on this task ---------------------------

_FROM_ARITH = {"builtin:arith": "builtin:arith-chain", "builtin:tiny-arith": "builtin:tiny-arith-chain",
               "builtin:tiny-arith-init": "builtin:tiny-arith-chain-init"}


def _rule_ref(fn) -> str:
    """This module's rule of the same name for a rule of :mod:`rlflow.arith`, else ``fn``'s own."""
    name = getattr(fn, "__name__", "")
    if getattr(fn, "__module__", None) == arith.__name__ and callable(globals().get(name)):
        return f"{__name__}:{name}"
    from rlflow.spec import callable_ref

    return callable_ref(fn)


def _tokens(n: Optional[int]) -> Optional[int]:
    """A length budget written for arith's answers, moved to this task's: the same margin over
    the longest answer (DAPO's 6 = 4 + an overlong buffer of 2 becomes 40 + 2)."""
    return None if n is None else MAX_NEW_TOKENS + max(0, n - arith.MAX_NEW_TOKENS)


def _node_overrides(node) -> list[str]:
    import json

    out = []
    if getattr(node, "max_new_tokens", None) is not None:
        out.append(f"{node.name}.max_new_tokens={_tokens(node.max_new_tokens)}")
    rules = getattr(node, "rules", None) or {}
    if any(_rule_ref(r.fn) != f"{arith.__name__}:{getattr(r.fn, '__name__', '')}" for r in rules.values()):
        moved = {k: {"fn": _rule_ref(r.fn), "weight": r.weight} for k, r in rules.items()}
        out.append(f"{node.name}.rules={json.dumps(moved)}")
    return out


def overrides_from_arith(pipeline: "Pipeline") -> list[str]:
    """The ``--set`` overrides that run ``pipeline``, written for ``builtin:arith``, on this task.

    The data source and every ``builtin:tiny-arith*`` model move to their chain counterparts;
    each rule of :mod:`rlflow.arith` (``exact_match``, ``signed_match``) becomes this module's
    rule of the same name; every length budget (Generate's, Score's, Eval's) becomes
    :data:`MAX_NEW_TOKENS` plus the margin it had over arith's; held-out pairs move too.
    Everything else (batch size, lr, steps, ...) is the pipeline's own. Validation of the
    result is the caller's (``rlflow.loader.apply_overrides``).
    """
    import json

    out = []
    if pipeline.data.source in _FROM_ARITH:
        out.append(f"data.source={_FROM_ARITH[pipeline.data.source]}")
    out += [f"{k}.path={_FROM_ARITH[m.path]}" for k, m in pipeline.models.items() if m.path in _FROM_ARITH]
    for node in pipeline.nodes:
        out += _node_overrides(node)
    ev = pipeline.eval
    if ev is not None:
        before = ev.model_dump(mode="json")
        moved = {**before}
        moved.update(max_new_tokens=_tokens(ev.max_new_tokens), pairs=_FROM_ARITH.get(ev.pairs, ev.pairs),
                     rule=_rule_ref(ev.rule) if ev.rule is not None else None)
        out += [f"pipeline.eval={json.dumps(moved)}"] if moved != before else []
    return out
