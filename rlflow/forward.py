"""Model-facing maths the nodes share: encode, sample, score log-probs, read hidden states.

Works with any Hugging Face causal LM (``AutoModelForCausalLM``: ``LlamaForCausalLM``,
``GPT2LMHeadModel``, ...). Conventions (ALGORITHMS.md §0.1 and Part A §1–2):

* Prompts are **left-padded**: ``prompt_ids [B, P]``, ``prompt_mask [B, P]`` (1 on real
  tokens), so every prompt ends at column ``P-1`` and response token ``t`` sits at column
  ``P+t`` of the concatenated sequence.
* Responses are **right-padded**: ``response_ids [B, T]``, ``response_mask [B, T]``
  (float, 1 on generated tokens *including* the EOS, 0 on every token after it).
* Position ids are ``cumsum(attention_mask) - 1``, so a prompt's positions do not depend
  on how much padding its batch needs.
* Every log-prob is ``log_softmax(logits / temperature)`` over the full vocabulary at the
  temperature the response was sampled with (greedy: temperature 1), so the first PPO
  ratio is exactly 1. Top-k/top-p change which token is drawn, never its log-prob.

KV cache: transformers 5 names the forward keyword ``cache`` (``past_key_values`` is
deprecated and logs a warning). :func:`sample` takes the cache from the prefill output
and passes it back under whichever of the two names ``model.forward`` declares, so it is
warning-free on transformers 5 and still runs on 4.x.

No function here switches the model between train and eval mode: each runs in the mode
the caller left the model in (dropout, if any, stays as it is).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlflow.decoding import written_step
from rlflow.packing import Positions

Rule = Callable[[str, dict], float]


# ---------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------


def encode_prompts(tokenizer, texts: list[str], *, add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids ``[B, P]`` (long) and attention mask ``[B, P]`` (long).

    Padding uses ``tokenizer.pad_token_id``; the tokenizer's own ``padding_side`` is not
    changed (left padding is asked for in the call). Special tokens are added
    (``add_special_tokens=True``) exactly as the tokenizer is configured to add them: a
    Llama tokenizer prepends its BOS, GPT-2's and a bare character tokenizer add nothing.
    That is how the model saw text in pre-training, so it is the sensible default; a
    tokenizer configured to *append* EOS to every input should not be used for prompts.
    Text rendered by a chat template already holds its special tokens: pass
    ``add_special_tokens=False`` (as TRL does), or a Llama 3 prompt starts with two BOS.

    Raises ``ValueError`` for an empty list or a tokenizer without a pad token.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_prompts needs at least one prompt, got an empty list")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token) "
            "before encoding batched prompts"
        )
    enc = tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        padding=True,
        padding_side="left",
        return_attention_mask=True,
        return_tensors="pt",
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


def decode(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Text of each response: the tokens under the mask, special tokens (EOS) skipped."""
    lengths = (response_mask > 0).sum(dim=1).tolist()  # mask is a prefix of ones
    rows = [ids[:n] for ids, n in zip(response_ids.tolist(), lengths)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _check_left_padded(prompt_mask: torch.Tensor) -> None:
    if prompt_mask.dim() != 2 or prompt_mask.shape[1] == 0:
        raise ValueError(f"prompt_mask must be [B, P] with P >= 1, got shape {tuple(prompt_mask.shape)}")
    if not bool((prompt_mask[:, -1] > 0).all()):
        raise ValueError(
            "prompts must be left-padded with at least one real token per row: "
            "the last column of prompt_mask has zeros"
        )


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2-D attention mask: 0, 1, 2, ... over real tokens (padding → 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def _forward_params(model) -> set[str]:
    # a DeepSpeed engine passes keywords through to its module, a peft (LoRA) model to its base model
    return set(inspect.signature(_unwrapped(model).forward).parameters)


def _cache_from(output):
    """The KV cache of a model output, read under its transformers-5 name if present."""
    if "cache" in output:  # ModelOutput.__contains__; no deprecation warning
        return output["cache"]
    return output["past_key_values"]


def _token_logprob(scaled_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(scaled_logits)[tokens] as gather - logsumexp, without a [.., V] log-softmax."""
    chosen = scaled_logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - scaled_logits.logsumexp(dim=-1)


def _filter_top_k_top_p(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits of tokens outside the top-k, then outside the top-p nucleus, to -inf.

    Order as in Hugging Face ``generate`` (temperature → top-k → top-p); the nucleus is the
    smallest set of most-likely tokens whose (top-k renormalised) mass reaches ``top_p``,
    and always holds the most likely token.
    """
    logits = scaled_logits  # [B, V]
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # first token has mass_before 0 < top_p: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def _check_sampling(max_new_tokens: int, greedy: bool, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")


def _forward_last(model, ids, attention, positions, **kw):
    """One cached forward: (the KV cache, float logits of the last position [B, V])."""
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **kw)
    return _cache_from(out), out.logits[:, -1, :].float()


def _draw(scaled: torch.Tensor, greedy: bool, top_k: int, top_p: float, generator, generators, rows) -> torch.Tensor:
    """The next token of each decoding row from temperature-scaled logits [A, V]: argmax, or a
    draw (from ``generators``, one per row of the whole batch, when given: every row's
    generator draws, the rows ``rows`` [A] still decoding use theirs; else from ``generator``)."""
    if greedy:
        return scaled.argmax(dim=-1)
    probs = _filter_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return _inverse_cdf(probs, _uniforms(generators, probs.device)[rows])


def _uniforms(generators: list, device) -> torch.Tensor:
    """One U[0, 1) draw per row [B] (float64), each from its row's generator; consecutive rows
    that share a generator (a prompt's samples) take consecutive draws of it."""
    draws, start = [], 0
    while start < len(generators):
        end = start
        while end < len(generators) and generators[end] is generators[start]:
            end += 1
        draws.append(torch.rand(end - start, generator=generators[start], device=device, dtype=torch.float64))
        start = end
    return torch.cat(draws)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row [B] whose cumulative probability first exceeds ``u`` [B] times
    the row's total (a token of probability 0 is never drawn)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [B, V]
    x = (u * cdf[:, -1]).unsqueeze(1)  # [B, 1]
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


MASK64 = (1 << 64) - 1


def sample_seed(seed: int, step: int, prompt: int) -> int:
    """A 64-bit seed for the samples of global prompt ``prompt`` at ``step`` of a run seeded
    ``seed`` (SplitMix64 over the three): which process samples the prompt does not matter."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + prompt * 0x94D049BB133111EB + 1) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def prompt_generators(seed: int, step: int, group: torch.Tensor) -> list:
    """One generator per row, on ``group``'s device, seeded by (seed, step, the row's global
    prompt index ``group``); rows of one prompt share the same generator object."""
    made: dict[int, torch.Generator] = {}
    for g in group.tolist():
        if g not in made:
            made[g] = torch.Generator(device=group.device).manual_seed(sample_seed(seed, step, g))
    return [made[g] for g in group.tolist()]


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row is done: this rank's, or (``synced``) every rank's."""
    if not synced:
        return bool(done.all())
    from rlflow.dist import all_reduce_min

    return all_reduce_min(int(bool(done.all()))) == 1


@dataclass
class Sampled:
    """A batch of generated responses (ALGORITHMS.md §0.1).

    response_ids:  [B, T] long, right-padded with ``pad_token_id`` after the EOS.
    response_mask: [B, T] float, 1 on generated tokens including the EOS, 0 after.
    logprobs:      [B, T] float, log π(a_t|s_t) of ``logits / temperature`` over the full
                   vocabulary (not the top-k/top-p truncated one); greedy uses
                   temperature 1; 0 on padding.
    truncated:     [B] bool, True where no EOS was generated within ``max_new_tokens``.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    computed: int = 0  # positions the forwards computed: the prefill [U, P], then the decoding batch of each step
    prompt_tokens: int = 0  # real prompt tokens in the prefill (each distinct prompt once)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, greedy: bool = False, eos_token_id: int, pad_token_id: int,
           generator: torch.Generator | None = None, generators: list | None = None, synced: bool = False) -> Sampled:
    """Batched autoregressive sampling with a KV cache.

    One prefill forward over the left-padded prompts, then one forward of ``[A, 1]`` per new
    token against the cache (:func:`rlflow.decoding.written_step` for GPT-2 and the Llama
    family: the same logits, without the generic forward's per-call work; else the model's
    own forward, :class:`CachedForward`), for the A rows still decoding: finished rows leave the batch,
    with their cache, once they are a ``DROP_DONE_AT`` share of it (:func:`_drop_done`). A
    row stops at its first EOS (kept, with its log-prob and mask 1); later columns are
    ``pad_token_id`` with mask 0 and log-prob 0. The loop ends when every row is done or
    after ``max_new_tokens`` steps, so ``T`` is the longest response actually generated.

    ``greedy=True`` takes the argmax and reports log-probs at temperature 1 (``temperature``,
    ``top_k`` and ``top_p`` are ignored). Otherwise the token is drawn from
    ``softmax(filter(logits / temperature))``: by ``torch.multinomial`` from ``generator``
    (the global RNG when None), or, given ``generators`` (one per row, see
    :func:`prompt_generators`), by inverse CDF from the row's own generator, so that a row's
    tokens do not depend on the other rows. ``top_k=0`` and ``top_p=1`` disable those filters.
    ``synced=True`` (several processes) runs the loop until every rank's rows are done: every
    rank makes as many forwards (collective under ZeRO-3) and gets the same width ``T``.
    Every row's generator draws at every step, finished or not, so that a row's tokens do
    not depend on when the others finished. Inputs must be on the model's device; no grad.
    """
    _check_sampling(max_new_tokens, greedy, temperature, top_p, top_k)
    _check_left_padded(prompt_mask)
    if prompt_mask.shape[0] == 0:
        raise ValueError("sample: no prompts (prompt_ids and prompt_mask have 0 rows)")
    scale = 1.0 if greedy else float(temperature)

    batch, device = prompt_ids.shape[0], prompt_ids.device
    attention = prompt_mask.long()  # [A, P], grows by one column per step (A rows still decoding)
    first_position = attention.sum(dim=1)  # [B] position id of response token 0
    step_forward, logits, computed, prompt_tokens = _prefill(model, prompt_ids, attention, max_new_tokens)

    rows = torch.arange(batch, device=device)  # [A] the rows in the decoding batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
    ids_steps, lp_steps, mask_steps = [], [], []
    for step in range(max_new_tokens):
        scaled = logits / scale  # [A, V]
        live = ~done[rows]  # [A] rows still generating: this token is theirs (EOS included)
        token = torch.where(live, _draw(scaled, greedy, top_k, top_p, generator, generators, rows), pad_token_id)  # [A]
        lp = torch.where(live, _token_logprob(scaled, token), 0.0)  # [A] full-vocab log-prob
        ids_steps.append(pad.index_put((rows,), token))  # [B]
        lp_steps.append(torch.zeros(batch, device=device).index_put((rows,), lp))
        mask_steps.append(torch.zeros_like(done).index_put((rows,), live))
        done = done | (mask_steps[-1] & (ids_steps[-1] == eos_token_id))
        if step == max_new_tokens - 1 or _all_done(done, synced):
            break
        rows, token, attention = _drop_done(rows, done, token, attention, step_forward)
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        logits = step_forward(token, attention, first_position[rows] + step)
        computed += len(rows)

    return Sampled(response_ids=torch.stack(ids_steps, dim=1), response_mask=torch.stack(mask_steps, dim=1).float(),
                   logprobs=torch.stack(lp_steps, dim=1), truncated=~done, computed=computed,
                   prompt_tokens=prompt_tokens)


def _prefill(model, prompt_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int):
    """The prompts' forward: ``(the decoding step, float logits [B, V] of response token 0,
    positions computed, real prompt tokens computed)``. Each run of equal prompts (a prompt's
    samples) is computed once and its KV cache copied to every row of the run."""
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    distinct, copies = _distinct_rows(prompt_ids, attention)  # [U], [B]
    ids, attention = prompt_ids[distinct], attention[distinct]
    cache, logits = _forward_last(model, ids, attention, _positions(attention), **extra)  # [U, V]
    step_forward = written_step(model, cache, max_new_tokens) or CachedForward(model, cache, cache_kw)
    if len(distinct) < len(prompt_ids):
        step_forward.keep(copies)
        logits = logits[copies]
    return step_forward, logits, ids.numel(), int(attention.sum())


def _distinct_rows(prompt_ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distinct [U], copies [B])``: the first row of each run of equal consecutive prompts
    (ids and mask), and for every row the index into ``distinct`` of its run. The forwards of
    equal rows are equal, so the prefill runs once per run (``repeat_interleave``'d prompts,
    as Generate makes them, are runs of n)."""
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(dim=1) & (attention[1:] == attention[:-1]).all(dim=1)  # [B-1]
    if not PREFILL_ONCE:
        same[:] = False
    starts = torch.cat([same.new_ones(1), ~same])  # [B] a row that starts a run
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


