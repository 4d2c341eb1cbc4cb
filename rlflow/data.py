"""Data sources: rows from a ``builtin:`` provider (``rlflow.builtin``), a jsonl file or
a saved ``datasets`` dataset, served as ``Batch`` es of prompts (or demonstrations, or
preference pairs).

The stream is seeded, walks a shuffled order epoch after epoch, and can report and
restore its position (for exact resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from rlflow import builtin
from rlflow.batch import Batch
from rlflow.inputs import DataError, check_source, iter_jsonl  # noqa: F401  (torch-free; re-exported)
from rlflow.spec import DataSource, Demonstrations, Pairs


def load_rows(spec: DataSource, split: str = "train") -> Optional[list[dict[str, Any]]]:
    """All rows of ``split`` ("train" or "eval") as dicts; None when there is no such split."""
    src = spec.source
    if src.startswith("builtin:"):
        problem = check_source(spec)
        if problem:
            raise DataError(problem, "RF108")
        return builtin.data_provider(src).rows(spec.kind, split)
    path = src if split == "train" else spec.eval_source
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist", "RF108")
    if p.is_dir():
        try:
            import datasets  # optional: only for datasets saved with save_to_disk
        except ImportError as e:
            raise DataError(f"{path!r} is a directory; reading a saved dataset needs `pip install datasets`") from e
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [dict(r) for r in ds]
    return [row for _, row in iter_jsonl(path)]


def _require(rows: list[dict], fields: list[str], source: str) -> None:
    for i, r in enumerate(rows):
        missing = [f for f in fields if f not in r]
        if missing:
            raise DataError(f"{source}: row {i} has no field {missing[0]!r} (it has {sorted(r)})")


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
        prompts = [r[spec.prompt_field] for r in rows for _ in (0, 1)]
        responses = [r[k] for r in rows for k in (spec.chosen_field, spec.rejected_field)]
        answers = [str(r.get(answer_field, r[spec.chosen_field])) for r in rows for _ in (0, 1)]
        group = torch.arange(first_group, first_group + len(rows)).repeat_interleave(2)
    else:
        prompts = [r[spec.prompt_field] for r in rows]
        answers = [str(r.get(answer_field, "")) for r in rows]
        responses = [r[spec.completion_field] for r in rows] if isinstance(spec, Demonstrations) else None
        group = torch.arange(first_group, first_group + len(rows))
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
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
        _require(rows, list(spec.text_fields().values()), spec.source)
        self.rows = rows
        self.epoch, self.pos, self.groups_served = 0, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
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
