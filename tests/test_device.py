"""Device-correct by construction: every model forward reads inputs on the device of the
model that runs it, because one place moves a batch there (``ModelRunner.inputs``) and every
tensor a node makes is made on its inputs' device.

A CPU has one device, so each worker is given a sentinel device instead: moving a batch to
it tags every tensor with the worker's own tensor subclass, which everything computed from
those tensors inherits (torch's ``__torch_function__``). A forward pre-hook on every model
checks that each tensor it reads carries its own worker's tag. A tensor made without its
input's device (``torch.zeros(n)``), a batch a node moved by hand (``.to(worker.device)``
fails on a sentinel) or one that skipped the runner base fails the test.
tests/test_cuda.py runs the same pipelines on a real GPU when there is one.
"""

import pytest
import torch

from rlflow.batch import Batch
from rlflow.engine import Run
from rlflow.graph import build

import spmd_worker

pytestmark = pytest.mark.filterwarnings("ignore::rlflow.rules.RuleWarning")


class Sentinel:
    """A stand-in device: tensors 'on' it are instances of its own subclass of Tensor."""

    def __init__(self, name: str):
        self.name = name
        self.tag = type(f"On{name.title()}", (torch.Tensor,), {})

    def __repr__(self) -> str:
        return f"Sentinel({self.name})"


@pytest.fixture
def sentinel_moves(monkeypatch):
    """Batch.to(Sentinel) tags the batch's tensors; any other device is a real move."""
    real = Batch.to

    def to(self, device):
        if not isinstance(device, Sentinel):
            return real(self, device)
        for k, v in self.columns.items():
            if isinstance(v, torch.Tensor) and type(v) is not device.tag:
                self.columns[k] = v.as_subclass(device.tag)
        return self

    monkeypatch.setattr(Batch, "to", to)


def tensors(args, kwargs):
    for x in [*args, *kwargs.values()]:
        if isinstance(x, torch.Tensor):
            yield x


def watched(run: Run) -> tuple[dict, list]:
    """Give every worker a sentinel and a forward pre-hook; returns (forwards per worker, faults)."""
    calls, faults = {}, []
    for name, w in run.workers.items():
        w.device = Sentinel(name)
        calls[name] = 0

        def check(module, args, kwargs, name=name, tag=w.device.tag):
            calls[name] += 1
            faults.extend(f"{name} read {type(t).__name__} {tuple(t.shape)}" for t in tensors(args, kwargs) if type(t) is not tag)

        w.module.register_forward_pre_hook(check, with_kwargs=True)
        base = getattr(w.module, "base_model", None)  # the packed forwards call the transformer, then the head
        if base is not None and base is not w.module:
            base.register_forward_pre_hook(check, with_kwargs=True)
    return calls, faults


@pytest.mark.parametrize("pipeline", [spmd_worker.grpo(steps=1), spmd_worker.ppo(steps=1)], ids=["grpo", "ppo"])
def test_every_forward_reads_inputs_on_its_models_device(pipeline, sentinel_moves, tmp_path):
    run = Run(pipeline, build(pipeline), tmp_path / "run")
    run.setup()
    calls, faults = watched(run)
    run.train(1)
    assert not faults, faults[:5]
    assert all(n > 0 for n in calls.values()), calls  # every model ran (actor, ref, and critic for PPO)