DROP_DONE_AT = 0.125  # the decoding batch drops its finished rows once they are this share of it
PREFILL_ONCE = True  # False: the prefill runs on every row, equal prompts too (benchmarks only)


class CachedForward:
    """One decoding step through the model's own forward against its KV cache (any
    architecture; :func:`rlflow.decoding.written_step` is the faster one for those it knows)."""

    def __init__(self, model, cache, cache_kw: str):
        self.model, self.cache, self.cache_kw = model, cache, cache_kw

    def __call__(self, token: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Float logits [A, V] after ``token`` [A] at ``positions`` [A] (``attention`` [A, L])."""
        self.cache, logits = _forward_last(self.model, token.unsqueeze(1), attention, positions.unsqueeze(1),
                                           **{self.cache_kw: self.cache})
        return logits

    def keep(self, index: torch.Tensor) -> None:
        """The decoding batch becomes rows ``index`` of it, repeats allowed (``Cache.batch_select_indices``)."""
        self.cache.batch_select_indices(index)


def _drop_done(rows: torch.Tensor, done: torch.Tensor, token: torch.Tensor, attention: torch.Tensor, step_forward):
    """``(rows, token, attention)`` of the decoding batch without its finished rows, and the
    decoding step's KV cache cut to match (``step_forward.keep``), once they are
    ``DROP_DONE_AT`` of it; else as they are. A copy of the cache costs about one decoding
    step's cache update."""
    keep = ~done[rows]  # [A]
    if int(keep.sum()) > (1.0 - DROP_DONE_AT) * len(rows) or not bool(keep.any()):  # (synced: others still decode)
        return rows, token, attention
    index = keep.nonzero().squeeze(1)  # [A']
    step_forward.keep(index)
    return rows[index], token[index], attention[index]


def sampled_positions(out: Sampled) -> tuple[int, int]:
    """``(computed, useful)`` positions of the :func:`sample` call that gave ``out``. Useful are
    the real prompt tokens of each distinct prompt and every response token but each row's
    last (which is drawn, never fed); the rest is left padding and finished rows not yet dropped."""
    r = (out.response_mask > 0).sum(1)
    return out.computed, out.prompt_tokens + int((r - 1).clamp(min=0).sum())


# ---------------------------------------------------------------------------------------
# Scoring a given response
# ---------------------------------------------------------------------------------------
#
# Every function below runs one forward over prompt+response. ``padding_free=True`` (the
# default) packs the batch's real tokens into a few rows (rlflow.packing: no padding
# inside a sequence, attention confined to each sequence by restarting position ids) and
# reads the outputs back into the [B, T] layout; ``padding_free=False`` runs the padded
# [B, P+T] batch as it is. The two compute the same function: they differ by float
# reassociation only (tested against each other, values and gradients). ``positions``,
# when given, is told how many positions the forward computed and how many were real.


def _joined(prompt_ids, prompt_mask, response_ids, response_mask):
    """Prompt+response ids, attention mask and position ids, each [B, P+T]."""
    _check_left_padded(prompt_mask)
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask.long(), (response_mask > 0).long()], dim=1)
    return ids, attention, _positions(attention)


