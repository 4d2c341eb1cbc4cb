"""The runtime on the tiny model: update invariance, reproducibility, filters, phases,
checkpoints, failures. Uses builtin:tiny-arith-init (no SFT needed) to stay fast."""

import json
import math
from pathlib import Path

import pytest
import torch

from rlflow import Advantage, Eval, Filter, Generate, Loss, Model, Phase, Pipeline, Prompts, RefLogprob, Score, Value
from rlflow.arith import signed_match
from rlflow.engine import RefillError, Run
from rlflow.graph import build

INIT = "builtin:tiny-arith-init"


def length(response, row):
    """A reward with spread even for an untrained model."""
    return float(len(response))


def grpo(agg="seq-mean-token-mean", micro=None, loss=None, **kw):
    actor = Model(INIT, train=True, lr=1e-3, micro_batch_size=micro, grad_clip=None)
    return Pipeline(
        name="t", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "ref": actor.frozen()},
        nodes=[Generate("actor", n=4, max_new_tokens=4), Score(rule=length), RefLogprob("ref"),
               Advantage("group_norm"), loss or Loss("clip", kl_coef=0.04, agg=agg)],
        **{"steps": 1, "eval": None, **kw})


def run_of(pipeline, tmp_path, name="run"):
    run = Run(pipeline, build(pipeline), tmp_path / name)
    run.setup()
    return run


def weights(run, model="actor"):
    return torch.cat([p.detach().flatten().clone() for p in run.workers[model].module.parameters()])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_update_is_invariant_to_micro_batch_size(agg, tmp_path):
    # Same seed -> same batch; the accumulated gradient of the mini-batch (what the
    # optimizer step sees) must not depend on how the batch is cut into micro-batches.
    grads = []
    for micro in (None, 4, 5):
        run = run_of(grpo(agg=agg, micro=micro), tmp_path, f"m{micro}")
        worker = run.workers["actor"]
        step = worker.step

        def capture(step=step, worker=worker, **kw):
            grads.append(torch.cat([p.grad.flatten().clone() for p in worker.module.parameters()]))
            return step(**kw)

        worker.step = capture
        run.train(1)
    assert grads[0].abs().max() > 0  # there was something to learn
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", [Loss("gspo", kl_coef=0.04, entropy_coef=0.01), Loss("sapo", entropy_coef=0.01, agg="token-mean")],
                         ids=["gspo", "sapo"])
def test_entropy_bonus_from_the_same_forward_is_invariant_to_micro_batch_size(loss, tmp_path):
    # the entropy term's gradient flows through the model like the log-probs' and is cut
    # into micro-batches the same way; every policy loss logs entropy/mean and ppo_kl
    grads = []
    for micro in (None, 4, 5):
        run = run_of(grpo(loss=loss, micro=micro), tmp_path, f"m{micro}")
        worker = run.workers["actor"]
        step = worker.step

        def capture(step=step, worker=worker, **kw):
            grads.append(torch.cat([p.grad.flatten().clone() for p in worker.module.parameters()]))
            return step(**kw)

        worker.step = capture
        run.train(1)
        rec = json.loads((tmp_path / f"m{micro}" / "metrics.jsonl").read_text().splitlines()[0])
        assert rec["entropy/mean"] > 0 and rec["loss/entropy"] < 0 and abs(rec["ppo_kl"]) < 1e-4  # first update: ρ ≈ 1
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-6, rtol=1e-4)


