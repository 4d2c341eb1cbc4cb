"""Padding-free layout: the sequences of a batch packed into a few rows of one width.

The batch layout of rlflow (ALGORITHMS.md §0.1) is prompts left-padded to ``P`` and
responses right-padded to ``T``, so a forward over ``[B, P+T]`` computes ``(P - p_i) +
(T - r_i)`` padding positions for row ``i`` (about a third of them on the benchmark).
Here each row's real tokens — its prompt, then its response — become one contiguous
sequence, and the sequences are packed first-fit-decreasing into ``R`` rows of width
``L`` (verl's remove-padding, OpenRLHF's packing, TRL's padding-free). Position ids
restart at 0 for every sequence, which is what confines attention to each sequence:
transformers builds a block-causal mask from restarting position ids when it is given
no 2-D attention mask and no cache (``masking_utils.find_packed_sequence_indices``).
The filler at the end of a row has position 0 at every slot, so each filler token is a
sequence of its own and attends to nothing real.

``read="next"`` lays out what log-probs and values need: the outputs at the positions
that predict each response token (column ``P+t-1`` of the padded layout, ALGORITHMS.md
§0.1). A row's last response token predicts nothing that is read, so it is not fed; a
row without a response is not fed at all. ``read="last"`` lays out what a reward head
needs: the whole sequence, read at its last token.

The row width trades padding against attention: packing several sequences in a row of
width ``L`` costs attention over ``L`` positions, masked or not. :func:`row_width` picks
``L`` among a few multiples of the longest sequence by a cost model: ``R·L`` positions,
each costing ``1 + L / (6·H)`` (per token, a transformer layer's matmuls are ``24·H²``
FLOPs and its attention ``4·H·L``). No torch import beyond tensors; no model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

# Row widths tried, as multiples of the longest sequence (the first that is cheapest wins).
WIDTH_MULTIPLES = (1, 1.5, 2, 3, 4, 6, 8)


@dataclass
class Packed:
    """A batch laid out without padding.

    ids:       [R, L] long, the packed token ids (filler: ``pad_id``)
    positions: [R, L] long, position ids restarting at 0 per sequence (filler: 0)
    index:     [B, T] long for ``read="next"`` (the flat position in ``R*L`` whose output
               is read for response token ``t`` of row ``i``), [B] for ``read="last"``
    valid:     [B, T] bool, where ``index`` means something (the response mask)
    useful:    real tokens fed (the positions that had to be computed)
    """

    ids: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    useful: int

    @property
    def computed(self) -> int:
        """Positions the forward computes: ``R·L``."""
        return int(self.ids.numel())


@dataclass
class Positions:
    """Positions a node's forwards computed, and how many of them carried a real token.

    The engine gives one to each node run (``Context.positions``); the model-facing
    functions of :mod:`rlflow.forward` add to it when given one.
    """

    computed: int = 0
    useful: int = 0

    def add(self, computed: int, useful: int) -> None:
        self.computed += int(computed)
        self.useful += int(useful)

    @property
    def padding_frac(self) -> float:
        return 1.0 - self.useful / self.computed if self.computed else 0.0


def first_fit_decreasing(lengths: list[int], width: int) -> tuple[list[int], list[int], int]:
    """Bins of capacity ``width`` for items of ``lengths`` (each ``<= width``): the bin and
    the offset in it of every item, and the number of bins. Longest first, each item into
    the first bin with room (ties keep the items' order, so the layout is deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    room: list[int] = []
    bin_of, offset = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        for b, free in enumerate(room):
            if free >= n:
                break
        else:
            b = len(room)
            room.append(width)
        bin_of[i], offset[i] = b, width - room[b]
        room[b] -= n
    return bin_of, offset, len(room)


def row_width(lengths: list[int], hidden: Optional[int]) -> int:
    """The row width ``L`` with the least modelled cost ``R·L·(1 + L/(6H))`` (see the module
    docstring); the longest sequence alone when ``hidden`` is unknown."""
    longest = max(lengths, default=1) or 1
    if not hidden:
        return longest
    best, best_cost = longest, float("inf")
    for k in WIDTH_MULTIPLES:
        width = int(longest * k)
        rows = first_fit_decreasing(lengths, width)[2]
        cost = rows * width * (1.0 + width / (6.0 * hidden))
        if cost < best_cost:
            best, best_cost = width, cost
    return best


def pack(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
         *, read: Literal["next", "last"], pad_id: int = 0, hidden: Optional[int] = None) -> Packed:
    """The padding-free layout of a batch (left-padded prompts, right-padded responses).

    ``hidden`` (the model's hidden size) lets :func:`row_width` pack several sequences
    per row; without it each row is one sequence, right-padded to the longest.
    """
    device = prompt_ids.device
    resp = response_mask > 0  # [B, T]
    r = resp.sum(1)  # [B] response lengths (the mask is a prefix of ones)
    keep = torch.cat([prompt_mask > 0, resp], dim=1)  # [B, P+T] real tokens, contiguous per row
    if read == "next":
        last = prompt_ids.shape[1] + r - 1  # [B] column of the last response token: not fed
        keep = keep & (torch.arange(keep.shape[1], device=device) != last[:, None])
        keep = keep & (r > 0)[:, None]  # no response: nothing to read, nothing fed
    lengths_t = keep.sum(1)  # [B]
    lengths = lengths_t.tolist()
    width = row_width(lengths, hidden)
    bin_of, offset, rows = first_fit_decreasing(lengths, width)
    start = torch.tensor(bin_of, device=device) * width + torch.tensor(offset, device=device)  # [B] flat start
    tokens = torch.cat([prompt_ids, response_ids], dim=1)[keep]  # [N] row-major: row 0's sequence, then row 1's ...
    seq_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)  # [N]
    first = torch.cumsum(lengths_t, 0) - lengths_t  # [B] where each sequence starts in ``tokens``
    pos = torch.arange(tokens.numel(), device=device) - first[seq_of]  # [N] position within its sequence
    dest = start[seq_of] + pos  # [N] flat destination
    ids = torch.full((max(rows, 1) * width,), pad_id, dtype=tokens.dtype, device=device).index_put_((dest,), tokens)
    positions = torch.zeros_like(ids).index_put_((dest,), pos)
    p = (prompt_mask > 0).sum(1)  # [B] prompt lengths
    if read == "next":  # response token t is predicted at sequence position p_i - 1 + t
        t = torch.arange(response_ids.shape[1], device=device)
        index = (start + p - 1)[:, None] + t[None, :]  # [B, T]
        index = torch.where(resp, index, 0)
        valid = resp
    else:  # the last real token: p_i + r_i - 1 (the last prompt token when there is no response)
        index = start + p + r - 1  # [B]
        valid = torch.ones_like(r, dtype=torch.bool)
    return Packed(ids.view(max(rows, 1), width), positions.view(max(rows, 1), width), index, valid, int(lengths_t.sum()))