def _unwrapped(model):
    """The Hugging Face module inside a DeepSpeed engine (or the module itself); of a peft
    (LoRA) model, its base model, whose layers carry the adapter (``disable_adapter`` still acts)."""
    inner = getattr(model, "module", model)
    base = getattr(inner, "get_base_model", None)
    return base() if base else inner


def _hidden_size(inner) -> Optional[int]:
    config = getattr(inner, "config", None)
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)


def _useful(prompt_mask: torch.Tensor, response_mask: torch.Tensor, read: str) -> int:
    """Real tokens a forward must see: prompt + response, less the last response token for
    ``read="next"`` (it predicts nothing read; a row without a response needs nothing)."""
    p, r = (prompt_mask > 0).sum(1), (response_mask > 0).sum(1)
    if read == "next":
        return int(torch.where(r > 0, p + r - 1, 0).sum())
    return int((p + r).sum())


def _packed_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, read: str, positions):
    """Final hidden states [R·L, H] of the packed batch (``base_model``, no head) and its layout."""
    from rlflow.packing import pack

    _check_left_padded(prompt_mask)
    inner = _unwrapped(model)
    packed = pack(prompt_ids, prompt_mask, response_ids, response_mask, read=read, pad_id=_filler(inner.config),
                  hidden=_hidden_size(inner))
    if positions is not None:
        positions.add(packed.computed, packed.useful)
    hidden = _last_hidden(inner, packed.ids, None, packed.positions)  # [R, L, H]
    return hidden.reshape(-1, hidden.shape[-1]), packed


