"""The one place where statistics cross processes.

The statistics that define the update (whitening moments, aggregation counts,
dynamic-sampling counts) go through :func:`all_reduce_sum`: a no-op in one process and a
sum all-reduce when ``torch.distributed`` is initialised with more than one rank.

Logged metrics are global too. A node returns each metric as a float that is one of
  * :class:`Mean` ``(Σx, n)`` -- a mean, added up exactly over micro-batches, refill rounds,
    mini-batches and ranks (a reward mean, a clip fraction, a loss);
  * :class:`Sum` -- a count or total, summed over rounds and ranks (groups seen, pairs);
  * :class:`Max` -- the largest over ranks (wall seconds: the slowest rank sets the pace);
  * another :class:`Stat` -- a statistic kept as the sums it is computed from;
  * a plain float -- a value every rank already shares (an all-reduced statistic, the
    learning rate, the gradient norm); combined by averaging.
:func:`reduce_metrics` gathers one step's metrics from every rank and gives plain floats.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union


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


def _backend_device():
    """Where the process group's collectives take their tensors: the GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all ranks, returning a new tensor on its device (the input is not modified)."""
    import torch.distributed as dist

    out = tensor.detach().clone()
    if world_size() > 1:
        moved = out.to(_backend_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out = moved.to(tensor.device)
    return out


def _all_reduce_int(value: int, op: str) -> int:
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_backend_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return int(t.item())


def all_reduce_min(value: int) -> int:
    """The smallest ``value`` over all ranks (the value itself in one process)."""
    return _all_reduce_int(value, "MIN")


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over all ranks (the value itself in one process)."""
    return _all_reduce_int(value, "MAX")


def gathered(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in one process). Small Python
    values only (metrics, group ids): they travel pickled between this run's own processes."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --- metrics that add up across ranks --------------------------------------------------------


class Stat(float):
    """A metric that reads as a float (its value) and adds up exactly over micro-batches,
    refill rounds, mini-batches and ranks: it keeps the sums its value is computed from.

    A subclass says how the value follows from the sums (:meth:`compute`) and, unless the
    sums simply add, how two combine (:meth:`plus`). Subclasses are module-level classes:
    they travel between this run's processes pickled.
    """

    def __new__(cls, *sums: float) -> "Stat":
        sums = tuple(float(x) for x in sums)
        self = super().__new__(cls, cls.compute(*sums))
        self.sums = sums
        return self

    @staticmethod
    def compute(*sums: float) -> float:
        raise NotImplementedError

    def plus(self, other: "Stat") -> "Stat":
        return type(self)(*(a + b for a, b in zip(self.sums, other.sums)))

    def __add__(self, other):  # a plain number added to a Stat is plain arithmetic
        return self.plus(other) if type(other) is type(self) else float(self) + other

    def __reduce__(self):
        return type(self), self.sums

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.sums} = {float(self)!r}"

    def __str__(self) -> str:
        return float.__repr__(self)


class Mean(Stat):
    """A mean kept as its sum and its count, ``Mean(Σx, n)`` (0 when ``n`` is 0)."""

    @staticmethod
    def compute(total: float, count: float) -> float:
        return total / count if count else 0.0


class Sum(Stat):
    """A count or a total: adds up over rounds and ranks."""

    @staticmethod
    def compute(total: float) -> float:
        return total


class Max(Stat):
    """The largest value over ranks (and over repeats): wall seconds."""

    @staticmethod
    def compute(value: float) -> float:
        return value

    def plus(self, other: "Stat") -> "Stat":
        return Max(max(self.sums[0], other.sums[0]))


class Lazy(NamedTuple):
    """A :class:`Stat` whose sums are still tensors (on the model's device): a node turns all
    of its metrics into Stats with one device sync (``kind(*floats)``)."""

    kind: type
    parts: tuple


Metric = Union[float, Stat]


def adds_up(metric: Metric) -> bool:
    """Whether ``metric`` adds up over runs and ranks (rather than being a plain float)."""
    return isinstance(metric, Stat)


def combine(values: list[Metric]) -> Metric:
    """One metric from several of the same kind: Stats add up (see each); plain floats are
    averaged."""
    if all(adds_up(v) for v in values):
        out = values[0]
        for v in values[1:]:
            out = out + v
        return out
    return sum(float(v) for v in values) / len(values)


def value(metric: Metric) -> float:
    """The plain float a metric stands for."""
    return float(metric)


def merge_metrics(per_rank: list[dict[str, Metric]]) -> dict[str, float]:
    """Every rank's metrics (in rank order) as one dict of floats (keys in first-seen order)."""
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    return {k: value(combine([m[k] for m in per_rank if k in m])) for k in keys}


def reduce_metrics(metrics: dict[str, Metric]) -> dict[str, float]:
    """This step's metrics of every rank, combined into global floats. Collective."""
    return merge_metrics(gathered(metrics))


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()
