"""The one place where statistics cross processes.

The statistics that define the update (whitening moments, aggregation counts) go
through :func:`all_reduce_sum`: a no-op in one process and a sum all-reduce when
``torch.distributed`` is initialised with more than one rank. Logged metrics and
dynamic-sampling counts are each rank's own (rank 0's are written).
"""

from __future__ import annotations


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all ranks, returning a new tensor (the input is not modified)."""
    import torch.distributed as dist

    out = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _all_reduce_int(value: int, op: str) -> int:
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return int(t.item())


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over all ranks (the value itself in one process)."""
    return _all_reduce_int(value, "MIN")


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over all ranks (the value itself in one process)."""
    return _all_reduce_int(value, "MAX")


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()

