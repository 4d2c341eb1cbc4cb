"""rlflow.decoding: the written decoding step against the model's own forward, bit for bit,
and the prefill run once per distinct prompt (rlflow.forward.sample).

The reference is transformers' forward itself (``CachedForward``: ``model(...)`` with its own
KV cache), run on the same tokens; no tolerance: the written step must give the same floats.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import rlflow.decoding as decoding
import rlflow.forward as fwd
from rlflow.forward import CachedForward, _distinct_rows, _forward_last, _positions, prompt_generators, sample

PAD, EOS, VOCAB = 0, 1, 16


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2,
                            eos_token_id=EOS, pad_token_id=PAD)
        return GPT2LMHeadModel(config).eval()
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    return Qwen2ForCausalLM(config).eval()


def prompts(padded: bool):
    """[5, 6] prompts, left-padded (rows of 3 to 6 tokens) or all 6 tokens long."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    if padded:
        for row, pad in enumerate((3, 0, 1, 2, 0)):
            mask[row, :pad] = 0
            ids[row, :pad] = PAD
    return ids, mask


def precision(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False])
@torch.no_grad()
def test_written_step_gives_the_models_logits_bit_for_bit(kind, prec, padded):
    model = tiny(kind)
    ids, mask = prompts(padded)
    g = torch.Generator().manual_seed(2)
    with precision(prec):
        cache, _ = _forward_last(model, ids, mask, _positions(mask), logits_to_keep=1)
        written = decoding.written_step(model, copy.deepcopy(cache), 6)
        assert type(written) is {"gpt2": decoding.GPT2Step, "llama": decoding.LlamaStep, "qwen2": decoding.LlamaStep}[kind]
        own = CachedForward(model, cache, "cache")
        attention, position = mask, mask.sum(1)
        for step in range(5):
            if step == 2:  # rows leave the batch, one is repeated: both caches follow
                index = torch.tensor([0, 2, 2, 4])
                written.keep(index)
                own.keep(index)
                attention, position = attention[index], position[index]
            token = torch.randint(2, VOCAB, (len(attention),), generator=g)
            attention = torch.cat([attention, attention.new_ones(len(attention), 1)], dim=1)
            a, b = written(token, attention, position + step), own(token, attention, position + step)
            assert a.dtype == torch.float32 and a.shape == (len(attention), VOCAB)
            assert torch.equal(a, b), (step, (a - b).abs().max())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_samples_are_the_same_with_the_written_step_and_without(kind, prec, monkeypatch):
    model = tiny(kind, seed=3)
    ids, mask = prompts(padded=True)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    group = torch.arange(5).repeat_interleave(3)
    kw = dict(max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(decoding, "WRITTEN_STEP", on)
        with precision(prec):
            drawn = sample(model, ids, mask, temperature=0.9, generators=prompt_generators(0, 1, group), **kw)
            greedy = sample(model, ids, mask, greedy=True, **kw)
        outs.append((drawn, greedy))
    for a, b in zip(*outs):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
        assert torch.equal(a.response_mask, b.response_mask) and a.computed == b.computed
    assert outs[0][0].response_mask.sum() > 5 * 3  # responses longer than one token were compared


def test_known_models_decode_without_calling_their_forward():
    model = tiny("llama")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids, mask = prompts(padded=True)
    out = sample(model, ids, mask, max_new_tokens=6, greedy=True, eos_token_id=EOS, pad_token_id=PAD)
    assert out.response_ids.shape[1] > 2 and len(calls) == 1  # the prefill only


def test_models_it_cannot_follow_keep_their_own_forward():
    assert decoding._kind(tiny("gpt2")) is decoding.GPT2Step
    eager = tiny("llama")
    eager.config._attn_implementation = "eager"
    assert decoding._kind(eager) is None
    changed = tiny("gpt2")

    class Scaled(torch.nn.LayerNorm):  # a replaced module: the written step would skip its change
        def forward(self, x):
            return 2 * super().forward(x)

    changed.transformer.h[1].ln_2 = Scaled(32)
    assert decoding._kind(changed) is None
    dropout = tiny("gpt2")
    dropout.config.resid_pdrop = 0.1
    dropout.transformer.h[0].attn.resid_dropout.p = 0.1
    assert decoding._kind(dropout) is decoding.GPT2Step  # eval: dropout is off
    assert decoding._kind(dropout.train()) is None
    hooked = tiny("llama")
    hooked.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: o * 2)
    assert decoding._kind(hooked) is None
    sliding = tiny("qwen2")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert decoding._kind(sliding) is None


def test_a_lora_wrapped_model_keeps_its_own_forward():
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decoding._kind(wrapped) is None  # the wrapper
    assert decoding._kind(wrapped.base_model.model) is None  # its model, with LoRA layers in place of Linear


def test_distinct_rows_are_runs_of_equal_consecutive_prompts():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6], [4, 5, 6], [0, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1]] * 3 + [[1, 1, 1]] + [[0, 1, 1], [1, 1, 1]])  # the last: same ids, other mask
    distinct, copies = _distinct_rows(ids, mask)
    assert distinct.tolist() == [0, 3, 4, 5] and copies.tolist() == [0, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("written", [True, False])
def test_the_prefill_runs_once_per_prompt_and_changes_no_sample(written, monkeypatch):
    monkeypatch.setattr(decoding, "WRITTEN_STEP", written)
    model = tiny("llama", seed=4)
    ids, mask = prompts(padded=True)
    n = 4
    rows_ids, rows_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    group = torch.arange(5).repeat_interleave(n)
    kw = dict(max_new_tokens=8, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD)
    once = sample(model, rows_ids, rows_mask, generators=prompt_generators(0, 3, group), **kw)
    monkeypatch.setattr(fwd, "PREFILL_ONCE", False)
    every = sample(model, rows_ids, rows_mask, generators=prompt_generators(0, 3, group), **kw)
    assert torch.equal(once.response_ids, every.response_ids)
    torch.testing.assert_close(once.logprobs, every.logprobs, atol=1e-6, rtol=0)
    P = ids.shape[1]
    assert every.computed - once.computed == (5 * n - 5) * P  # the prefill of the 15 repeats not computed
    assert once.prompt_tokens == int(mask.sum()) and every.prompt_tokens == n * int(mask.sum())
    computed, useful = fwd.sampled_positions(once)
    assert useful <= computed


def test_a_placed_builtin_model_decodes_through_the_written_step():
    # DeepSpeed's placement (trained and frozen) leaves the modules as they were: no hook, no wrapper
    from rlflow import Model
    from rlflow.models import place

    spec = Model("builtin:tiny-arith-init", train=True)
    assert decoding._kind(place("actor", spec).module) is decoding.LlamaStep
    assert decoding._kind(place("ref", spec.frozen()).module) is decoding.LlamaStep


def test_sampling_no_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="no prompts"):
        sample(tiny("llama"), torch.zeros(0, 4, dtype=torch.long), torch.ones(0, 4, dtype=torch.long), max_new_tokens=4,
               greedy=True, eos_token_id=EOS, pad_token_id=PAD)
