"""The decoding step of :func:`rlflow.forward.sample`, written out for the architectures we know.

After the prefill, sampling runs one forward of ``[A, 1]`` tokens per new token. Through the
model's own ``forward`` each of those pays for work that does not depend on the token: the
mask and cache objects are rebuilt, the KV cache is copied whole to append one position
(``torch.cat``), and under CPU bf16 autocast every weight matrix is cast to bf16 again at
every call. On a small model that is most of a decoding step. :func:`written_step` returns,
for GPT-2 and the Llama family (Llama, Qwen2 with full attention), a step that does the
same arithmetic with the model's own modules and kernels — norms, activation, rotary
embedding and transformers' own sdpa attention function are called as they are — but keeps
the keys and values in buffers allocated once for the whole response, and casts each weight
matrix once per :func:`sample` call (to the autocast dtype, when autocast is on). Its logits
equal the model's forward bit for bit (tests/test_decoding.py), so samples do not change.

Any other model, and one it cannot be sure of — a LoRA-wrapped or otherwise replaced layer,
parameters partitioned by ZeRO-3, a hooked matmul layer, eager or flash attention, sliding
windows, active dropout — keeps the model's own forward (``written_step`` returns None). ``WRITTEN_STEP = False``
turns it off (``benchmarks/ab_step.py`` variant ``written_step=false``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

WRITTEN_STEP = True  # False: every architecture decodes through the model's own forward


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class _Step:
    """Keys and values of every layer in ``[B, heads, P + extra, head_dim]`` buffers filled
    from the prefill's cache; the weight matrices of the matmuls, cast once."""

    def __init__(self, model, cache, extra: int):
        self.model = model
        self.length = cache.layers[0].keys.shape[2]  # positions held
        self.keys = [self._buffer(layer.keys, extra) for layer in cache.layers]
        self.values = [self._buffer(layer.values, extra) for layer in cache.layers]
        self.dtype = _autocast_dtype(self.keys[0].device)  # what autocast would cast the matmuls to
        self.weights: dict[int, tuple] = {}

    @staticmethod
    def _buffer(cached: torch.Tensor, extra: int) -> torch.Tensor:
        b, h, p, d = cached.shape
        buffer = cached.new_empty(b, h, p + extra, d)
        buffer[:, :, :p] = cached
        return buffer

    def _matmul_weights(self, module) -> tuple:
        """``(weight, bias)`` of a Linear or Conv1D, cast to the autocast dtype once (autocast
        casts them to the same values at every call)."""
        got = self.weights.get(id(module))
        if got is None:
            w, b = module.weight, module.bias
            if self.dtype is not None:
                w = w.detach().to(self.dtype)
                b = None if b is None else b.detach().to(self.dtype)
            got = self.weights[id(module)] = (w, b)
        return got

    def mm(self, module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for a Linear or transformers' Conv1D, with the cast-once weights."""
        w, b = self._matmul_weights(module)
        if isinstance(module, torch.nn.Linear):
            return F.linear(x, w, b)
        out = torch.addmm(b, x.view(-1, x.size(-1)), w)  # Conv1D: weight [in, out]
        return out.view(*x.shape[:-1], out.shape[-1])

    def keep(self, index: torch.Tensor) -> None:
        """The decoding batch becomes rows ``index`` [A'] of it (repeats allowed)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def attend(self, attn, layer: int, q, k, v, mask):
        """Append ``k``, ``v`` [A, heads, 1, D] at the next position; transformers' sdpa
        attention of ``q`` [A, heads, 1, D] over the positions held: [A, 1, heads, D]."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        t = self.length
        self.keys[layer][:, :, t] = k[:, :, 0]
        self.values[layer][:, :, t] = v[:, :, 0]
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attn, q, self.keys[layer][:, :, :t + 1],
                                                 self.values[layer][:, :, :t + 1], mask, dropout=0.0,
                                                 scaling=attn.scaling)
        return out

    def __call__(self, token: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [A, V] (float) of the next token after ``token`` [A] at ``positions`` [A];
        ``attention`` [A, length + 1] marks the real positions, the new one included. The
        mask is what the model's forward gives sdpa: none without padding, else [A, 1, 1, L]."""
        mask = None if bool(attention.all()) else attention.bool()[:, None, None, :]
        logits = self.forward(token.unsqueeze(1), mask, positions.unsqueeze(1))
        self.length += 1
        return logits[:, -1, :].float()


class GPT2Step(_Step):
    """GPT-2 (``GPT2LMHeadModel``): learned positions, LayerNorm, fused qkv Conv1D."""

    def forward(self, ids, mask, positions):
        tr = self.model.transformer
        x = tr.wte(ids) + tr.wpe(positions)  # [A, 1, E]
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = self.mm(attn.c_attn, block.ln_1(x)).split(attn.split_size, dim=2)
            heads = (*q.shape[:-1], -1, attn.head_dim)  # [A, 1, H, D]
            out = self.attend(attn, i, q.view(heads).transpose(1, 2), k.view(heads).transpose(1, 2),
                              v.view(heads).transpose(1, 2), mask)
            x = self.mm(attn.c_proj, out.reshape(*out.shape[:-2], -1)) + x
            mlp = block.mlp
            x = x + self.mm(mlp.c_proj, mlp.act(self.mm(mlp.c_fc, block.ln_2(x))))
        return self.mm(self.model.lm_head, tr.ln_f(x))


class LlamaStep(_Step):
    """The Llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``): rotary positions, RMSNorm,
    separate q/k/v projections (grouped-query attention as transformers does it), gated MLP."""

    def forward(self, ids, mask, positions):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        x = inner.embed_tokens(ids)  # [A, 1, E]
        cos, sin = inner.rotary_emb(x, positions)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            heads = (*h.shape[:-1], -1, attn.head_dim)
            q = self.mm(attn.q_proj, h).view(heads).transpose(1, 2)
            k = self.mm(attn.k_proj, h).view(heads).transpose(1, 2)
            v = self.mm(attn.v_proj, h).view(heads).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = self.attend(attn, i, q, k, v, mask)
            x = x + self.mm(attn.o_proj, out.reshape(*out.shape[:-2], -1).contiguous())
            mlp = layer.mlp
            h = layer.post_attention_layernorm(x)
            x = x + self.mm(mlp.down_proj, mlp.act_fn(self.mm(mlp.gate_proj, h)) * self.mm(mlp.up_proj, h))
        return self.mm(self.model.lm_head, inner.norm(x))


def _hooked(modules) -> bool:
    """Whether any of ``modules`` has forward hooks (or accelerate's device hook): the written
    step reads their weights directly, so it would skip them."""
    return any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in modules)