def _filler(config) -> int:
    """A token id for the filler at the end of packed rows: any id works (each filler token is a
    sequence of its own, never read), but not the pad id, whose presence in the last column
    makes transformers warn about a missing attention mask."""
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None) or 2
    ids = [getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None), 0, 1]
    return next(t for t in ids if isinstance(t, int) and t != pad and 0 <= t < vocab)


def _lm_logits(inner, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits from final hidden states: its output embedding (the LM head),
    then Gemma-2's final soft-capping where the config has one. A model whose forward does
    more after its head should be run with ``padding_free=False``."""
    logits = inner.get_output_embeddings()(hidden)
    cap = getattr(inner.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float,
                     padding_free: bool, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits / temperature [M, V] float32, valid [B, T])``: the logits that predict each of
    the M response tokens (column ``P+t-1`` predicts token ``t``), in row-major order of
    ``valid``. Padded: only the last ``T+1`` positions' logits are computed when the model
    accepts ``logits_to_keep``; padding-free: only the M rows of the LM head are."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if padding_free:
        hidden, packed = _packed_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, "next", positions)
        logits = _lm_logits(_unwrapped(model), hidden[packed.index[packed.valid]])  # [M, V]
        return logits.float() / temperature, packed.valid
    ids, attention, pos = _joined(prompt_ids, prompt_mask, response_ids, response_mask)
    if positions is not None:
        positions.add(ids.numel(), _useful(prompt_mask, response_mask, "next"))
    n_resp = response_ids.shape[1]
    extra = {"logits_to_keep": n_resp + 1} if "logits_to_keep" in _forward_params(model) else {}
    out = model(input_ids=ids, attention_mask=attention, position_ids=pos, use_cache=False, **extra)
    valid = response_mask > 0
    return out.logits[:, -(n_resp + 1) : -1, :][valid].float() / temperature, valid  # [M, V]


def _to_rows(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token values [M] back to the [B, T] layout, 0 where ``valid`` is False (with grad)."""
    return torch.zeros(valid.shape, dtype=values.dtype, device=values.device).masked_scatter(valid, values)


def response_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    padding_free: bool = True,
    positions: Optional[Positions] = None,
) -> torch.Tensor:
    """``[B, T]`` log-probs of the response tokens under ``model``, 0 on padding.

    One forward over prompt+response; the logits at column ``P+t-1`` predict response
    token ``t``; they are divided by ``temperature`` and the token's log-prob is taken as
    ``logit - logsumexp(logits)`` (no ``[B, T, V]`` log-softmax). Only the response
    positions' logits are computed (see ``_response_logits``). Carries gradient when
    called with grad enabled; returns float32 whatever the model dtype.
    """
    logits, valid = _response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature,
                                     padding_free, positions)  # [M, V]
    return _to_rows(_token_logprob(logits, response_ids[valid]), valid)


