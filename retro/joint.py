"""Joint chunked cross-attention: CCA inside the frozen decoder's own attention softmax (`RetroConfig.attention="joint"`).

A separate CCA block with its own softmax and a neighbour encoder trained from scratch has to learn where to look
before it can read; on a small retro-fit it learns to ignore its neighbours. Here the frozen decoder encodes each
neighbour itself (its hidden states over the neighbour's tokens, layer by layer), and each CCA layer's queries attend
their chunk's neighbours *in the same softmax* as their own context, through neighbour key/value projections that
start as copies of that layer's own. With its gate fully open a layer reads a chunk's neighbours as it would read
them written just before the chunk (as the GPT baseline reads them in its prompt), so reading starts from what the
pretrained attention already does, and RETRO's chunking and causal shift are kept: position p attends the neighbours
of chunk (p + 1) // m - 1 only.

Per layer and head a gate g (zero at step 0, so the model is exactly the base) blends the joint output in:
    out = base_out + tanh(g) * (joint_out - base_out)
and a score bias b is added to every neighbour key's score (how much a head trusts the neighbours over its own
context). Supported for decoders whose attention modules have q/k/v/o projections, an `input_layernorm` and rotary
positions from the model's `rotary_emb` (Llama, Mistral, Qwen2, SmolLM ...); others are refused with a reason.
Legend: B batch, T new tokens, S keys so far, H heads, G = H / kv heads, d head width, L chunks, K neighbours,
R neighbour length, m chunk size.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "retro_joint_"


def attention_modules(layers: nn.ModuleList) -> list[nn.Module]:
    """Each decoder layer's self-attention module, checked to be of the kind joint CCA can read through."""
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, name)]
        if attn is None or missing or not hasattr(layer, "input_layernorm"):
            raise ValueError(f"RetroConfig.attention='joint' reads neighbours through each layer's own attention and "
                             f"needs Llama-style layers (self_attn.q_proj/k_proj/v_proj/o_proj and input_layernorm); "
                             f"layer {i} ({type(layer).__name__}) lacks {missing or ['self_attn/input_layernorm']}. "
                             f"Use attention='separate' for this family")
        out.append(attn)
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the Llama convention): x (..., R, d), cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class JointCCA(nn.Module):
    """One layer's joint CCA: neighbour key/value projections (copies of the layer's own, trained), and per head a
    gate (`gate`, zero: exact base) and a neighbour score bias (`bias`)."""

    def __init__(self, attn: nn.Module, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        for proj in (attn.k_proj, attn.v_proj):
            if type(proj) is not nn.Linear:
                raise ValueError(f"RetroConfig.attention='joint' starts its neighbour projections as trainable copies "
                                 f"of each layer's k_proj/v_proj, which must be torch.nn.Linear; this base has "
                                 f"{type(proj).__name__} (a quantised base?). Retro-fit an unquantised base, or use "
                                 f"attention='separate'")
        self.head_dim = attn.q_proj.out_features // heads
        self.k_proj = copy.deepcopy(attn.k_proj)
        self.v_proj = copy.deepcopy(attn.v_proj)
        for p in self.parameters():
            p.requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(heads))
        self.bias = nn.Parameter(torch.zeros(heads))

    def project(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (N, R, D), already normed by the layer's input norm; cos/sin (N, R, d) -> keys, values
        (N, kv_heads, R, d), keys rotated to their positions."""
        N, R, _ = states.shape
        k = self.k_proj(states).view(N, R, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(N, R, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotate(k, cos[:, None].to(k.dtype), sin[:, None].to(k.dtype)), v

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scaling: float,
                base_out: torch.Tensor, nb_key: torch.Tensor, nb_value: torch.Tensor, nb_valid: torch.Tensor,
                offset: int, chunk_size: int) -> torch.Tensor:
        """query (B, H, T, d) at absolute positions offset..offset+T-1; key/value (B, H/G, S, d) the layer's own;
        `mask` what the layer's attention got (None: causal; bool, True = attend; or additive float), broadcastable
        to (B, 1, T, S); base_out (B, T, H, d) the layer's own attention output; nb_key/nb_value (B, L, H/G, K*R, d)
        and nb_valid (B, L, K*R) the encoded neighbours of the chunks finished so far -> (B, T, H, d)."""
        B, H, T, d = query.shape
        S, L, G, m = key.shape[2], nb_key.shape[1], H // self.kv_heads, chunk_size
        q = query.float()
        own = torch.einsum("bkgtd,bksd->bkgts", q.view(B, -1, G, T, d), key.float()).reshape(B, H, T, S) * scaling
        if mask is None:
            allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
            own = own.masked_fill(~allowed, float("-inf"))
        elif mask.dtype == torch.bool:
            own = own.masked_fill(~mask[..., -S:], float("-inf"))
        else:
            own = own + mask[..., -S:].float()
        # Queries grouped into windows of m positions that see the same chunk's neighbours (RETRO's causal shift).
        s0 = offset - (m - 1)
        first = s0 // m
        front = s0 - first * m
        Lw = -(-(front + T) // m)
        chunk = torch.arange(first, first + Lw, device=q.device)  # (Lw,) whose neighbours each window sees
        seen = (chunk >= 0) & (chunk < L)
        safe = chunk.clamp(0, max(L - 1, 0))
        nk, nv = nb_key[:, safe].float(), nb_value[:, safe].float()  # (B, Lw, H/G, KR, d)
        valid = nb_valid[:, safe] & seen[None, :, None]  # (B, Lw, KR)
        qw = F.pad(q, (0, 0, front, Lw * m - front - T)).view(B, -1, G, Lw, m, d)
        nb = torch.einsum("bkgwmd,bwkrd->bkgwmr", qw, nk) * scaling  # (B, H/G, G, Lw, m, KR)
        nb = nb + self.bias.float().view(-1, G)[None, :, :, None, None, None]
        nb = nb.masked_fill(~valid[:, None, None, :, None, :], float("-inf"))
        nb = nb.reshape(B, H, Lw * m, -1)[:, :, front:front + T]  # (B, H, T, KR)
        weights = torch.softmax(torch.cat([nb, own], dim=-1), dim=-1).nan_to_num(0.0)
        w_nb, w_own = weights[..., :nb.shape[-1]], weights[..., nb.shape[-1]:]
        out = torch.einsum("bkgts,bksd->bkgtd", w_own.view(B, -1, G, T, S), value.float())
        w_nb = F.pad(w_nb, (0, 0, front, Lw * m - front - T)).view(B, -1, G, Lw, m, w_nb.shape[-1])
        out = out + torch.einsum("bkgwmr,bwkrd->bkgwmd", w_nb, nv).reshape(B, -1, G, Lw * m, d)[..., front:front + T, :]
        joint = out.reshape(B, H, T, d).transpose(1, 2).to(base_out.dtype)  # (B, T, H, d)
        gate = torch.tanh(self.gate).to(base_out.dtype)[None, None, :, None]
        return base_out + gate * (joint - base_out)


class JointBinding:
    """What a decoder attention module carries while a RetroModel reads through it: the model and the layer.
    A plain object (not a closure), so `copy.deepcopy` rebinds it to the copy and pickle can store it."""

    def __init__(self, model: nn.Module, layer: int, original: str):
        self.model, self.layer, self.original = model, layer, original


def _joint_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    binding = getattr(module, "_retro_joint", None)
    original = binding.original if binding is not None else "sdpa"
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(original, None) if original != "eager" else None
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    out, weights = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if binding is None:
        return out, weights
    return binding.model._joint_attend(binding.layer, query, key, value, attention_mask, scaling, out), weights


def implementation_name(original: str) -> str:
    """The attention implementation a joint-CCA decoder runs under: the original one, wrapped (registered once)."""
    if original.startswith(PREFIX):
        return original
    if original not in ("sdpa", "eager"):
        raise ValueError(f"RetroConfig.attention='joint' wraps the decoder's 'sdpa' or 'eager' attention; this decoder "
                         f"uses {original!r}. Load it with attn_implementation='sdpa'")
    name = PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _joint_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name
