"""Data sources: rows from a ``builtin:`` provider (``rlflow.builtin``), a jsonl file, or
anything the ``datasets`` library reads (a Hugging Face dataset name, a saved dataset, csv,
json or parquet files), served as ``Batch`` es of prompts (or demonstrations, or
preference pairs). Chat prompts are rendered with the tokenizer's chat template.

The stream is seeded, walks a shuffled order epoch after epoch, and can report and
restore its position (for exact resume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from rlflow import builtin
from rlflow.batch import Batch
from rlflow.inputs import (DataError, check_source, field_problem, is_dataset_name, iter_jsonl,  # noqa: F401
                           needs_datasets)
from rlflow.models import hub_offline
from rlflow.spec import DataSource, Demonstrations, Pairs


def load_rows(spec: DataSource, split: str = "train") -> Optional[list[dict[str, Any]]]:
    """All rows of ``split`` ("train" or "eval") as dicts; None when there is no such split.

    The eval rows come from ``eval_source`` (its ``eval_split`` when read through
    ``datasets``), or from the source's own ``eval_split``.
    """
    src = spec.source
    if src.startswith("builtin:"):
        problem = check_source(spec)
        if problem:
            raise DataError(problem, "RF108")
        return builtin.data_provider(src).rows(spec.kind, split)
    if split == "train":
        path, part = src, spec.split
    else:
        path, part = spec.eval_source or (src if spec.eval_split else None), spec.eval_split or "train"
    if path is None:
        return None
    if needs_datasets(path):
        return dataset_rows(path, spec.subset, part)
    if not Path(path).expanduser().exists():
        raise DataError(f"data file {path!r} does not exist", "RF108")
    return [row for _, row in iter_jsonl(path)]


def dataset_rows(src: str, subset: Optional[str], split: str) -> list[dict[str, Any]]:
    """The rows of ``split`` of a dataset read through ``datasets``: a directory (saved with
    ``save_to_disk``, or of data files), a csv/json/parquet file, or a Hugging Face dataset
    name — from the local cache alone when the hub cannot be reached (a clear RF108 when it
    is not there)."""
    named = is_dataset_name(src)
    if named and hub_offline():
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # read at the import of datasets ...
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {src!r} needs the datasets library: pip install 'rlflow[data]'", "RF108") from None
    if named and hub_offline():
        datasets.config.HF_HUB_OFFLINE = True  # ... in case it was imported already
    datasets.disable_progress_bars()
    try:
        ds = _load_dataset(datasets, src, subset, split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one clear message
        raise DataError(_why_not_loaded(src, subset, e, named), "RF108") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{src}: no split {split!r}; it has {', '.join(ds)}", "RF114")
        ds = ds[split]
    return [dict(r) for r in ds]


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


def _load_dataset(datasets, src: str, subset: Optional[str], split: str):
    p = Path(src).expanduser()
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        return datasets.load_from_disk(str(p))  # saved with save_to_disk
    if p.is_file():
        if p.suffix not in _BUILDERS:
            raise DataError(f"{src}: cannot read a {p.suffix or 'suffix-less'} file; use jsonl, json, csv or parquet", "RF114")
        return datasets.load_dataset(_BUILDERS[p.suffix], data_files=str(p), split="train")
    return datasets.load_dataset(str(p) if p.is_dir() else src, subset, split=split)


def _why_not_loaded(src: str, subset: Optional[str], e: Exception, named: bool) -> str:
    what = f"{src!r}" + (f" (subset {subset!r})" if subset else "")
    if named and hub_offline():
        return (f"dataset {what} is not in the local Hugging Face cache and the hub cannot be reached: download it "
                f"where there is a network (hf download --repo-type dataset {src}), point the source at local files, "
                f"or set RLFLOW_ONLINE=1 to try the hub anyway ({type(e).__name__})")
    return f"dataset {what} could not be loaded: {type(e).__name__}: {e}"


def prompt_text(spec: DataSource, row: dict[str, Any], tokenizer) -> str:
    """The prompt of ``row`` as the model reads it: plain text as it is; a chat (in
    ``messages_field``, or a prompt that is a list of messages) through the tokenizer's chat
    template, with the assistant turn opened (``add_generation_prompt=True``)."""
    value = row[getattr(spec, "messages_field", None) or spec.prompt_field]
    return value if isinstance(value, str) else chat_text(tokenizer, value)


def chat_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered by the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the prompts are chat messages but the model's tokenizer has no chat template "
                        "(use an instruct/chat model, set tokenizer.chat_template, or give plain-text prompts)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def is_chat(spec: DataSource, rows: list[dict[str, Any]]) -> bool:
    """Whether the prompts of ``rows`` are chats (then the template holds the special tokens)."""
    return bool(getattr(spec, "messages_field", None)) or any(isinstance(r[spec.prompt_field], list) for r in rows)


def _require(rows: list[dict], fields: dict[str, str], source: str) -> None:
    for i, r in enumerate(rows):
        for setting, name in fields.items():
            if name not in r:
                raise DataError(f"{source}: row {i} has no field {name!r} (it has {sorted(r)})")
            why = field_problem(setting, r[name])
            if why:
                raise DataError(f"{source}: row {i}: field {name!r} {why}")


def _encode_responses(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids with EOS appended, and their mask [B, T]."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width))
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1.0
    return out, mask


def make_batch(spec: DataSource, rows: list[dict[str, Any]], tokenizer, first_group: int = 0) -> Batch:
    """The Batch of ``rows``: one row per prompt (two per pair for preference data)."""
    from rlflow.forward import encode_prompts

    answer_field = getattr(spec, "answer_field", "answer")
    if isinstance(spec, Pairs):
        prompts = [prompt_text(spec, r, tokenizer) for r in rows for _ in (0, 1)]
        responses = [r[k] for r in rows for k in (spec.chosen_field, spec.rejected_field)]
        answers = [str(r.get(answer_field, r[spec.chosen_field])) for r in rows for _ in (0, 1)]
        group = torch.arange(first_group, first_group + len(rows)).repeat_interleave(2)
    else:
        prompts = [prompt_text(spec, r, tokenizer) for r in rows]
        answers = [str(r.get(answer_field, "")) for r in rows]
        responses = [r[spec.completion_field] for r in rows] if isinstance(spec, Demonstrations) else None
        group = torch.arange(first_group, first_group + len(rows))
    # a chat template writes its own special tokens (BOS ...); plain text gets the tokenizer's
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, add_special_tokens=not is_chat(spec, rows))
    b = Batch({"prompt": prompts, "answer": answers, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "group": group},
              meta={"pad_id": tokenizer.pad_token_id})
    if responses is not None:
        b["response"] = responses
        b["response_ids"], b["response_mask"] = _encode_responses(tokenizer, responses)
    if isinstance(spec, Pairs):
        b["chosen"] = torch.tensor([1.0, 0.0]).repeat(len(rows))
    return b


def share(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items split over ``world`` ranks: sizes
    differ by at most one, the first ranks take the larger shares, and the shares in rank
    order are ``range(n)``."""
    return range(rank * n // world, (rank + 1) * n // world)


EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled with seed s * stride + e (a prime: no overlap)


class DataStream:
    """Endless seeded batches, epoch after epoch; ``spec.batch_size`` prompts (or pairs) in
    all, whatever the number of processes.

    Every rank walks the same shuffled order and takes its own contiguous share of each
    global batch (:func:`share`: whole prompts, so a group never spans ranks); group ids are
    the prompts' global indices, and prompts are padded to the global batch's widest, so a
    row is the same tensor whichever rank holds it.
    """

    def __init__(self, spec: DataSource, tokenizer, *, seed: int, rank: int = 0, world: int = 1):
        self.spec, self.tokenizer, self.seed = spec, tokenizer, seed
        self.rank, self.world = rank, world
        if spec.batch_size < world:
            raise DataError(f"data.batch_size is {spec.batch_size} but there are {world} processes: each process "
                            "needs at least one prompt (the batch size is global)", "RF111")
        rows = load_rows(spec, "train")
        if not rows:
            raise DataError(f"{spec.source}: no rows")
        _require(rows, spec.text_fields(), spec.source)
        self.rows = rows
        self.epoch, self.pos, self.groups_served = 0, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self) -> Batch:
        """This rank's share of the next global batch."""
        picked: list[dict] = []
        while len(picked) < self.spec.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            picked.append(self.rows[self._order[self.pos]])
            self.pos += 1
        whole = make_batch(self.spec, picked, self.tokenizer, first_group=self.groups_served)
        self.groups_served += len(picked)
        if self.world == 1:
            return whole
        mine = share(len(picked), self.rank, self.world)
        per = len(whole) // len(picked)  # rows per prompt: 1, or 2 for a preference pair
        return whole.select(torch.arange(mine.start * per, mine.stop * per))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "groups_served": self.groups_served}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.groups_served = state["epoch"], state["pos"], state["groups_served"]
        self._order = self._shuffle()