def token_entropy(scaled_logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``H = -Σ_v π_v log π_v`` of ``softmax(scaled_logits)`` over the last dim.

    As ``logsumexp(z) - Σ_v softmax(z)_v z_v``: no ``[.., V]`` log-softmax is kept.
    """
    p = scaled_logits.softmax(dim=-1)
    return scaled_logits.logsumexp(dim=-1) - (p * scaled_logits).sum(dim=-1)


def response_logprobs_and_entropy(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    padding_free: bool = True,
    positions: Optional[Positions] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T] log-probs, [B, T] entropies)`` of the response tokens from ONE forward.

    The log-probs are exactly :func:`response_logprobs`. The entropy at token ``t`` is that
    of the policy's full-vocabulary distribution ``softmax(logits / temperature)`` at the
    state ``s_t`` the token was chosen from — the same logits, so the same temperature
    (ALGORITHMS.md Part A §1). Both are 0 on padding and float32.

    ``entropy_grad=False`` computes the entropy under ``no_grad`` (a metric): no extra
    ``[B, T, V]`` tensor is kept for the backward pass. ``entropy_grad=True`` lets it carry
    gradient (an entropy bonus in the loss); the softmax is then kept for backward.
    """
    logits, valid = _response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature,
                                     padding_free, positions)  # [M, V]
    lp = _to_rows(_token_logprob(logits, response_ids[valid]), valid)  # [B, T]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = _to_rows(token_entropy(logits), valid)  # [B, T]
    return lp, entropy


