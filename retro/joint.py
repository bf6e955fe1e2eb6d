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

Cost: the neighbours' reading is one fused `scaled_dot_product_attention` call per layer over query windows (each
window's neighbour keys beside the layer's own keys); positions with no finished chunk to read keep the layer's own
output without recomputing it, and a decoding step (one window) takes a direct float32 path.
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
        `mask` what the layer's attention got (None: causal; bool, True = attend; or additive float, 0 = attend and
        the dtype's lowest value = not), broadcastable
        to (B, 1, T, S); base_out (B, T, H, d) the layer's own attention output; nb_key/nb_value (B, L, H/G, K*R, d)
        and nb_valid (B, L, K*R) the encoded neighbours of the chunks finished so far -> (B, T, H, d)."""
        T, S, L, m = query.shape[2], key.shape[2], nb_key.shape[1], chunk_size
        # Queries grouped into windows of m positions that see the same chunk's neighbours (RETRO's causal shift):
        # position p reads chunk (p + 1) // m - 1. Window w covers positions w * m - front .. and reads chunk
        # first + w; windows of chunks before the first or past the last read only their own context, which is the
        # layer's own output already, so only windows [lo, hi) are computed.
        s0 = offset - (m - 1)
        first = s0 // m
        front = s0 - first * m
        lo = max(-first, 0)
        hi = min(-(-(front + T) // m), L - first)
        a, b = max(lo * m - front, 0), min(hi * m - front, T)  # the query positions of those windows
        if a >= b:
            return base_out
        chunks = torch.arange(first + lo, first + hi, device=query.device)
        nk, nv, valid = nb_key[:, chunks], nb_value[:, chunks], nb_valid[:, chunks]  # (B, W, ...)
        own = _own_mask(mask, T, S, query.device)[:, a:b]  # (B|1, b-a, S), True = attend
        q = query[:, :, a:b]
        if hi - lo == 1:  # a decoding step, or any span within one window: no window padding to compute
            joint = self._one_window(q, key, value, own, scaling, nk[:, 0], nv[:, 0], valid[:, 0])
        else:
            joint = self._windows(q, key, value, own, scaling, nk, nv, valid, front if lo == 0 else 0, m)
        gate = torch.tanh(self.gate).to(base_out.dtype)[None, None, :, None]
        read = base_out[:, a:b] + gate * (joint.to(base_out.dtype) - base_out[:, a:b])
        return torch.cat([base_out[:, :a], read, base_out[:, b:]], dim=1)

    def _one_window(self, query, key, value, own, scaling, nk, nv, valid) -> torch.Tensor:
        """Every query reads the same neighbours: nk/nv (B, H/G, KR, d), valid (B, KR). Scores in float32, one
        softmax over neighbour and own keys -> (B, T, H, d)."""
        B, H, T, d = query.shape
        G = H // self.kv_heads
        q = query.float().view(B, self.kv_heads, G, T, d)
        scores = torch.cat([torch.einsum("bkgtd,bkrd->bkgtr", q, nk.float()),
                            torch.einsum("bkgtd,bksd->bkgts", q, key.float())], dim=-1) * scaling
        bias = torch.cat([self.bias.float().view(1, self.kv_heads, G, 1, 1).expand(1, -1, -1, 1, nk.shape[2]),
                          scores.new_zeros(1, self.kv_heads, G, 1, key.shape[2])], dim=-1)
        allowed = torch.cat([valid[:, None, :].expand(-1, T, -1), own.expand(B, -1, -1)], dim=-1)  # (B, T, KR+S)
        scores = (scores + bias).masked_fill(~allowed[:, None, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with nothing to attend reads nothing
        out = torch.einsum("bkgtr,bkrd->bkgtd", weights, torch.cat([nv, value], dim=2).float())
        return out.reshape(B, H, T, d).transpose(1, 2)

    def _windows(self, query, key, value, own, scaling, nk, nv, valid, front: int, m: int) -> torch.Tensor:
        """Queries in W windows of m positions, window w reading nk/nv[:, w] (B, W, H/G, KR, d), valid (B, W, KR):
        one fused attention call over windows x kv heads, each window's queries attending its neighbours' keys and
        the layer's own keys in one softmax -> (B, T, H, d).

        A head's neighbour score bias rides in one extra key/query column (query: bias / scaling, neighbour keys 1,
        own keys 0), so the mask is shared by the heads and needs no gradient; the column is padded to a multiple
        of 8 (what fused GPU kernels take). Masked scores use the dtype's lowest finite value, so a query with
        nothing to attend (padding) averages harmlessly instead of giving NaN."""
        B, H, T, d = query.shape
        kvh, S, W, KR = self.kv_heads, key.shape[2], nk.shape[1], nk.shape[3]
        G, back, dtype, dev = H // kvh, W * m - front - T, query.dtype, query.device
        width = -(-(d + 1) // 8) * 8
        lowest = torch.finfo(dtype).min
        own = F.pad(own, (0, 0, front, back), value=False).view(own.shape[0], W, 1, m, S)
        allowed = torch.cat([valid[:, :, None, None, :].expand(B, W, 1, m, KR), own.expand(B, W, 1, m, S)], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, lowest)
        mask = mask.expand(B, W, G, m, KR + S).reshape(B * W, 1, G * m, KR + S)
        q = F.pad(query, (0, 0, front, back)).view(B, kvh, G, W, m, d)
        column = (self.bias.to(dtype) / scaling).view(1, kvh, G, 1, 1, 1).expand(B, kvh, G, W, m, 1)
        q = torch.cat([q, column], dim=-1).permute(0, 3, 1, 2, 4, 5).reshape(B * W, kvh, G * m, d + 1)
        marks = torch.cat([torch.ones(KR, dtype=dtype, device=dev), torch.zeros(S, dtype=dtype, device=dev)])
        k = torch.cat([nk, key[:, None].expand(B, W, kvh, S, d)], dim=3)
        k = torch.cat([k, marks.view(1, 1, 1, -1, 1).expand(B, W, kvh, KR + S, 1)], dim=-1)
        v = torch.cat([nv, value[:, None].expand(B, W, kvh, S, d)], dim=3)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])).reshape(B * W, kvh, -1, width) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)[..., :d]  # (B*W, kvh, G*m, d)
        out = out.view(B, W, kvh, G, m, d).permute(0, 2, 3, 1, 4, 5).reshape(B, H, W * m, d)[:, :, front:front + T]
        return out.transpose(1, 2)


def _own_mask(mask, T: int, S: int, device) -> torch.Tensor:
    """What the layer's attention got, as (B|1, T, S) bool, True = attend (None: causal over the last T keys)."""
    if mask is None:
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None]
    if mask.dtype == torch.bool:
        return mask[..., -S:].expand(-1, 1, T, S)[:, 0]
    return (mask[..., -S:] > torch.finfo(mask.dtype).min / 2).expand(-1, 1, T, S)[:, 0]


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