def test_seeded_runs_are_reproducible(tmp_path):
    a = run_of(grpo(seed=3), tmp_path, "a")
    a.train(2)
    b = run_of(grpo(seed=3), tmp_path, "b")
    b.train(2)
    torch.testing.assert_close(weights(a), weights(b), rtol=0, atol=0)
    la = [json.loads(x)["reward/mean"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["reward/mean"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_one_process_skips_deepspeeds_gradient_allreduce_and_trains_the_same(tmp_path):
    # with one rank the all-reduce is a copy and a division by 1: skipped, the weights the same
    a = run_of(grpo(seed=3, steps=2), tmp_path, "a")
    assert a.workers["actor"].engine.enable_backward_allreduce is False
    a.train(2)
    b = run_of(grpo(seed=3, steps=2), tmp_path, "b")
    b.workers["actor"].engine.enable_backward_allreduce = True
    reduced = []
    allreduce = b.workers["actor"].engine.allreduce_gradients
    b.workers["actor"].engine.allreduce_gradients = lambda *x, **k: reduced.append(1) or allreduce(*x, **k)
    b.train(2)
    assert len(reduced) == 2 and not torch.equal(weights(b), weights(run_of(grpo(seed=3), tmp_path, "init")))
    torch.testing.assert_close(weights(a), weights(b), rtol=0, atol=0)


def test_run_outputs_and_final_model_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    run = run_of(grpo(save_every=1), tmp_path)
    run.train(1)
    out = tmp_path / "run"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["nodes"][0]["kind"] == "generate" and cfg["nodes"][-1]["variant"] == "clip"
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/mean", "loss/pg", "kl/mean", "clip_frac", "response_length/mean", "grad_norm/actor"):
        assert key in rec, key
    assert set(rec["nodes"]) == {"generate", "score", "ref_logprob", "advantage", "loss"}
    assert rec["nodes"]["generate"]["tokens"] > 0
    assert (out / "samples.jsonl").read_text().strip()
    assert (out / "checkpoints" / "step_1" / "manifest.json").exists()
    assert not list((out / "checkpoints").glob("*.tmp"))
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    torch.testing.assert_close(torch.cat([p.flatten() for p in m.parameters()]), weights(run))


def test_dynamic_sampling_refills_to_the_target(tmp_path):
    actor = Model(INIT, train=True, lr=1e-3)
    p = Pipeline(name="d", data=Prompts("builtin:arith", batch_size=3), models={"actor": actor},
                 nodes=[Generate("actor", n=4, max_new_tokens=4),
                        Score(rules={"r": (lambda resp, row: float(len(resp) % 2), 1.0)}),
                        Filter("dynamic", target_groups=3, max_rounds=50), Advantage("group_norm"), Loss("clip")],
                 steps=1, eval=None)
    run = run_of(p, tmp_path)
    batch, times, metrics = run.experience()
    assert torch.unique(batch["group"]).numel() == 3 and len(batch) == 12
    # every kept group has spread in its reward
    for g in torch.unique(batch["group"]):
        assert batch["rewards"][batch["group"] == g].std() > 0
    assert metrics["filter/rounds"] >= 1


def test_dynamic_sampling_averages_every_reward_part_over_the_rounds(tmp_path):
    """reward/<rule> is averaged over every refill round like reward/mean, so the parts still
    add up to the mean (weights 1): the first round scores 1 everywhere (every group dropped)."""
    calls = []

    def first_round_uniform(resp, row):
        calls.append(1)
        return 1.0 if len(calls) <= 12 else float(len(resp) % 2)

    actor = Model(INIT, train=True, lr=1e-3)
    p = Pipeline(name="d", data=Prompts("builtin:arith", batch_size=3), models={"actor": actor},
                 nodes=[Generate("actor", n=4, max_new_tokens=4),
                        Score(rules={"a": (first_round_uniform, 1.0), "b": (lambda resp, row: 0.5, 1.0)}),
                        Filter("dynamic", metric="rewards_a", target_groups=3, max_rounds=50), Advantage("group_norm"),
                        Loss("clip")], steps=1, eval=None)
    _, _, metrics = run_of(p, tmp_path).experience()
    assert metrics["filter/rounds"] >= 2
    assert metrics["reward/a"] < 1.0  # not the first round's alone, nor any single round's
    assert metrics["reward/mean"] == pytest.approx(metrics["reward/a"] + metrics["reward/b"], abs=1e-6)


def test_dynamic_sampling_out_of_rounds_is_a_clear_error(tmp_path):
    actor = Model(INIT, train=True)
    p = Pipeline(name="d", data=Prompts("builtin:arith", batch_size=2), models={"actor": actor},
                 nodes=[Generate("actor", n=2, max_new_tokens=2), Score(rules={"const": (lambda r, row: 1.0, 1.0)}),
                        Filter("dynamic", max_rounds=2), Advantage("group_norm"), Loss("clip")], steps=1, eval=None)
    run = run_of(p, tmp_path)
    with pytest.raises(RefillError, match="0 of 2 groups kept after 2 rounds"):
        run.experience()


def test_phase_trains_only_the_critic(tmp_path):
    actor = Model(INIT, train=True, lr=1e-3)
    p = Pipeline(name="v", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "critic": actor.critic(lr=1e-3)},
                 nodes=[Generate("actor", n=1, max_new_tokens=4), Score(rule=signed_match), Value("critic"),
                        Advantage("gae", lambda_critic=1.0), Loss("clip"), Loss("value", model="critic", name="vl")],
                 phases=[Phase(steps=1, train=["critic"])], steps=2, eval=None)
    run = run_of(p, tmp_path)
    a0, c0 = weights(run), weights(run, "critic")
    run.ctx.step = 1
    batch, times, _ = run.experience()
    run.update(batch, times)
    assert torch.equal(weights(run), a0)  # the actor is frozen during the phase
    assert not torch.equal(weights(run, "critic"), c0)
    run.ctx.step = 2
    batch, times, _ = run.experience()
    run.update(batch, times)
    assert not torch.equal(weights(run), a0)  # after it, both learn


def test_the_end_of_value_pretraining_reports_the_critics_explained_variance(tmp_path):
    from test_checkpoint import Messages

    actor = Model(INIT, train=True, lr=1e-3)
    p = Pipeline(name="v", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "critic": actor.critic(lr=1e-3)},
                 nodes=[Generate("actor", n=1, max_new_tokens=4), Score(rule=signed_match), Value("critic"),
                        Advantage("gae", lambda_critic=1.0), Loss("clip"), Loss("value", model="critic", name="vl")],
                 phases=[Phase(steps=2, train=["critic"])], steps=3, eval=None)
    seen = Messages()
    run = Run(p, build(p), tmp_path / "run", observer=seen)
    run.setup()
    summary = run.train()
    ev = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])["value/explained_variance"]
    assert summary["phases"] == [{"phase": 0, "steps": [1, 2], "train": ["critic"], "value/explained_variance": ev}]
    assert any(line.startswith("phase 0 (steps 1-2, trains critic) ended: value/explained_variance") for line in seen.lines)