def _kind(model) -> Optional[type]:
    """The written step for ``model``, if it is one we can follow exactly; else None."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP, Qwen2RMSNorm
    from transformers.pytorch_utils import Conv1D

    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3: weights gathered by hooks
        return None
    if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return None
    cls = type(model)
    if cls is GPT2LMHeadModel:
        if config.add_cross_attention:
            return None
        blocks = model.transformer.h
        mats = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        norms = [m for b in blocks for m in (b.ln_1, b.ln_2)] + [model.transformer.ln_f]
        if all(type(m) is Conv1D for m in mats) and all(type(m) is torch.nn.LayerNorm for m in norms) \
                and type(model.lm_head) is torch.nn.Linear and not _hooked(mats + [model.lm_head]):
            return GPT2Step
        return None
    family = {LlamaForCausalLM: (LlamaAttention, LlamaMLP, LlamaRMSNorm),
              Qwen2ForCausalLM: (Qwen2Attention, Qwen2MLP, Qwen2RMSNorm)}.get(cls)
    if family is None:
        return None
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return None
    attention, mlp, norm = family
    layers = model.model.layers
    mats = [m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                          layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                          layer.mlp.down_proj)] + [model.lm_head]
    parts_known = all(type(layer.self_attn) is attention and type(layer.mlp) is mlp
                      and type(layer.input_layernorm) is norm and type(layer.post_attention_layernorm) is norm
                      for layer in layers)
    if parts_known and type(model.model.norm) is norm and all(type(m) is torch.nn.Linear for m in mats) \
            and not _hooked(mats):
        return LlamaStep
    return None


def written_step(model, cache, extra: int) -> Optional[_Step]:
    """The written decoding step of ``model`` from the prefill's ``cache`` (transformers'
    ``Cache``), with room for ``extra`` more positions; None where the model's own forward
    must run (see the module docstring)."""
    if not WRITTEN_STEP or not hasattr(cache, "layers"):  # (transformers 4's tuple caches: the model's forward)
        return None
    kind = _kind(model)
    return None if kind is None else kind(model, cache, extra)
