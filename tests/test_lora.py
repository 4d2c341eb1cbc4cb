"""LoRA through peft: only the adapter trains, the reference is the actor's own module
with its adapter disabled (no second copy), final/ holds the merged model and the adapter,
checkpoints hold the adapter and resume exactly. Uses builtin:tiny-arith-init (4 layers,
hidden 128, MLP 256) to stay fast."""

import json

import pytest
import torch
from pydantic import ValidationError

from rlflow import Advantage, Generate, LoRA, Loss, Model, Pipeline, Prompts, RefLogprob, Score
from rlflow.engine import Run
from rlflow.graph import build

INIT = "builtin:tiny-arith-init"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def length(response, row):
    """A reward with spread even for an untrained model."""
    return float(len(response))


def lora_grpo(lora=None, ref=None, **kw):
    actor = Model(INIT, train=True, lr=1e-2, grad_clip=None, lora=lora or LoRA(r=4, alpha=8))
    return Pipeline(
        name="t", data=Prompts("builtin:arith", batch_size=4), models={"actor": actor, "ref": ref or actor.frozen()},
        nodes=[Generate("actor", n=4, max_new_tokens=4), Score(rule=length), RefLogprob("ref"),
               Advantage("group_norm"), Loss("clip", kl_coef=0.04)],
        **{"steps": 1, "eval": None, **kw})


def run_of(pipeline, tmp_path, name="run"):
    run = Run(pipeline, build(pipeline), tmp_path / name)
    run.setup()
    return run


def adapter(run):
    return {n: p.detach().clone() for n, p in run.workers["actor"].module.named_parameters() if p.requires_grad}


# --- the spec ------------------------------------------------------------------------------------


def test_lora_spec_bounds_and_round_trip():
    m = Model(INIT, train=True, lora=LoRA(r=8, target_modules=ATTN))
    assert Model.model_validate(m.model_dump(mode="json")) == m
    assert LoRA().target_modules == "all-linear" and LoRA().r == 16 and LoRA().alpha == 32
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"target_modules": "all"}, {"rank": 8}):
        with pytest.raises(ValidationError):
            LoRA(**bad)
    with pytest.raises(ValidationError, match="lora is for language models"):
        Model(INIT, head="value", lora=LoRA())
    assert m.critic().lora is None  # a critic trains its whole backbone


def test_the_frozen_copy_of_a_lora_actor_is_its_shared_base():
    p = lora_grpo()
    assert p.shared_bases() == {"ref": "actor"}
    # optimizer settings of the frozen model do not matter; the weights it computes with do
    assert lora_grpo(ref=Model(INIT, lr=0.5)).shared_bases() == {"ref": "actor"}
    assert lora_grpo(ref=Model(INIT, precision="bf16")).shared_bases() == {}
    assert lora_grpo(ref=Model("builtin:tiny-arith")).shared_bases() == {}
    full = Model(INIT, train=True)
    assert not full.frozen().base_of(full)  # no adapter: the reference is a copy, as before


def test_a_frozen_model_with_an_adapter_that_is_no_base_is_rf015():
    stray = Model("builtin:tiny-arith", lora=LoRA())
    problems = build(lora_grpo(ref=stray)).problems
    assert [(p.code, p.node, p.field) for p in problems if p.code == "RF015"] == [("RF015", "ref", "lora")]
    assert not [p for p in build(lora_grpo()).problems if p.severity == "error"]


def test_graph_shows_the_adapter_and_the_shared_base():
    from rich.console import Console

    from rlflow.view import render_graph

    console = Console(width=160, color_system=None, record=True)
    console.print(render_graph(build(lora_grpo(lora=LoRA(r=4, alpha=8, target_modules=ATTN)))))
    text = console.export_text()
    assert "actor: builtin:tiny-arith-init  head=lm trainable lr=0.01 ZeRO-0 fp32" in text
    assert "└── LoRA r=4 alpha=8 dropout=0 on q_proj, k_proj, v_proj, o_proj" in text
    assert "ref: actor's base (adapter disabled, shared)  builtin:tiny-arith-init  head=lm frozen" in text


def test_compare_shows_the_adapter_as_one_setting():
    from rlflow.settings import diff

    full = lora_grpo().model_copy(update={"models": {"actor": Model(INIT, train=True, lr=1e-2, grad_clip=None),
                                                     "ref": Model(INIT, lr=1e-2, grad_clip=None)}})
    assert diff(full.to_config(), lora_grpo().to_config()) == [
        ("models.actor.lora", ["null", 'r=4, alpha=8, target_modules=all-linear, dropout=0'])]


# --- placement ---------------------------------------------------------------------------------------