def _last_hidden(model, ids, attention, positions) -> torch.Tensor:
    """Final-layer hidden states [B, L, H] from the base model (after its final norm).

    ``model.base_model`` is the transformer without the LM head (``model.model`` for
    Llama, ``model.transformer`` for GPT-2); its ``last_hidden_state`` is exactly what
    the LM head reads, so no logits are computed. A bare base model works too. With no
    ``attention`` mask and restarting ``positions`` the rows are packed sequences.
    """
    base = getattr(model, "base_model", model)
    out = base(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
    return out.last_hidden_state


def last_token_hidden_state(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    padding_free: bool = True,
    positions: Optional[Positions] = None,
) -> torch.Tensor:
    """``[B, H]`` hidden state at the last valid response token, after it is read.

    Column ``P + L_i - 1`` with ``L_i = Σ_t response_mask[i, t]`` (the EOS when there is
    one, else the last token of a truncated response), for a scalar reward head. A row
    with an empty response falls back to the last prompt token. Read from
    ``model.base_model`` (see ``_last_hidden``).
    """
    if padding_free:
        hidden, packed = _packed_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, "last", positions)
        return hidden[packed.index]  # [B, H]
    ids, attention, pos = _joined(prompt_ids, prompt_mask, response_ids, response_mask)
    if positions is not None:
        positions.add(ids.numel(), _useful(prompt_mask, response_mask, "last"))
    hidden = _last_hidden(_unwrapped(model), ids, attention, pos)  # [B, P+T, H]
    last = prompt_ids.shape[1] + (response_mask > 0).sum(dim=1) - 1  # [B]
    index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------


