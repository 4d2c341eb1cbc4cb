"""Nothing lost, nothing let in, at run time: a non-finite loss or gradient never reaches
the weights; a signal or a failure in the update phase leaves the last finished step."""

import os
import signal

import pytest
import torch
from test_engine import grpo, run_of, weights

from rlflow.engine import NonFiniteUpdates, Observer, Stopped


def poison_loss(run, steps: set[int], how: str = "loss"):
    """Make the loss term non-finite at the given steps: its value (``loss``) or only its gradient (``grad``)."""
    runner = run.runners["loss"]
    term = runner.term

    def poisoned(cols, counts):
        t = term(cols, counts)
        if run.ctx.step in steps:
            if how == "loss":
                t.loss = t.loss * float("nan")
            else:  # finite value 0·0, infinite derivative of sqrt at 0 times 0: a NaN gradient
                lp = cols["logprobs"]
                t.loss = t.loss + 0.0 * (lp - lp.detach()).abs().sqrt().sum()
        return t

    runner.term = poisoned


@pytest.mark.parametrize("how,zero", [("loss", 0), ("grad", 0), ("loss", 2), ("grad", 2)],
                         ids=["loss-zero0", "grad-zero0", "loss-zero2", "grad-zero2"])
def test_a_non_finite_update_is_skipped_and_counted(how, zero, tmp_path):
    p = grpo(steps=3, mini_batches=1)
    models = {k: m.model_copy(update={"zero_stage": zero}) for k, m in p.models.items()}
    run = run_of(p.model_copy(update={"models": models}), tmp_path)
    poison_loss(run, {2}, how)
    seen = []
    real_step = run.workers["actor"].step

    def step(**kw):
        out = real_step(**kw)
        seen.append((run.ctx.step, out[1], weights(run).clone()))
        return out

    run.workers["actor"].step = step
    run.train(3)
    skipped = {s: flag for s, flag, _ in seen}
    assert skipped == {1: False, 2: True, 3: False}
    torch.testing.assert_close(seen[1][2], seen[0][2], rtol=0, atol=0)  # step 2 changed nothing
    assert not torch.equal(seen[2][2], seen[1][2])  # step 3 learned again
    assert all(torch.isfinite(w).all() for _, _, w in seen)
    recs = run.history
    assert [r["update/nonfinite_skipped/actor"] for r in recs] == [0.0, 1.0, 0.0]


def test_too_many_skipped_updates_stop_with_the_last_finite_weights(tmp_path):
    run = run_of(grpo(steps=6, max_skipped_steps=2, save_every=1), tmp_path)
    poison_loss(run, {3, 4, 5, 6})
    with pytest.raises(NonFiniteUpdates, match="the last 2 steps each skipped their update.*max_skipped_steps=2"):
        run.train(6)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_1", "step_2", "step_3", "step_4"]
    again = run_of(grpo(steps=6), tmp_path, "again")
    again.resume(tmp_path / "run" / "checkpoints" / "step_4")
    after_2 = run_of(grpo(steps=6), tmp_path, "after2")
    after_2.resume(tmp_path / "run" / "checkpoints" / "step_2")
    torch.testing.assert_close(weights(again), weights(after_2), rtol=0, atol=0)  # 3, 4 learned nothing
    assert torch.isfinite(weights(again)).all()


class SignalAt(Observer):
    """Sends ``sig`` to this process when step ``at`` ends (as a user or a scheduler would)."""

    def __init__(self, sig, at):
        self.sig, self.at, self.messages = sig, at, []

    def message(self, text):
        self.messages.append(text)

    def step(self, step, record):
        if step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_run_after_the_step_with_a_checkpoint(sig, tmp_path):
    run = run_of(grpo(steps=5), tmp_path)
    run.observer = obs = SignalAt(sig, 2)
    with pytest.raises(Stopped) as e:
        run.train(5)
    assert e.value.signum == sig
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "manifest.json").exists()
    assert any("continue with --resume" in m for m in obs.messages)
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(sig) != run  # handlers given back
    again = run_of(grpo(steps=5), tmp_path)
    assert again.resume() == 2


def test_ctrl_c_during_the_update_finishes_the_step_and_saves_it(tmp_path):
    run = run_of(grpo(steps=4), tmp_path)
    real_step = run.workers["actor"].step

    def step(**kw):
        if run.ctx.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the update
        return real_step(**kw)

    run.workers["actor"].step = step
    with pytest.raises(Stopped):
        run.train(4)
    assert (tmp_path / "run" / "checkpoints" / "step_3" / "manifest.json").exists()
    full = run_of(grpo(steps=3), tmp_path, "full")
    full.train(3)
    again = run_of(grpo(steps=4), tmp_path)
    assert again.resume() == 3
    torch.testing.assert_close(weights(again), weights(full), rtol=0, atol=0)


def test_a_failure_in_the_update_before_any_optimizer_step_saves_the_last_step(tmp_path):
    run = run_of(grpo(steps=4), tmp_path)
    runner = run.runners["loss"]
    term = runner.term

    def failing(cols, counts):
        if run.ctx.step == 3:
            raise RuntimeError("out of memory (simulated)")
        return term(cols, counts)

    runner.term = failing
    with pytest.raises(RuntimeError, match="simulated"):
        run.train(4)
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "manifest.json").exists()


def test_a_failure_after_an_optimizer_step_does_not_pretend_to_save_the_last_step(tmp_path):
    run = run_of(grpo(steps=4, ppo_epochs=2), tmp_path)
    run.observer = obs = SignalAt(None, -1)
    real_step = run.workers["actor"].step
    calls = {"n": 0}

    def step(**kw):
        calls["n"] += 1
        if calls["n"] == 6:  # step 3, second epoch: the weights already moved in step 3
            raise RuntimeError("device lost (simulated)")
        return real_step(**kw)

    run.workers["actor"].step = step
    with pytest.raises(RuntimeError, match="simulated"):
        run.train(4)
    assert not (tmp_path / "run" / "checkpoints").exists()  # step 2's weights are gone: nothing is labelled so
    assert any("after optimizer steps" in m for m in obs.messages)