def test_only_the_adapter_trains_and_is_in_the_optimizer(tmp_path):
    run = run_of(lora_grpo(lora=LoRA(r=4, target_modules=ATTN + ["gate_proj"])), tmp_path)
    w = run.workers["actor"]
    trained = {n for n, p in w.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    # 4 layers x (4 attention projections 128->128 + gate 128->256), each A [4, in] + B [out, 4]
    assert sum(p.numel() for p in w.module.parameters() if p.requires_grad) == 4 * (4 * 4 * 256 + 4 * 384)
    in_optimizer = {id(p) for g in w.engine.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in w.module.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in w.module.named_parameters()}
    run.train(1)
    moved = {n for n, p in w.module.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trained  # the base weights did not move; the adapter did


def test_reference_is_the_actors_module_and_its_logprobs_are_the_base_models(tmp_path):
    from rlflow.forward import response_logprobs
    from rlflow.models import place

    run = run_of(lora_grpo(), tmp_path)
    actor, ref = run.workers["actor"], run.workers["ref"]
    assert ref.module is actor.module and ref.engine is actor.engine and ref.base_of == "actor"
    run.train(1)  # lr 1e-2: the adapter is far from zero now
    batch, _, _ = run.experience()
    cols = [batch[c] for c in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")]
    base = place("base", Model(INIT))  # the base weights, loaded on their own
    with torch.no_grad():
        expected = response_logprobs(base.engine, *cols)
        tuned = response_logprobs(actor.engine, *cols)
    torch.testing.assert_close(batch["ref_logprobs"], expected, rtol=1e-5, atol=1e-5)
    assert (tuned - expected).abs().max() > 1e-3  # with the adapter on, the actor differs from its base
    with torch.no_grad():  # and leaving the reference's forward turned the adapter back on
        torch.testing.assert_close(response_logprobs(actor.engine, *cols), tuned, rtol=0, atol=0)


def test_sharing_the_base_keeps_one_copy_of_the_weights(tmp_path):
    def parameter_bytes(workers):
        seen = {p.data_ptr(): p.numel() * p.element_size() for w in workers.values() for p in w.module.parameters()}
        return sum(seen.values())

    shared = run_of(lora_grpo(), tmp_path, "shared")
    alone = Model(INIT, lr=0.5, precision="fp32")  # same weights, but written out: still shared
    assert parameter_bytes(shared.workers) == parameter_bytes({"actor": shared.workers["actor"]})
    assert run_of(lora_grpo(ref=alone), tmp_path, "alone").workers["ref"].base_of == "actor"


# --- outputs, checkpoints, resume --------------------------------------------------------------------------


def test_final_is_the_merged_model_and_final_adapter_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlflow.builtin import ensure_builtin
    from rlflow.forward import response_logprobs

    run = run_of(lora_grpo(), tmp_path)
    run.train(1)
    batch, _, _ = run.experience()
    cols = [batch[c] for c in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")]
    final = tmp_path / "run" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(merged, *cols), response_logprobs(run.workers["actor"].engine, *cols),
                                   rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in (final / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(str(ensure_builtin("tiny-arith-init")))
    by_peft = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload()
    for k, v in by_peft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("zero", [0, 3])
def test_checkpoint_holds_the_adapter_and_resume_continues_exactly(zero, tmp_path):
    from safetensors.torch import load_file

    # 3 uninterrupted steps == 2 steps, stop, resume from the step-2 checkpoint, 1 more step
    def pipeline():
        p = lora_grpo(seed=5, save_every=2, steps=3)
        actor = p.models["actor"].model_copy(update={"zero_stage": zero})
        return p.model_copy(update={"models": {"actor": actor, "ref": actor.frozen()}})

    full = run_of(pipeline(), tmp_path, "full")
    full.train(3)
    part = run_of(pipeline(), tmp_path, "part")
    part.train(2)
    ckpt = tmp_path / "part" / "checkpoints" / "step_2" / "actor"
    assert not (ckpt / "model.safetensors").exists()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))  # whole tensors, gathered under ZeRO-3
    assert {k.replace(".weight", ".default.weight") for k in saved} == set(adapter(part))
    assert all(v.numel() for v in saved.values())
    ds_module = torch.load(next((ckpt / "deepspeed" / "state").glob("*model_states.pt")), weights_only=False)["module"]
    assert set(ds_module) == set(adapter(part))  # DeepSpeed keeps the adapter, not the frozen base
    again = run_of(pipeline(), tmp_path, "part")
    assert again.resume() == 2
    again.train(3)
    with full.workers["actor"]._gathered(), again.workers["actor"]._gathered():
        for name, value in adapter(full).items():
            torch.testing.assert_close(adapter(again)[name], value, rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_refuses_an_adapter_of_other_settings(tmp_path):
    from rlflow.checkpoint import ResumeError, load

    run = run_of(lora_grpo(save_every=1), tmp_path, "r4")
    run.train(1)
    ckpt = tmp_path / "r4" / "checkpoints" / "step_1"
    fewer = run_of(lora_grpo(lora=LoRA(r=4, alpha=8, target_modules=ATTN)), tmp_path, "attention_only")
    with pytest.raises(ResumeError, match="0 of its weights missing, 24 others"):  # 4 layers x 3 MLP x (A, B)
        load(ckpt, fewer.workers)
    wider = run_of(lora_grpo(lora=LoRA(r=8, alpha=8)), tmp_path, "r8")
    with pytest.raises(ResumeError, match="the adapter does not fit this model"):
        load(ckpt, wider.workers)


def test_unknown_target_module_is_a_clear_error(tmp_path):
    from rlflow.models import ModelLoadError, place

    with pytest.raises(ModelLoadError, match=r"model 'actor': lora.target_modules=\['qkv'\]"):
        place("actor", Model(INIT, train=True, lora=LoRA(target_modules=["qkv"])))