def greedy_accuracy(
    model,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    rule: Rule,
    *,
    max_new_tokens: int,
    batch_size: int = 256,
    add_special_tokens: bool = True,
    device: torch.device | None = None,
    synced: bool = False,
) -> float:
    """Fraction of prompts whose greedy response scores ``> 0.5`` under ``rule``.

    ``rule(response_text, {"answer": answer, "prompt": prompt})`` is called once per
    prompt on the response decoded with ``skip_special_tokens=True``. Prompts go through
    :func:`encode_prompts` and :func:`sample` (greedy) in chunks of ``batch_size``, on the
    model's ``device`` (default: that of its parameters), in whatever train/eval mode the
    model is in; ``synced`` as in :func:`sample` (every rank evaluating the same prompts).
    """
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("greedy_accuracy needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; greedy decoding cannot stop")
    device = device or next(model.parameters()).device
    hits = 0
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = prompts[start : start + batch_size]
        chunk_answers = answers[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk_prompts, add_special_tokens=add_special_tokens)
        out = sample(
            model,
            ids.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            greedy=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            synced=synced,
        )
        texts = decode(tokenizer, out.response_ids, out.response_mask)
        for text, answer, prompt in zip(texts, chunk_answers, chunk_prompts):
            hits += float(rule(text, {"answer": answer, "prompt": prompt})) > 0.5
    return hits / len(prompts)


# ---------------------------------------------------------------------------------------
# Critic and reward heads
# ---------------------------------------------------------------------------------------


def _scalar_head(inner):
    """The scalar head of a token- or sequence-classification model (``score`` or ``classifier``)."""
    return getattr(inner, "score", None) or getattr(inner, "classifier", None)


def response_values(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    padding_free: bool = True,
    positions: Optional[Positions] = None,
) -> torch.Tensor:
    """``[B, T]`` critic values V(s_t) for a token-classification model with one label.

    The model's scalar output at column ``P+t-1`` (the state each response token is
    chosen from, ALGORITHMS.md §0.1), 0 on padding, float32. Carries gradient when grad
    is enabled. ``model`` may be wrapped (a DeepSpeed engine). Padding-free, the head
    (``score`` or ``classifier``; dropout is off in rlflow) is applied to the base model's
    hidden states at those positions only.
    """
    inner = _unwrapped(model)
    head = _scalar_head(inner)
    if padding_free and head is not None:
        hidden, packed = _packed_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, "next", positions)
        values = head(hidden[packed.index[packed.valid]]).squeeze(-1).float()  # [M]
        return _to_rows(values, packed.valid)
    ids, attention, pos = _joined(prompt_ids, prompt_mask, response_ids, response_mask)
    if positions is not None:
        positions.add(ids[:, :-1].numel(), _useful(prompt_mask, response_mask, "next"))
    n_resp = response_ids.shape[1]
    out = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], position_ids=pos[:, :-1])
    values = out.logits[:, -n_resp:, 0].float()  # [B, T]: columns P-1 .. P+T-2
    return torch.where(response_mask > 0, values, 0.0)


def sequence_scores(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    padding_free: bool = True,
    positions: Optional[Positions] = None,
) -> torch.Tensor:
    """``[B]`` reward-model scores.

    A sequence-classification model (``AutoModelForSequenceClassification``, one label):
    its head applied at the last valid response token — computed here rather than by the
    model's own pooling, which finds "the last non-pad token" and so breaks when
    pad == eos or prompts are left-padded.
    A causal LM (a likelihood reward model, ``Model(..., reward_from="likelihood")``): the
    summed log-prob of the response, log π(y|x).
    """
    inner = _unwrapped(model)
    head = _scalar_head(inner)
    kw = {"padding_free": padding_free, "positions": positions}
    if head is None:
        if getattr(inner, "get_output_embeddings", lambda: None)() is not None:
            return response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, **kw).sum(-1)
        raise ValueError(f"{type(inner).__name__} has no `score` or `classifier` head and is not a causal LM; "
                         "a reward model must be one of them")
    hidden = last_token_hidden_state(inner, prompt_ids, prompt_mask, response_ids, response_mask, **kw)  # [B, H]
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()
