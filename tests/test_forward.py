"""rlflow.forward on a tiny random Llama (no downloads).

The references here are written independently of rlflow.forward: a plain, uncached,
unpadded forward per prompt (``_reference_greedy``), and ``model(...).logits`` /
``hidden_states`` read directly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rlflow.forward import (
    Sampled,
    decode,
    encode_prompts,
    greedy_accuracy,
    last_token_hidden_state,
    prompt_generators,
    response_logprobs,
    response_logprobs_and_entropy,
    sample,
)

PAD, EOS = 0, 1
VOCAB = 16


def tiny_llama(seed: int = 0, eos_bias: float = 0.0) -> LlamaForCausalLM:
    """A 2-layer random Llama; ``eos_bias`` is added to the EOS logit to control lengths."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    if eos_bias:
        head = nn.Linear(config.hidden_size, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[EOS] = eos_bias
        model.lm_head = head
    return model.eval()


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# prompts of different lengths (tokens 2..15, never PAD or EOS)
PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14], [2], [15, 3, 9]]


def _reference_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by a full, uncached forward of the unpadded sequence at every step."""
    seq, ids, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            lps.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
            if token == EOS:
                break
    return ids, lps


def _draw(model, seed: int, **kw) -> Sampled:
    ids, mask = left_pad(PROMPTS * 4)
    kw.setdefault("max_new_tokens", 10)
    return sample(
        model, ids, mask, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(seed), **kw
    )


# ---------------------------------------------------------------------------------------
# (1) cached sampling log-probs == one full forward, with left padding
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 0.8)])
def test_sampled_logprobs_match_full_forward(temperature, top_k, top_p):
    model = tiny_llama(eos_bias=1.0)
    ids, mask = left_pad(PROMPTS * 4)
    out = _draw(model, 0, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12)
    assert out.response_mask.sum() > 2 * len(PROMPTS)  # really generated something
    full = response_logprobs(model, ids, mask, out.response_ids, out.response_mask, temperature=temperature)
    torch.testing.assert_close(out.logprobs, full, atol=1e-5, rtol=0)
    # and the temperature matters: at another temperature they differ
    other = response_logprobs(model, ids, mask, out.response_ids, out.response_mask, temperature=temperature + 0.5)
    assert (other - full).abs().max() > 1e-3


def test_response_logprobs_match_plain_forward_unpadded():
    # ground truth for one unpadded row: log_softmax(logits/τ) at column P+t-1, token at P+t
    model = tiny_llama()
    prompt, response = [3, 4, 5], [6, 7, EOS]
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0] / 0.7  # [6, V]
    expected = torch.stack([torch.log_softmax(logits[2 + t], -1)[tok] for t, tok in enumerate(response)])
    got = response_logprobs(
        model,
        torch.tensor([prompt]),
        torch.ones(1, 3, dtype=torch.long),
        torch.tensor([response]),
        torch.ones(1, 3),
        temperature=0.7,
    )
    torch.testing.assert_close(got[0], expected.detach(), atol=1e-5, rtol=0)


def test_entropy_matches_plain_forward_unpadded():
    # ground truth: H_t = -Σ_v p log p of softmax(logits/τ) at column P+t-1, the state token t is chosen from
    model = tiny_llama()
    prompt, response = [3, 4, 5], [6, 7, EOS]
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0] / 0.7  # [6, V]
    expected = torch.stack([-(torch.softmax(logits[2 + t], -1) * torch.log_softmax(logits[2 + t], -1)).sum() for t in range(3)])
    args = (torch.tensor([prompt]), torch.ones(1, 3, dtype=torch.long), torch.tensor([response]), torch.ones(1, 3))
    lp, ent = response_logprobs_and_entropy(model, *args, temperature=0.7)
    torch.testing.assert_close(ent[0], expected.detach(), atol=1e-5, rtol=0)
    assert bool((ent > 0).all()) and bool((ent <= torch.log(torch.tensor(float(VOCAB))) + 1e-5).all())  # 0 < H ≤ log V
    torch.testing.assert_close(lp, response_logprobs(model, *args, temperature=0.7), atol=0, rtol=0)  # the same log-probs


def test_logprobs_and_entropy_from_one_forward_padded_and_gradient():
    model = tiny_llama(eos_bias=1.0)
    out = _draw(model, 0, max_new_tokens=6)
    ids, mask = left_pad(PROMPTS * 4)
    args = (model, ids, mask, out.response_ids, out.response_mask)
    calls = []
    handle = model.base_model.register_forward_hook(lambda *a: calls.append(1))  # the transformer, head or not
    lp, ent = response_logprobs_and_entropy(*args, temperature=0.7)
    handle.remove()
    assert len(calls) == 1  # one forward for both
    torch.testing.assert_close(lp, response_logprobs(*args, temperature=0.7), atol=0, rtol=0)
    pad = out.response_mask == 0
    assert bool(pad.any()) and bool((ent[pad] == 0).all()) and bool((ent[~pad] > 0).all())
    # a metric by default (no grad, no [B,T,V] kept); with entropy_grad it carries gradient
    assert lp.requires_grad and not ent.requires_grad
    _, ent_g = response_logprobs_and_entropy(*args, temperature=0.7, entropy_grad=True)
    torch.testing.assert_close(ent_g.detach(), ent, atol=1e-6, rtol=0)
    (ent_g * out.response_mask).sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not response_logprobs_and_entropy(*args, entropy_grad=True)[1].requires_grad


# ---------------------------------------------------------------------------------------
# (2) EOS in the mask, padding after it, truncation
# ---------------------------------------------------------------------------------------


def test_eos_is_in_the_mask_and_everything_after_is_padding():
    model = tiny_llama(eos_bias=1.5)
    out = _draw(model, 4, max_new_tokens=8)  # a seed that gives both kinds of row
    ids, mask, lps = out.response_ids, out.response_mask, out.logprobs
    B, T = ids.shape
    assert mask.dtype == torch.float32 and ids.dtype == torch.long and out.truncated.dtype == torch.bool
    n_eos_rows = 0
    for i in range(B):
        row = ids[i].tolist()
        if EOS in row:
            end = row.index(EOS) + 1  # EOS included
            n_eos_rows += 1
            assert not out.truncated[i]
        else:
            end = T
            assert out.truncated[i] and T == 8  # truncated rows run to max_new_tokens
        assert mask[i, :end].eq(1).all() and mask[i, end:].eq(0).all()
        assert ids[i, end:].eq(PAD).all()
        assert lps[i, end:].eq(0).all() and (lps[i, :end] < 0).all()
    # the seed gives both kinds of row, so both branches above were exercised
    assert 0 < n_eos_rows < B
    assert int(mask.sum(1).max()) == T


def test_generation_stops_when_every_row_is_done():
    model = tiny_llama(eos_bias=4.0)  # EOS very likely: every row ends early
    out = _draw(model, 2, max_new_tokens=30)
    T = out.response_ids.shape[1]
    assert T < 30 and not out.truncated.any()
    assert int(out.response_mask.sum(1).max()) == T  # T is the longest response
    # the EOS sits at each row's last valid position
    last = out.response_mask.sum(1).long() - 1
    assert out.response_ids.gather(1, last[:, None]).eq(EOS).all()


# ---------------------------------------------------------------------------------------
# (3) reproducibility
# ---------------------------------------------------------------------------------------


def test_same_seed_same_samples_different_seed_different():
    model = tiny_llama(eos_bias=0.5)
    a, b, c = _draw(model, 7), _draw(model, 7), _draw(model, 8)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.response_ids.shape != c.response_ids.shape or not torch.equal(a.response_ids, c.response_ids)


def test_inverse_cdf_draws_by_probability_and_never_a_zero_probability_token():
    from rlflow.forward import _inverse_cdf

    probs = torch.tensor([[0.2, 0.0, 0.8]]).expand(6, 3)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.5, 0.9999, 1.0 - 1e-12], dtype=torch.float64)
    assert _inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 2, 2]


def test_a_prompts_samples_do_not_depend_on_the_other_rows():
    # per-prompt generators (seed, step, global prompt index): prompt 11's samples are the same
    # drawn alone or in a batch with other prompts (as on another rank), to the last token
    model = tiny_llama(eos_bias=0.5)
    prompts = [[2, 5, 6], [2, 7], [2, 9, 10, 11]]
    group = torch.tensor([10, 10, 11, 11, 12, 12])  # 2 samples of each prompt, ids as the data gives them
    ids, mask = left_pad([p for p in prompts for _ in range(2)])
    kw = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    batch = sample(model, ids, mask, generators=prompt_generators(7, 3, group), **kw)
    alone_ids, alone_mask = left_pad([prompts[1]] * 2)
    alone = sample(model, alone_ids, alone_mask, generators=prompt_generators(7, 3, group[2:4]), **kw)
    n = alone.response_ids.shape[1]
    assert torch.equal(batch.response_ids[2:4, :n], alone.response_ids)
    assert batch.response_mask[2:4, n:].sum() == 0
    torch.testing.assert_close(batch.logprobs[2:4, :n], alone.logprobs, atol=1e-6, rtol=0)
    other_step = sample(model, ids, mask, generators=prompt_generators(7, 4, group), **kw)
    assert not torch.equal(other_step.response_ids[:, :2], batch.response_ids[:, :2])  # a new step, new draws


# ---------------------------------------------------------------------------------------
# (4) top-k = 1 and a tiny top-p are greedy
# ---------------------------------------------------------------------------------------


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = tiny_llama(eos_bias=1.0)
    greedy = _draw(model, 0, greedy=True)
    # greedy log-probs are at temperature 1 whatever temperature is passed
    greedy_hot = _draw(model, 0, greedy=True, temperature=0.7)
    assert torch.equal(greedy_hot.response_ids, greedy.response_ids)
    torch.testing.assert_close(greedy_hot.logprobs, greedy.logprobs, atol=0, rtol=0)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        hot = _draw(model, 3, temperature=1.3, **kw)
        assert torch.equal(hot.response_ids, greedy.response_ids), kw
        cold = _draw(model, 3, temperature=1.0, **kw)  # at τ=1 the log-probs agree too
        torch.testing.assert_close(cold.logprobs, greedy.logprobs, atol=1e-6, rtol=0)
    # ...whereas plain sampling at that temperature does not follow greedy
    free = _draw(model, 3, temperature=1.3)
    assert free.response_ids.shape != greedy.response_ids.shape or not torch.equal(
        free.response_ids, greedy.response_ids
    )


def test_top_p_keeps_the_nucleus_only():
    # top_p=0.5 on a model whose first token is near-uniform: every drawn first token must
    # lie in the smallest set of most-likely tokens holding ≥ 0.5 of the mass.
    model = tiny_llama(seed=3)
    ids, mask = left_pad([[3, 4]] * 400)
    out = sample(model, ids, mask, max_new_tokens=1, top_p=0.5, eos_token_id=EOS, pad_token_id=PAD,
                 generator=torch.Generator().manual_seed(0))
    probs = model(input_ids=torch.tensor([[3, 4]])).logits[0, -1].softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    n_keep = int((sorted_p.cumsum(0) - sorted_p < 0.5).sum())
    nucleus = set(order[:n_keep].tolist())
    drawn = set(out.response_ids[:, 0].tolist())
    assert drawn == nucleus  # all of it (400 draws), and nothing outside it
    assert 1 < n_keep < VOCAB


# ---------------------------------------------------------------------------------------
# (5) a prompt alone == the same prompt inside a left-padded batch == uncached reference
# ---------------------------------------------------------------------------------------


def test_prompt_alone_and_in_padded_batch_agree_with_reference():
    model = tiny_llama(eos_bias=1.0)
    batch_ids, batch_mask = left_pad(PROMPTS)
    batch = sample(model, batch_ids, batch_mask, max_new_tokens=10, greedy=True, eos_token_id=EOS, pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, *left_pad([prompt]), max_new_tokens=10, greedy=True, eos_token_id=EOS,
                       pad_token_id=PAD)
        n = int(alone.response_mask.sum())
        assert int(batch.response_mask[i].sum()) == n
        assert torch.equal(batch.response_ids[i, :n], alone.response_ids[0, :n])
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=0)
        ref_ids, ref_lps = _reference_greedy(model, prompt, 10)
        assert alone.response_ids[0, :n].tolist() == ref_ids
        torch.testing.assert_close(alone.logprobs[0, :n], torch.tensor(ref_lps), atol=1e-5, rtol=0)
        assert bool(alone.truncated[0]) == (EOS not in ref_ids)


# ---------------------------------------------------------------------------------------
# (6) gradient
# ---------------------------------------------------------------------------------------


def test_gradient_flows_through_response_logprobs():
    model = tiny_llama()
    out = _draw(model, 0, max_new_tokens=6)
    ids, mask = left_pad(PROMPTS * 4)
    lp = response_logprobs(model, ids, mask, out.response_ids, out.response_mask, temperature=0.7)
    assert lp.requires_grad
    (lp * out.response_mask).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not response_logprobs(model, ids, mask, out.response_ids, out.response_mask).requires_grad


# ---------------------------------------------------------------------------------------
# (7) hidden states: alignment with a plain forward
# ---------------------------------------------------------------------------------------


def test_last_token_hidden_state_is_read_at_the_last_valid_token():
    model = tiny_llama(eos_bias=1.5)
    ids, mask = left_pad(PROMPTS * 4)
    out = _draw(model, 4, max_new_tokens=8)
    P, (B, T) = ids.shape[1], out.response_ids.shape
    full_ids = torch.cat([ids, out.response_ids], 1)
    full_mask = torch.cat([mask, out.response_mask.long()], 1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions,
                      output_hidden_states=True).hidden_states[-1]  # [B, P+T, H]
        last = last_token_hidden_state(model, ids, mask, out.response_ids, out.response_mask)
    assert last.shape == (B, 32)
    lengths = out.response_mask.sum(1).long()
    assert lengths.min() < T  # rows of different lengths
    expected_last = plain[torch.arange(B), P + lengths - 1]
    torch.testing.assert_close(last, expected_last, atol=1e-5, rtol=0)


def test_last_token_hidden_state_carries_gradient():
    model = tiny_llama()
    ids, mask = left_pad(PROMPTS)
    resp, rmask = torch.full((len(PROMPTS), 3), 5), torch.ones(len(PROMPTS), 3)
    h = last_token_hidden_state(model, ids, mask, resp, rmask)
    h.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# (8) encode / decode / greedy_accuracy with a character tokenizer
# ---------------------------------------------------------------------------------------

CHARS = "0123456789+=abcd"[: VOCAB - 2]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS} | {c: i + 2 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_encode_prompts_left_pads():
    tok = char_tokenizer()
    ids, mask = encode_prompts(tok, ["12+3=", "7="])
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[3, 4, 12, 5, 13], [PAD, PAD, PAD, 9, 13]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert tok.padding_side == "right"  # the tokenizer itself is left as it was


def test_decode_skips_eos_and_padding():
    tok = char_tokenizer()
    ids = torch.tensor([[3, 4, EOS, PAD], [5, 6, 7, 8]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0]])  # second row: the 4th token is masked
    assert decode(tok, ids, mask) == ["12", "345"]


def test_greedy_accuracy_counts_rule_hits():
    tok = char_tokenizer()
    model = tiny_llama(eos_bias=1.0)
    prompts = ["12+3=", "7=", "a+b=", "9", "44+1=", "b=", "0+0="]
    # ground truth: the uncached greedy response of each prompt, spelled by hand
    truth = []
    for p in prompts:
        ids, _ = _reference_greedy(model, [CHARS.index(c) + 2 for c in p], 6)
        truth.append("".join(CHARS[i - 2] for i in ids if i not in (PAD, EOS)))
    answers = [t if i % 2 == 0 else t + "x" for i, t in enumerate(truth)]  # 4 of 7 right
    seen = []

    def exact(text, info):
        seen.append((text, info["prompt"]))
        return 1.0 if text == info["answer"] else 0.0

    for batch_size in (256, 3):
        seen.clear()
        acc = greedy_accuracy(model, tok, prompts, answers, exact, max_new_tokens=6, batch_size=batch_size)
        assert acc == pytest.approx(4 / 7)
        assert seen == list(zip(truth, prompts))
    # "> 0.5" is strict
    assert greedy_accuracy(model, tok, prompts, answers, lambda t, i: 0.5, max_new_tokens=6) == 0.0


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_right_padded_prompts_are_refused():
    model = tiny_llama()
    ids = torch.tensor([[3, 4, PAD]])
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, ids, mask, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="left-padded"):
        response_logprobs(model, ids, mask, torch.tensor([[5]]), torch.ones(1, 1))


def test_finished_rows_leave_the_decoding_batch_and_change_nothing(monkeypatch):
    # greedy: the same responses and log-probs whether finished rows are dropped or decoded on
    import rlflow.forward as fwd

    model = tiny_llama(seed=0)  # greedy rows of lengths 1, 5 and 10: some end early, some run to the limit
    ids, mask = left_pad(PROMPTS * 4)
    kw = dict(max_new_tokens=10, greedy=True, eos_token_id=EOS, pad_token_id=PAD)
    dropped = sample(model, ids, mask, **kw)
    monkeypatch.setattr(fwd, "DROP_DONE_AT", 2.0)  # never drop
    kept = sample(model, ids, mask, **kw)
    assert torch.equal(dropped.response_ids, kept.response_ids) and torch.equal(dropped.response_mask, kept.response_mask)
    torch.testing.assert_close(dropped.logprobs, kept.logprobs, atol=1e-5, rtol=0)
    B, P, T = ids.shape[0], ids.shape[1], kept.response_ids.shape[1]
    assert kept.computed == B * P + B * (T - 1)  # every row decoded at every step
    assert dropped.computed < kept.computed and int(kept.truncated.sum()) < B  # some rows ended early, and left
