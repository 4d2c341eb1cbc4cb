"""The built-in task ``builtin:arith`` and the untrained parts of ``builtin:tiny-arith``.

The task is two-digit addition: the prompt is ``"37+45="`` and the answer is ``"82"``,
with both operands in 10..99 (8,100 problems). A fixed 500 of them are held out as the
eval split, the same whatever the seed; the train split is the other 7,600, shuffled by
the seed. The reward is a rule, :func:`exact_match`.

The model is a tiny Llama-style causal LM over a character-level tokenizer, so every
pipeline runs and visibly learns on a CPU with nothing downloaded. This module builds
the tokenizer and the freshly initialised model; the project's own SFT pipeline
(``pipelines/sft.py``) trains it on :func:`demonstrations` with the ``SFT_*`` settings
below, which were chosen to stop at a *moderate* eval accuracy so that RL has room to
improve it.

Importing this module registers its providers (:mod:`rlflow.provider`): the data source
``builtin:arith`` (default evaluation rule :func:`exact_match`) and the models
``builtin:tiny-arith-init`` and ``builtin:tiny-arith``. Only the standard library and
``rlflow.provider`` are imported at module level: the data functions serve validation,
which must not import torch.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from rlflow.provider import Say, Train, data_provider, model_provider

if TYPE_CHECKING:
    import transformers

    from rlflow.spec import Pipeline

Split = Literal["train", "eval"]

# Settings for the SFT run that makes builtin:tiny-arith from make_model(seed=0): AdamW
# (betas 0.9/0.999, no weight decay), gradient clip 1.0, constant lr, token-mean NLL on the
# completion + EOS, batches walked through demonstrations("train") in a seeded shuffle.
# Measured with a hand loop that mirrors pipelines/sft.py (1 CPU thread; greedy accuracy
# on the 500 eval problems with MAX_NEW_TOKENS new tokens):
#   seed 0 / 1 / 2 (init and data order): 23.8 / 23.0 / 38.6 % after 175 steps,
#                                            27.0 / 47.6 / 53.8 % after 200 steps;
#   175 steps take 40-100 s of training on one thread of a busy 2-core machine.
#   (python /tmp/arith/sft2.py --seed S --lr 1e-3 --batch 128 --steps 400 --every 25)
# The rise from ~5 % to ~70 % is steep and its timing moves by about +-40 steps with the
# seed (seeds 3, 4: 16.2 / 39.4 %; init 0 with data seeds 1, 2: 12.0 / 21.0 %), so a
# fixed step count lands near, not always inside, 20-40 %. Trained on, seed 0 reaches
# 7 / 27 / 68 / 72 / 81 / 79 / 87 / 86 / 85 / 78 % at steps 100, 200, ..., 1000.
# GRPO from the seed-0 model (32 prompts x 8 samples, temperature 1, lr 1e-4,
# group-normalised reward, on-policy token-mean loss) took it from 23.8 % to 72.0 % in
# 300 steps (about 3 minutes on one thread).
SFT_LR = 1e-3
SFT_BATCH = 128
SFT_STEPS = 200
SFT_WARMUP = 0
# Longest answer is 3 digits ("198") plus EOS.
MAX_NEW_TOKENS = 4

EVAL_SIZE = 500
_EVAL_PERMUTATION_SEED = 20240601  # fixed forever: changing it changes the eval split
OPERANDS = range(10, 100)

CHARS = "0123456789+="
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"

# The shape of builtin:tiny-arith-init and the seed of its weights. These enter its cache
# key; bump _INIT_REVISION for any other change to make_tokenizer or make_model.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
INIT_SEED = 0
_INIT_REVISION = 1


# --- tokenizer and model ---------------------------------------------------------------


def vocabulary(chars: str = CHARS) -> list[str]:
    """Every token of the character tokenizer over ``chars``, in id order."""
    return [PAD, EOS, BOS, UNK, *chars]


def make_tokenizer(chars: str = CHARS) -> "transformers.PreTrainedTokenizerFast":
    """A character-level tokenizer over ``chars`` (default ``"0123456789+="``) plus pad,
    eos, bos and unk.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then the characters in
    order (16 in all for the default). Nothing is added around an encoded text (no BOS, no EOS); the
    SFT data loader appends EOS to completions. Padding is on the left, so that
    generation continues from the last prompt token. Decoding fuses the characters
    without spaces: ``decode(ids("82") + [eos], skip_special_tokens=True) == "82"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary(chars))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # An empty pattern matches between every pair of characters: one piece per character.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()  # join the pieces with no separator
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=64,
    )


