"""The data on the edges: a ``Batch`` of named columns, one row per sample.

Columns are tensors whose first dimension is the row (``[B]``, ``[B, T]``, ``[B, P]``)
or Python lists of length ``B`` (texts, answers). Every row carries its ``group`` (the
prompt it came from), so group statistics survive selection, shuffling and splitting.
Token columns of different widths are right-padded with zeros when batches are
concatenated; ``prompt_ids`` are left-padded (with ``pad_id`` from ``meta``).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch

# columns whose padding goes on the left (prompts are left-padded for generation)
_LEFT_PADDED = {"prompt_ids", "prompt_mask"}


class Batch:
    def __init__(self, columns: dict[str, Any] | None = None, meta: dict[str, Any] | None = None):
        self.columns: dict[str, Any] = {}
        self.meta: dict[str, Any] = dict(meta or {})  # batch-wide facts (the pad id)
        for k, v in (columns or {}).items():
            self[k] = v

    # --- mapping ---------------------------------------------------------------------------
    def __len__(self) -> int:
        for v in self.columns.values():
            return v.shape[0] if isinstance(v, torch.Tensor) else len(v)
        return 0

    def __getitem__(self, name: str) -> Any:
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"batch has no column {name!r}; it has {sorted(self.columns)}") from None

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            value = list(value)
        n = value.shape[0] if isinstance(value, torch.Tensor) else len(value)
        if self.columns and n != len(self):
            raise ValueError(f"column {name!r} has {n} rows, the batch has {len(self)}")
        self.columns[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def get(self, name: str, default: Any = None) -> Any:
        return self.columns.get(name, default)

    def keys(self) -> Iterable[str]:
        return self.columns.keys()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.columns.items() if isinstance(v, torch.Tensor)}

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}{list(v.shape) if isinstance(v, torch.Tensor) else '[list]'}" for k, v in self.columns.items())
        return f"Batch({len(self)} rows: {cols})"

    # --- row operations --------------------------------------------------------------------
    def select(self, index: torch.Tensor | Sequence[int]) -> "Batch":
        """The rows at ``index`` (a long tensor, a list of ints, or a bool mask)."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        idx = idx.long()
        rows = idx.tolist()
        out = Batch(meta=self.meta)
        for k, v in self.columns.items():
            out.columns[k] = v.index_select(0, idx.to(v.device)) if isinstance(v, torch.Tensor) else [v[i] for i in rows]
        return out

    def repeat_interleave(self, n: int) -> "Batch":
        """Each row ``n`` times in a row (one prompt row -> its ``n`` samples)."""
        return self.select(torch.arange(len(self)).repeat_interleave(n))

    def split(self, size: int) -> list["Batch"]:
        """Consecutive chunks of at most ``size`` rows, never splitting a group.

        Rows of one group must be contiguous (as Generate writes them). A group larger
        than ``size`` becomes a chunk of its own.
        """
        if size < 1:
            raise ValueError("split size must be >= 1")
        bounds = self._group_bounds()
        chunks, start, end = [], 0, 0
        for g_start, g_end in bounds:
            if g_end - start > size and end > start:
                chunks.append((start, end))
                start = g_start
            end = g_end
        if end > start:
            chunks.append((start, end))
        return [self.select(torch.arange(a, b)) for a, b in chunks]

    def _group_bounds(self) -> list[tuple[int, int]]:
        if "group" not in self.columns:
            return [(i, i + 1) for i in range(len(self))]
        g = self.columns["group"].tolist()
        bounds, start = [], 0
        for i in range(1, len(g) + 1):
            if i == len(g) or g[i] != g[i - 1]:
                bounds.append((start, i))
                start = i
        if len({g[a] for a, _ in bounds}) != len(bounds):
            raise ValueError("rows of a group are not contiguous; sort the batch by group first")
        return bounds

    def groups(self) -> list[int]:
        """The distinct group ids, in the order the rows hold them."""
        return [int(self.columns["group"][a]) for a, _ in self._group_bounds()] if len(self) else []

    def take_groups(self, ids: Sequence[int]) -> "Batch":
        """The rows of the groups in ``ids`` that this batch holds, group after group in the
        order of ``ids`` (a group it does not hold is skipped: another rank holds it)."""
        where = {int(self.columns["group"][a]): (a, b) for a, b in self._group_bounds()} if len(self) else {}
        return self.select([i for g in ids if g in where for i in range(*where[g])])

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor column to ``device``, in place; returns the batch itself."""
        for k, v in self.columns.items():
            if isinstance(v, torch.Tensor) and v.device != torch.device(device):
                self.columns[k] = v.to(device)
        return self

    @staticmethod
    def cat(batches: Sequence["Batch"]) -> "Batch":
        """Rows of every batch, in order. Token columns are padded to the widest."""
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch()
        keys = list(batches[0].columns)
        for b in batches[1:]:
            if list(b.columns) != keys and set(b.columns) != set(keys):
                raise ValueError(f"cannot concatenate batches with columns {sorted(keys)} and {sorted(b.columns)}")
        out = Batch(meta=batches[0].meta)
        pad_id = batches[0].meta.get("pad_id", 0)
        for k in keys:
            vals = [b.columns[k] for b in batches]
            if isinstance(vals[0], torch.Tensor):
                out.columns[k] = _cat_padded(vals, left=k in _LEFT_PADDED, fill=pad_id if k == "prompt_ids" else 0)
            else:
                out.columns[k] = [x for v in vals for x in v]
        return out


def mini_batch_groups(groups: Sequence[int], parts: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """``groups`` cut into exactly ``min(parts, len(groups))`` mini-batches of whole groups,
    their sizes differing by at most one (the first ones larger), after a seeded shuffle of
    the groups when a ``generator`` is given. Run on the global group ids with a generator
    that every rank holds alike, it gives every rank the same plan (``Batch.take_groups``
    then takes each rank's rows of each mini-batch)."""
    order = list(groups)
    if generator is not None:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    parts = max(1, min(parts, len(order)))
    out, start = [], 0
    for i in range(parts):
        n = len(order) // parts + (1 if i < len(order) % parts else 0)
        out.append(order[start:start + n])
        start += n
    return out


def _cat_padded(tensors: list[torch.Tensor], *, left: bool, fill: int | float) -> torch.Tensor:
    if tensors[0].dim() < 2:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        extra = width - t.shape[1]
        if extra:
            pad = torch.full((t.shape[0], extra, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)
            t = torch.cat([pad, t] if left else [t, pad], dim=1)
        padded.append(t)
    return torch.cat(padded)


def iter_rows(batch: Batch, names: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Row dicts of the named non-tensor (text) columns, for rule functions."""
    names = [n for n in names if n in batch and not isinstance(batch[n], torch.Tensor)]
    for i in range(len(batch)):
        yield {n: batch[n][i] for n in names}