@pytest.mark.parametrize("rule, words", [
    (lambda r, row: 1 / 0, "raised ZeroDivisionError"),
    (lambda r, row: float("nan"), "not a finite number"),
    (lambda r, row: "yes", "not a finite number"),
])
def test_failing_reward_rule_names_the_sample(rule, words, tmp_path):
    from rlflow.nodes.score import RewardRuleError

    actor = Model(INIT, train=True)
    p = Pipeline(name="r", data=Prompts("builtin:arith", batch_size=2), models={"actor": actor},
                 nodes=[Generate("actor", n=2, max_new_tokens=2), Score(rules={"bad": rule}), Advantage("group_norm"), Loss("clip")],
                 steps=1, eval=None)
    run = run_of(p, tmp_path)
    with pytest.raises(RewardRuleError, match=words) as e:
        run.experience()
    assert "on response" in str(e.value) and "'answer'" in str(e.value)


def test_hanging_reward_rule_is_stopped(tmp_path):
    import time

    from rlflow.nodes.score import RewardRuleError

    actor = Model(INIT, train=True)
    p = Pipeline(name="h", data=Prompts("builtin:arith", batch_size=1), models={"actor": actor},
                 nodes=[Generate("actor", n=2, max_new_tokens=2), Score(rules={"slow": lambda r, row: time.sleep(60) or 1.0}, rule_timeout_s=0.2),
                        Advantage("group_norm"), Loss("clip")], steps=1, eval=None)
    run = run_of(p, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(RewardRuleError, match="hung"):
        run.experience()
    assert time.perf_counter() - t0 < 30  # the rule sleeps 60 s: it was stopped


def test_resume_continues_exactly(tmp_path):
    # 3 uninterrupted steps == 2 steps, stop, resume from the step-2 checkpoint, 1 more step
    full = run_of(grpo(seed=5, save_every=2, steps=3), tmp_path, "full")
    full.train(3)
    part = run_of(grpo(seed=5, save_every=2, steps=3), tmp_path, "part")
    part.train(2)
    again = run_of(grpo(seed=5, save_every=2, steps=3), tmp_path, "part")
    assert again.resume() == 2
    again.train(3)
    torch.testing.assert_close(weights(again), weights(full), rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_local_model_directory_loads_like_a_builtin(tmp_path):
    # The path a user gives (a directory saved with save_pretrained) takes the same code.
    from rlflow.builtin import ensure_builtin

    local = str(ensure_builtin("tiny-arith-init"))
    p = grpo().model_copy(update={"models": {"actor": Model(local, train=True), "ref": Model(local)}})
    run = run_of(p, tmp_path)
    run.train(1)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_preference_pairs_from_jsonl_train_dpo(tmp_path):
    import json as js

    from rlflow import Pairs

    rows = [{"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(2 * a + 1)} for a in range(10, 22)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(js.dumps(r) + "\n" for r in rows))
    actor = Model(INIT, train=True, lr=1e-3)
    p = Pipeline(name="dpo", data=Pairs(str(path), batch_size=4, eval_source=str(path)), models={"actor": actor, "ref": actor.frozen()},
                 nodes=[RefLogprob("ref"), Loss("dpo", beta=0.5)], steps=5, eval=Eval(size=12))
    run = run_of(p, tmp_path)
    summary = run.train(5)
    assert "eval/preference_accuracy" in summary["eval_after"]
    losses = [js.loads(x)["loss/dpo"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > 0.69 and min(losses[1:]) < losses[0]  # log 2 at the start, then it moves


@pytest.mark.parametrize("reward_from", ["classifier", "likelihood"])
def test_reward_model_trained_then_used_by_path_in_ppo(reward_from, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlflow import Pairs

    rm = Model(INIT, head="reward", reward_from=reward_from, train=True, lr=1e-3)
    p = Pipeline(name="rm", data=Pairs("builtin:arith", batch_size=8), models={"rm": rm},
                 nodes=[Loss("bradley_terry", model="rm")], steps=2, eval=Eval(size=16))
    summary = run_of(p, tmp_path, "rm").train(2)
    assert "eval/rm_accuracy/rm" in summary["eval_after"]
    final = tmp_path / "rm" / "final"
    auto = AutoModelForSequenceClassification if reward_from == "classifier" else AutoModelForCausalLM
    auto.from_pretrained(final)  # a standard HF model directory

    actor = Model(INIT, train=True)
    ppo = Pipeline(name="ppo", data=Prompts("builtin:arith", batch_size=4),
                   models={"actor": actor, "critic": actor.critic(), "rm": Model(str(final), head="reward", reward_from=reward_from)},
                   nodes=[Generate("actor", n=1, max_new_tokens=4), Score(model="rm"), Value("critic"), Advantage("gae"),
                          Loss("clip"), Loss("value", model="critic", name="value_loss")], steps=1, eval=None)
    run = run_of(ppo, tmp_path, "ppo")
    batch, _, metrics = run.experience()
    assert "reward/model" in metrics and batch["rewards"].abs().sum() > 0
    upd = run.update(batch)
    assert math.isfinite(upd["loss/pg"]) and math.isfinite(upd["loss/value"]) and upd["grad_norm/critic"] > 0


def test_recomputed_old_logprobs_match_the_sampling_pass(tmp_path):
    p = grpo()
    p = p.model_copy(update={"nodes": [Generate("actor", n=4, max_new_tokens=4, recompute_logprobs=True), *p.nodes[1:]]})
    run = run_of(p, tmp_path)
    batch, _, _ = run.experience()
    assert batch["old_logprobs"].shape == batch["response_mask"].shape
    # the first ratio is 1: the loss's own forward equals the recomputed old log-probs exactly
    from rlflow.forward import response_logprobs

    w = run.workers["actor"]
    with torch.no_grad():
        lp = response_logprobs(w.engine, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
    torch.testing.assert_close(lp, batch["old_logprobs"], rtol=0, atol=1e-6)


def test_likelihood_reward_is_the_summed_response_logprob(tmp_path):
    from rlflow.forward import response_logprobs, sequence_scores

    run = run_of(grpo(), tmp_path)
    batch, _, _ = run.experience()
    m = run.workers["ref"].module
    args = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(m, *args), response_logprobs(m, *args).sum(-1))


def test_overlong_filter_masks_truncated_rows_out_of_the_loss(tmp_path):
    actor = Model(INIT, train=True, lr=1e-3)
    p = Pipeline(name="o", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor},
                 nodes=[Generate("actor", n=4, max_new_tokens=2), Score(rule=length), Filter("overlong"),
                        Advantage("group_norm"), Loss("clip", mask="loss_mask")], steps=1, eval=None)
    run = run_of(p, tmp_path)
    batch, _, metrics = run.experience()
    trunc = batch["truncated"].bool()
    assert trunc.any()  # an untrained model rarely stops within 2 tokens
    assert batch["loss_mask"][trunc].sum() == 0
    torch.testing.assert_close(batch["loss_mask"][~trunc], batch["response_mask"][~trunc])
    assert metrics["filter/truncated_masked"] == pytest.approx(float(trunc.float().mean()))
    run.update(batch)  # runs with the filtered mask


def test_dropout_is_disabled_on_placed_models(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlflow.arith import make_tokenizer

    d = tmp_path / "gpt2"
    tok = make_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=32,
                               resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)).save_pretrained(d)
    tok.save_pretrained(d)
    p = grpo().model_copy(update={"models": {"actor": Model(str(d), train=True), "ref": Model(str(d))}})
    run = run_of(p, tmp_path)
    mods = [m for m in run.workers["actor"].module.modules() if isinstance(m, torch.nn.Dropout)]
    assert mods and all(m.p == 0.0 for m in mods)
    run.train(1)  # a GPT-2 goes through the same code as the built-in Llama
    assert len(run.history) == 1 and math.isfinite(run.history[0]["loss/pg"])


def test_a_failing_step_leaves_a_checkpoint_to_resume_from(tmp_path):
    from rlflow.nodes.score import RewardRuleError

    calls = {"n": 0}

    def flaky(response, row):  # fails on the third step's scoring
        calls["n"] += 1
        if calls["n"] > 2 * 16:
            raise ValueError("the grader is down")
        return float(len(response))

    def pipe(rule):
        p = grpo(steps=3)
        return p.model_copy(update={"nodes": [p.nodes[0], Score(rules={"r": rule}), *p.nodes[2:]]})

    run = run_of(pipe(flaky), tmp_path)
    with pytest.raises(RewardRuleError, match="the grader is down"):
        run.train(3)
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "manifest.json").exists()
    full = run_of(pipe(length), tmp_path, "full")
    full.train(3)
    again = run_of(pipe(length), tmp_path)
    assert again.resume() == 2
    again.train(3)
    torch.testing.assert_close(weights(again), weights(full), rtol=0, atol=0)


def test_critic_initialised_from_a_reward_model(tmp_path):
    # A critic can start from a trained (classifier) reward model: its backbone and its
    # scalar head become the value model's (same parameter names and shapes).
    from rlflow import Pairs
    from rlflow.models import place

    rm = Model(INIT, head="reward", train=True, lr=1e-3)
    p = Pipeline(name="rm", data=Pairs("builtin:arith", batch_size=4), models={"rm": rm},
                 nodes=[Loss("bradley_terry", model="rm")], steps=1, eval=None)
    run = run_of(p, tmp_path, "rm")
    run.train(1)
    trained = run.workers["rm"].module
    critic = place("critic", Model(str(tmp_path / "rm" / "final")).critic())
    torch.testing.assert_close(critic.module.score.weight, trained.score.weight)
    torch.testing.assert_close(critic.module.model.embed_tokens.weight, trained.model.embed_tokens.weight)


def test_the_evaluated_and_saved_policy_is_the_trained_actor_not_the_frozen_sampler(tmp_path):
    # RFT samples from a frozen copy ("sampler"); the policy is the model the loss trains
    from transformers import AutoModelForCausalLM

    from rlflow.loader import apply_overrides, load_pipeline

    path = Path(__file__).parent.parent / "pipelines" / "rft.py"
    p = apply_overrides(load_pipeline(path), ["data.batch_size=4", "pipeline.eval=null", "actor.lr=1e-2"])
    run = run_of(p, tmp_path)
    assert run.policy == "actor" and run.evaluator.policy == "actor"
    sampler = weights(run, "sampler")
    run.train(2)
    assert not torch.equal(weights(run), sampler) and torch.equal(weights(run, "sampler"), sampler)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    torch.testing.assert_close(torch.cat([q.flatten() for q in final.parameters()]), weights(run))