def make_model(tokenizer: "transformers.PreTrainedTokenizerBase", *, seed: int,
               shape: Optional[dict] = None) -> "transformers.LlamaForCausalLM":
    """A freshly initialised tiny Llama (about 0.66M parameters) for ``tokenizer``.

    ``shape`` (default :data:`SHAPE`): hidden size 128, 4 layers of 4 heads, MLP width
    256, tied input and output embeddings. The initialisation depends only on ``seed``;
    the global torch RNG is left as it was.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **(SHAPE if shape is None else shape),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# --- data ------------------------------------------------------------------------------


def _split_pairs(split: Split) -> list[tuple[int, int]]:
    """The (a, b) pairs of ``split``: eval in its fixed order, train in canonical order."""
    every = [(a, b) for a in OPERANDS for b in OPERANDS]
    order = list(range(len(every)))
    random.Random(_EVAL_PERMUTATION_SEED).shuffle(order)
    held_out = order[:EVAL_SIZE]
    if split == "eval":
        return [every[i] for i in held_out]
    if split == "train":
        held = set(held_out)
        return [p for i, p in enumerate(every) if i not in held]
    raise ValueError(f"unknown split {split!r}; known: 'eval', 'train'")


def _operands(split: Split, n: int | None, seed: int) -> list[tuple[int, int]]:
    return take(_split_pairs(split), split, n, seed)


def take(chosen: list, split: Split, n: int | None, seed: int) -> list:
    """The first ``n`` of the problems ``chosen`` for ``split`` (``None``: all): the train
    split shuffled by ``seed`` first, the eval split in its fixed order."""
    if split == "train":
        random.Random(seed).shuffle(chosen)
    if n is None:
        return chosen
    if not 0 <= n <= len(chosen):
        raise ValueError(f"n={n} is outside 0..{len(chosen)} for the {split!r} split")
    return chosen[:n]


def problems(split: Split, n: int | None = None, *, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt": "37+45=", "answer": "82"}`` of ``split``.

    ``"eval"`` is a fixed held-out set of 500 problems in a fixed order; ``seed`` does
    not change it. ``"train"`` is the other 7,600, shuffled by ``seed``. ``n`` takes the
    first ``n`` rows (``None``: all of them).
    """
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in _operands(split, n, seed)]


def exact_match(response: str, row: dict) -> float:
    """The rule reward: 1.0 iff the stripped response is the answer, else 0.0."""
    return 1.0 if response.strip() == row["answer"] else 0.0


def signed_match(response: str, row: dict) -> float:
    """The ±1 verifier reward of DAPO, VC-PPO and VAPO: +1 iff correct, else -1."""
    return 2.0 * exact_match(response, row) - 1.0


