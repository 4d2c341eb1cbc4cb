"""Padding-free scoring (rlflow.packing) computes the same function as the padded batch.

The padded path (``padding_free=False``) is the reference: one forward over the
left-padded prompts and right-padded responses. The packed path must give the same
log-probs, entropies, values, rewards, loss and gradients to float tolerance, on a
GPT-2 (learned absolute positions) and a Llama (rotary positions), with prompts and
responses of many lengths, an empty response, and several sequences per packed row.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2ForTokenClassification, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification)

from rlflow.nodes.masked import count
from rlflow.forward import (last_token_hidden_state, response_logprobs, response_logprobs_and_entropy,
                            response_values, sequence_scores)
from rlflow.packing import Positions, first_fit_decreasing, pack, row_width
from rlflow.spec import LOSSES

PAD, EOS, V = 0, 1, 16


def gpt2(cls=GPT2LMHeadModel, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=PAD, eos_token_id=EOS,
                     num_labels=1, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, classifier_dropout=0.0)
    return cls(cfg).eval()


def llama(cls=LlamaForCausalLM, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, num_labels=1)
    return cls(cfg).eval()


def batch(seed: int = 0, rows: int = 12, empty_row: bool = True):
    """Left-padded prompts (1..7 tokens), right-padded responses (0..9 tokens, EOS-ended or not)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(1, 8, (rows,), generator=g)
    r_len = torch.randint(1, 10, (rows,), generator=g)
    if empty_row:
        r_len[3] = 0
    P, T = int(p_len.max()), int(r_len.max())
    prompt_ids = torch.full((rows, P), PAD)
    prompt_mask = torch.zeros(rows, P, dtype=torch.long)
    response_ids = torch.full((rows, T), PAD)
    response_mask = torch.zeros(rows, T)
    for i in range(rows):
        p, r = int(p_len[i]), int(r_len[i])
        prompt_ids[i, P - p:] = torch.randint(2, V, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        response_ids[i, :r] = torch.randint(2, V, (r,), generator=g)
        if r and i % 2:
            response_ids[i, r - 1] = EOS
        response_mask[i, :r] = 1.0
    return prompt_ids, prompt_mask, response_ids, response_mask


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the layout ------------------------------------------------------------------------------


def test_first_fit_decreasing_fills_bins_longest_first():
    # items 5, 3, 4, 2, 2 into bins of 7: 5 -> bin 0, 4 -> bin 1, 3 -> bin 1 (4+3), 2 -> bin 0 (5+2), 2 -> bin 2
    bins, offsets, n = first_fit_decreasing([5, 3, 4, 2, 2], 7)
    assert n == 3
    assert bins == [0, 1, 1, 0, 2] and offsets == [0, 4, 0, 5, 0]
    assert first_fit_decreasing([0, 3], 3) == ([0, 0], [0, 0], 1)  # an empty item takes no room


def test_row_width_without_hidden_is_the_longest_and_with_it_packs_short_rows():
    assert row_width([3, 9, 4], None) == 9
    # wide model: attention is cheap beside the matmuls, so several sequences share a row
    assert row_width([9] + [5] * 30, hidden=4096) > 9  # at width 9 each row holds one 5 and 4 slots of filler


def test_pack_lays_out_each_sequence_contiguously_with_restarting_positions():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_ids = torch.tensor([[10, 11, 1], [12, 0, 0]])
    response_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    p = pack(prompt_ids, prompt_mask, response_ids, response_mask, read="next", hidden=None)
    # row 0 feeds 5 6 10 11 (its EOS predicts nothing read); row 1 feeds 7 8 9 (its only token is last)
    assert p.useful == 4 + 3
    seqs = {tuple(r[r != 0].tolist()) for r in p.ids}
    assert seqs == {(5, 6, 10, 11), (7, 8, 9)}
    flat_ids, flat_pos = p.ids.reshape(-1), p.positions.reshape(-1)
    # response token t is read where the sequence's position is p_i - 1 + t
    assert flat_pos[p.index[0]].tolist() == [1, 2, 3] and flat_ids[p.index[0]].tolist() == [6, 10, 11]
    assert flat_pos[p.index[1, 0]].item() == 2 and flat_ids[p.index[1, 0]].item() == 9
    assert p.valid.tolist() == [[True, True, True], [True, False, False]]
    last = pack(prompt_ids, prompt_mask, response_ids, response_mask, read="last", hidden=None)
    assert last.ids.reshape(-1)[last.index].tolist() == [1, 12]  # each row's last real token


def test_padding_is_under_five_percent_on_a_ragged_batch_and_counted():
    ids, mask, r_ids, r_mask = batch(rows=128, empty_row=False)
    p = pack(ids, mask, r_ids, r_mask, read="next", hidden=256)
    assert p.useful == int(mask.sum() + r_mask.sum() - 128)  # every prompt token, every response token but the last
    assert 1 - p.useful / p.computed < 0.05
    padded = ids.numel() + r_ids.numel()
    assert p.computed < 0.75 * padded  # the padded batch computes a third more


# --- the same function ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("hidden_override", [None, 4096], ids=["one-per-row", "several-per-row"])
def test_logprobs_entropy_and_their_gradients_match_the_padded_batch(make, hidden_override, monkeypatch):
    if hidden_override:  # pretend the model is wide, so that many sequences share each packed row
        monkeypatch.setattr("rlflow.forward._hidden_size", lambda inner: hidden_override)
    model = make()
    args = batch(seed=1)
    results = {}
    for padding_free in (False, True):
        model.zero_grad()
        pos = Positions()
        lp, ent = response_logprobs_and_entropy(model, *args, temperature=0.7, entropy_grad=True,
                                                padding_free=padding_free, positions=pos)
        (lp.sum() + 0.1 * ent.sum()).backward()
        results[padding_free] = (lp.detach(), ent.detach(), _grads(model), pos)
    (lp0, e0, g0, pos0), (lp1, e1, g1, pos1) = results[False], results[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    assert set(g0) == set(g1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)
    assert bool((lp1[args[3] == 0] == 0).all())  # 0 on padding, the empty row included
    assert pos1.useful == pos0.useful and pos1.computed < pos0.computed


def test_grpo_loss_and_gradient_match_the_padded_batch():
    # the loss the engine trains (clip + k3 KL in the loss, seq-mean-token-mean) on packed vs padded log-probs
    model = llama(seed=3)
    prompt_ids, prompt_mask, response_ids, response_mask = batch(seed=4, rows=16)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, padding_free=False)
    cols = {"response_mask": response_mask, "group": torch.arange(16) // 4,
            "old_logprobs": base + 0.05 * torch.randn(base.shape, generator=g) * response_mask,
            "ref_logprobs": base + 0.05 * torch.randn(base.shape, generator=g) * response_mask,
            "advantages": torch.randn(16, 1, generator=g).expand(-1, base.shape[1]) * response_mask}
    clip = LOSSES["clip"]
    counts = count(response_mask, cols["group"], constant=1.0)
    out = {}
    for padding_free in (False, True):
        model.zero_grad()
        lp, ent = response_logprobs_and_entropy(model, prompt_ids, prompt_mask, response_ids, response_mask,
                                                padding_free=padding_free)
        term = clip.fn({**cols, "logprobs": lp, "entropy": ent}, counts, eps=0.2, dual_clip=None, kl_coef=0.04, kl="k3",
                       entropy_coef=0.0, agg="seq-mean-token-mean")
        term.loss.backward()
        out[padding_free] = (term.loss.detach(), _grads(model), term.metrics)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-5)
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    for k, v in out[False][2].items():
        assert out[True][2][k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_values_and_their_gradients_match_the_padded_batch(make):
    model = make(cls=GPT2ForTokenClassification) if make is gpt2 else None
    if model is None:
        from transformers import LlamaForTokenClassification

        model = make(cls=LlamaForTokenClassification)
    args = batch(seed=2)
    got = {}
    for padding_free in (False, True):
        model.zero_grad()
        v = response_values(model, *args, padding_free=padding_free)
        (v ** 2).sum().backward()
        got[padding_free] = (v.detach(), _grads(model))
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-5, rtol=1e-5)
    for name, grad in got[False][1].items():
        torch.testing.assert_close(got[True][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_reward_scores_and_last_hidden_state_match_the_padded_batch():
    rm = llama(cls=LlamaForSequenceClassification, seed=6)
    args = batch(seed=7)
    torch.testing.assert_close(sequence_scores(rm, *args, padding_free=True), sequence_scores(rm, *args, padding_free=False),
                               atol=1e-5, rtol=1e-5)
    lm = gpt2(seed=8)
    torch.testing.assert_close(last_token_hidden_state(lm, *args, padding_free=True),
                               last_token_hidden_state(lm, *args, padding_free=False), atol=1e-5, rtol=1e-5)
    # a likelihood reward model: the summed log-prob, packed or not
    torch.testing.assert_close(sequence_scores(lm, *args, padding_free=True), sequence_scores(lm, *args, padding_free=False),
                               atol=1e-4, rtol=1e-5)