def wrong_sum(a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer to ``a+b``: a slip of one in the units or tens digit, a
    dropped or spurious carry (both change the sum by ten), or a dropped hundreds carry."""
    total = a + b
    candidates = {total - 1, total + 1, total - 10, total + 10}
    if total >= 100:
        candidates.add(total - 100)  # "145" written "45"
    return str(rng.choice(sorted(c for c in candidates if c >= 0 and c != total)))


def pairs(split: Split, n: int | None = None, *, seed: int = 0) -> list[dict]:
    """Preference rows ``{"prompt", "answer", "chosen", "rejected"}`` for DPO and reward
    models (``answer`` lets the rule reward score them).

    ``chosen`` is the correct sum (the answer); ``rejected`` is a plausible wrong one (see
    :func:`wrong_sum`), never equal to ``chosen``. The rows are those of
    :func:`problems` with the same arguments, and each problem's ``rejected`` depends
    only on the problem and ``seed``.
    """
    rows = []
    for a, b in _operands(split, n, seed):
        rng = random.Random(f"{seed}:{a}+{b}")  # str seeds hash with sha512: stable across runs
        answer = str(a + b)
        rows.append({"prompt": f"{a}+{b}=", "answer": answer, "chosen": answer, "rejected": wrong_sum(a, b, rng)})
    return rows


def demonstrations(split: Split, n: int | None = None, *, seed: int = 0) -> list[dict]:
    """SFT rows ``{"prompt", "answer", "completion"}``; the completion is the answer text.

    The EOS token is appended by the data loader, not here.
    """
    return [{**row, "completion": row["answer"]} for row in problems(split, n, seed=seed)]


# --- providers: what the names builtin:arith, builtin:tiny-arith(-init) stand for ---------------

_MAKERS = {"prompts": problems, "demonstrations": demonstrations, "pairs": pairs}


@data_provider("builtin:arith", kinds=set(_MAKERS), rule=exact_match)
def _rows(kind: str, split: Split) -> list[dict]:
    """Every row of ``split`` for data of ``kind`` (train rows in seed-0 order; the data
    stream shuffles them with the pipeline's seed)."""
    return _MAKERS[kind](split)


def digest(recipe: object) -> str:
    """A short hash of a JSON-able recipe: the part of a cache key that changes with it."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def init_key(chars: str, shape: dict, seed: int, revision: int) -> str:
    """The cache key of a fresh model: changes with the vocabulary, the shape, the seed or
    the revision of the init recipe."""
    return f"s{seed}-{digest([revision, vocabulary(chars), shape, seed])}"


def _init_key() -> str:
    return init_key(CHARS, SHAPE, INIT_SEED, _INIT_REVISION)


@model_provider("builtin:tiny-arith-init", key=_init_key)
def _build_init(directory: Path, say: Say, train: Optional[Train]) -> None:
    """A freshly initialised model and its tokenizer, saved in ``directory``."""
    tok = make_tokenizer()
    make_model(tok, seed=INIT_SEED).save_pretrained(directory)
    tok.save_pretrained(directory)


def shipped_pipeline(relative: str) -> "Pipeline":
    """The shipped pipeline file ``relative`` to ``pipelines/`` (``"sft.py"``), loaded as
    ``rlflow run`` loads it: a recipe pipeline imports its task module for its settings, so
    the task module does not import it."""
    import rlflow.pipelines
    from rlflow.loader import load_pipeline

    return load_pipeline(Path(rlflow.pipelines.__file__).parent / relative)


def sft_pipeline() -> "Pipeline":
    """The recipe of ``builtin:tiny-arith``: the shipped ``pipelines/sft.py``."""
    return shipped_pipeline("sft.py")


def sft_key(recipe: "Pipeline", steps: int, start_key: str) -> str:
    """The cache key of a model made by the SFT run ``recipe``: changes with the pipeline (any
    setting but its description) and with ``start_key``, the key of the model it starts from."""
    config = {k: v for k, v in recipe.to_config().items() if k != "description"}
    return f"sft{steps}-{digest([config, start_key])}"


def _sft_key() -> str:
    return sft_key(sft_pipeline(), SFT_STEPS, _init_key())


def build_by_training(name: str, recipe: "Pipeline", directory: Path, say: Say, train: Optional[Train]) -> None:
    """Save in ``directory`` the final model of the training run ``recipe`` (run by ``train``,
    the engine's), announced to the user through ``say`` as the build of ``name``."""
    if train is None:
        raise RuntimeError(f"{name} is made by training the pipeline {recipe.name!r}; "
                           "its caller must pass train= (the engine's train_pipeline)")
    data = getattr(recipe.data, "source", "?")
    start = ", ".join(m.path for m in recipe.models.values())
    say(f"building {name} (first use): {recipe.name} of {start} on {data} "
        f"({recipe.steps} steps, one thread), cached in {directory.parent}")
    t0 = time.perf_counter()
    run_dir = directory.with_name(directory.name + "-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    final = train(recipe, run_dir)
    shutil.move(str(final), str(directory))
    shutil.rmtree(run_dir, ignore_errors=True)
    say(f"built {name} in {time.perf_counter() - t0:.0f}s")


@model_provider("builtin:tiny-arith", key=_sft_key)
def _build_sft(directory: Path, say: Say, train: Optional[Train]) -> None:
    """``builtin:tiny-arith-init`` after :func:`sft_pipeline`, run by ``train``."""
    build_by_training("builtin:tiny-arith", sft_pipeline(), directory, say, train)
