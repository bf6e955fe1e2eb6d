"""The modules retro-fitting adds: a bidirectional neighbour encoder and chunked cross-attention (CCA) blocks.

Both take plain tensors (no HF objects); `retro/model.py` places them beside the decoder's layers.
Legend: B batch, T tokens, L chunks, K neighbours, R neighbour length, D decoder width, E encoder width, m chunk size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                     dropout_p: float = 0.0, sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA where a query row with no valid key outputs zero instead of NaN.

    q (N, h, Tq, d), k/v (N, h, Tk, d), key_valid (N, Tk) bool -> out (N, h, Tq, d), has_key (N,) bool.
    `sink` (h,): one more slot per head with a zero value and this fixed score, so a query whose best key scores
    below it reads (almost) nothing.
    """
    has_key = key_valid.any(dim=-1)  # (N,)
    if sink is not None:
        N, h = q.shape[:2]
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))  # (N, h, Tk+1, d), the last slot all zero
        blocked = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(torch.tensor(True), float("-inf"))
        scores = torch.where(key_valid, torch.zeros((), dtype=q.dtype, device=q.device), blocked)  # (N, Tk)
        bias = torch.cat([scores[:, None, None, :].expand(N, h, 1, -1),
                          sink.to(q.dtype)[None, :, None, None].expand(N, h, 1, 1)], dim=-1)  # (N, h, 1, Tk+1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return out * has_key[:, None, None, None].to(out.dtype), has_key
    # Rows with nothing to attend get a dummy all-visible mask so SDPA stays finite; they are zeroed afterwards.
    mask = (key_valid | ~has_key[:, None])[:, None, None, :]  # (N, 1, 1, Tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out * has_key[:, None, None, None].to(out.dtype), has_key


def _init_projections(mod: nn.Module, q_dim: int, kv_dim: int, out_dim: int, heads: int, dropout: float):
    if out_dim % heads:
        raise ValueError(f"attention width {out_dim} is not divisible by {heads} heads")
    mod.heads, mod.dropout = heads, dropout
    mod.q_proj = nn.Linear(q_dim, out_dim, bias=False)
    mod.k_proj = nn.Linear(kv_dim, out_dim, bias=False)
    mod.v_proj = nn.Linear(kv_dim, out_dim, bias=False)
    mod.o_proj = nn.Linear(out_dim, out_dim, bias=False)


def _attend(mod: nn.Module, x: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Project, attend, project back with `mod`'s q/k/v/o_proj.

    x (N, Tq, Dq), kv (N, Tk, Dkv), key_valid (N, Tk) -> (N, Tq, out); queries with no valid key give exactly 0
    (o_proj has no bias).
    """
    return _attend_projected(mod, x, mod.k_proj(kv), mod.v_proj(kv), key_valid)


def _attend_projected(mod: nn.Module, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_valid: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """`_attend` with keys/values already projected: k, v (N, Tk, out); `q` (N, Tq, out) replaces q_proj(x)."""
    N, Tq, _ = x.shape
    Tk, h = k.shape[1], mod.heads
    q = (mod.q_proj(x) if q is None else q).view(N, Tq, h, -1).transpose(1, 2)  # (N, h, Tq, d)
    k = k.reshape(N, Tk, h, -1).transpose(1, 2)  # (N, h, Tk, d)
    v = v.reshape(N, Tk, h, -1).transpose(1, 2)  # (N, h, Tk, d)
    out, _ = masked_attention(q, k, v, key_valid, mod.dropout if mod.training else 0.0, getattr(mod, "sink", None))
    return mod.o_proj(out.transpose(1, 2).reshape(N, Tq, -1))  # (N, Tq, out)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value input widths (self- or cross-attention)."""

    def __init__(self, q_dim: int, kv_dim: int, out_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        _init_projections(self, q_dim, kv_dim, out_dim, heads, dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        return _attend(self, x, kv, key_valid)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, ratio * dim)
        self.down_proj = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class EncoderLayer(nn.Module):
    """Pre-norm: bidirectional self-attention over one neighbour, cross-attention to its chunk's decoder states, MLP."""

    def __init__(self, width: int, decoder_width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(width)
        self.self_attn = Attention(width, width, width, heads, dropout)
        self.cross_attn_norm = nn.LayerNorm(width)
        self.cross_attn = Attention(width, decoder_width, width, heads, dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)
        self.drop = nn.Dropout(dropout)
        # Residual branches start at zero: a fresh encoder passes each neighbour token's embedding through unchanged,
        # so what CCA first reads is the neighbour's own tokens, not random mixing of them (which at init is several
        # times larger than an embedding).
        for proj in (self.self_attn.o_proj, self.cross_attn.o_proj, self.mlp.down_proj):
            nn.init.zeros_(proj.weight)
        nn.init.zeros_(self.mlp.down_proj.bias)

    def forward(self, x: torch.Tensor, token_valid: torch.Tensor, chunk: torch.Tensor,
                chunk_valid: torch.Tensor) -> torch.Tensor:
        # x (N, K, R, E), token_valid (N, K, R), chunk (N, m, D), chunk_valid (N, m); N = B * L chunks
        N, K, R, E = x.shape
        flat = x.reshape(N * K, R, E)
        h = self.self_attn_norm(flat)
        flat = flat + self.drop(self.self_attn(h, h, token_valid.reshape(N * K, R)))
        x = flat.view(N, K, R, E)
        # All K neighbours of a chunk attend the same chunk, so they share one query sequence of K * R tokens.
        h = self.cross_attn_norm(x).reshape(N, K * R, E)
        x = x + self.drop(self.cross_attn(h, chunk, chunk_valid)).view(N, K, R, E)
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class NeighbourEncoder(nn.Module):
    """Encodes each chunk's neighbours, conditioned on that chunk's decoder hidden states.

    Token embeddings come from the decoder's own table, passed at call time so the table stays shared (not copied,
    not counted among the added parameters).
    """

    def __init__(self, embed_width: int, decoder_width: int, width: int, depth: int, heads: int,
                 neighbour_length: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.in_proj = nn.Identity() if width == embed_width else nn.Linear(embed_width, width, bias=False)
        self.pos = nn.Parameter(torch.randn(neighbour_length, width) * 0.02)  # learned positions inside a neighbour
        # A pretrained decoder's hidden states reach norms of ~100 (and ~800 on attention-sink tokens) against ~3 for
        # token embeddings: unnormalised keys/values would drown the neighbour's own content after one cross-attention.
        self.chunk_norm = nn.LayerNorm(decoder_width)
        self.layers = nn.ModuleList(
            EncoderLayer(width, decoder_width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, neighbours: torch.Tensor, embed: nn.Module, chunk: torch.Tensor,
                chunk_valid: torch.Tensor) -> torch.Tensor:
        # neighbours (N, K, R) ids with -1 padding, chunk (N, m, D), chunk_valid (N, m) -> (N, K, R, E)
        R = neighbours.shape[-1]
        if R > self.pos.shape[0]:
            raise ValueError(f"neighbours have length R={R} but the encoder was built for at most "
                             f"{self.pos.shape[0]} tokens (RetroConfig.neighbour_length)")
        token_valid = neighbours >= 0  # (N, K, R)
        chunk = self.chunk_norm(chunk)
        x = self.in_proj(embed(neighbours.clamp(min=0)).to(self.pos.dtype)) + self.pos[:R]  # (N, K, R, E)
        for layer in self.layers:
            x = layer(x, token_valid, chunk, chunk_valid)
        return self.norm(x)


class ChunkedCrossAttention(nn.Module):
    """One CCA block: the decoder's hidden states attend their chunk's encoded neighbours, added through a tanh gate.

    Exact at step 0 either way (`init`): "copy" starts the value and output projections as the identity (a path from
    the encoded neighbour tokens straight into the residual stream) behind a zero gate; "zero" starts the output
    projection at zero behind an open gate.
    Projections are named q_proj/k_proj/v_proj/o_proj so PEFT methods can target them by name.
    """

    def __init__(self, decoder_width: int, encoder_width: int, heads: int, dropout: float, init: str = "copy"):
        super().__init__()
        self.norm = nn.LayerNorm(decoder_width)
        _init_projections(self, decoder_width, encoder_width, decoder_width, heads, dropout)
        # An induction path: a query also sees its own input token and the one before it, a key the two neighbour
        # tokens before it. In half of the heads these projections start equal (orthogonal), so from the first step
        # a position holding tokens (w, x) attends to the token after "w x" in its neighbours: CCA continues a
        # neighbour's text where the decoder's text matches it (a pretrained decoder's top-layer states encode the
        # next token more than the current one). A bigram match scores ~32 per head, a single shared token ~16,
        # unrelated tokens a few points. The other heads start without it and look up neighbours by content.
        self.token_norm = nn.LayerNorm(decoder_width)
        self.q_token_proj = nn.Linear(decoder_width, decoder_width, bias=False)
        self.q_prev_proj = nn.Linear(decoder_width, decoder_width, bias=False)
        self.k_prev_proj = nn.Linear(encoder_width, decoder_width, bias=False)
        self.k_prev2_proj = nn.Linear(encoder_width, decoder_width, bias=False)
        content = slice((heads // 2) * (decoder_width // heads), None)  # rows of the heads without the path
        head_width = decoder_width // heads
        with torch.no_grad():
            for q_proj, k_proj in ((self.q_token_proj, self.k_prev_proj), (self.q_prev_proj, self.k_prev2_proj)):
                # unit-RMS tokens through this gain: a one-token match scores gain^2 * sqrt(head_width) = 16 per head
                nn.init.orthogonal_(q_proj.weight, gain=4 / head_width ** 0.25)
                # near zero rather than zero: a weight-normalising method (DoRA) divides by each row's norm
                q_proj.weight[content] *= 1e-3
                nn.init.normal_(k_proj.weight, std=1e-3)
                if encoder_width == decoder_width:
                    k_proj.weight.copy_(q_proj.weight)
        # A null slot per head (zero value) whose score a query must beat: an induction head reads only where two
        # tokens match, and otherwise (another document's neighbours, a shuffled one, a word shared by chance)
        # nothing. Content heads start with the slot out of the way.
        induction = torch.arange(heads) < heads // 2
        self.sink = nn.Parameter(torch.where(induction, 24.0, -10.0))
        if init == "copy":
            if encoder_width != decoder_width:
                raise ValueError(f"cca_init='copy' needs the encoder as wide as the decoder ({encoder_width} != "
                                 f"{decoder_width}); use cca_init='zero' or encoder_width=None")
            nn.init.eye_(self.v_proj.weight)
            nn.init.eye_(self.o_proj.weight)
            with torch.no_grad():  # content heads start reading (almost) nothing: an average of neighbour tokens is noise
                self.v_proj.weight[content] *= 1e-3
            gate = 0.0
        elif init == "zero":
            nn.init.zeros_(self.o_proj.weight)
            gate = 1.0
        else:
            raise ValueError(f"unknown CCA init {init!r}; choose 'copy' or 'zero'")
        self.gate = nn.Parameter(torch.full((1,), gate))

    def forward(self, hidden: torch.Tensor, encoded: torch.Tensor, encoded_valid: torch.Tensor,
                offset: int, chunk_size: int, kv_cache: dict | None = None,
                neighbour_length: int | None = None, tokens: torch.Tensor | None = None,
                previous: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, n, D) at absolute positions offset..offset+n-1; encoded (B, L, K*R, E), encoded_valid (B, L, K*R);
        `neighbour_length` R (default: K*R, one neighbour) marks where each neighbour starts; `tokens` (B, n, D) are
        the input embeddings at those positions and `previous` (B, n, D) those of the tokens before them (the queries'
        induction path; without them it is off; zeros where there is no previous token).

        Position p attends the neighbours of chunk u = (p + 1) // m - 1: the last token of chunk u and the first m-1
        tokens of chunk u+1 see chunk u's neighbours (RETRO's causal shift); positions before m-1 attend nothing.
        Chunks needed here must already be encoded (u < L). `kv_cache` (a dict owned by the caller) keeps the
        projected keys/values of chunks seen before, so each decoding step projects only newly encoded chunks.
        """
        kv_cache = {} if kv_cache is None else kv_cache
        done = kv_cache["k"].shape[1] if "k" in kv_cache else 0
        if encoded.shape[1] > done:
            fresh = encoded[:, done:]  # (B, new chunks, K*R, E)
            Bf, c, KR, E = fresh.shape
            R = neighbour_length or KR
            split = fresh.reshape(Bf, c, KR // R, R, E)
            before = F.pad(split[:, :, :, :-1], (0, 0, 1, 0)).reshape(Bf, c, KR, E)  # each neighbour's previous token
            before2 = F.pad(split[:, :, :, :-2], (0, 0, 2, 0)).reshape(Bf, c, KR, E)  # and the one before that
            k_new = self.k_proj(fresh) + self.k_prev_proj(before) + self.k_prev2_proj(before2)  # (B, chunks, K*R, D)
            v_new = self.v_proj(fresh)  # (B, new chunks, K*R, D)
            kv_cache["k"] = k_new if not done else torch.cat([kv_cache["k"], k_new], dim=1)
            kv_cache["v"] = v_new if not done else torch.cat([kv_cache["v"], v_new], dim=1)
        B, n, D = hidden.shape
        m = chunk_size
        s0 = offset - (m - 1)  # shifted index of the first position; its query window is floor(s0 / m)
        first = s0 // m
        front = s0 - first * m  # window slots before `offset`
        Lw = -(-(front + n) // m)
        chunk_index = torch.arange(first, first + Lw, device=hidden.device)  # (Lw,) chunk whose neighbours it sees
        query = self.q_proj(self.norm(hidden))  # (B, n, D)
        if tokens is not None:
            query = query + self.q_token_proj(self.token_norm(tokens.to(hidden.dtype)))
            if previous is not None:
                # a missing previous token (the sequence start) adds nothing, not the norm's bias
                present = previous.abs().sum(-1, keepdim=True) > 0
                query = query + self.q_prev_proj(self.token_norm(previous.to(hidden.dtype)) * present)
        padded = F.pad(query, (0, 0, front, Lw * m - front - n))  # (B, Lw*m, D)
        safe = chunk_index.clamp(min=0)
        k = kv_cache["k"][:, safe].flatten(0, 1)  # (B*Lw, K*R, D)
        v = kv_cache["v"][:, safe].flatten(0, 1)  # (B*Lw, K*R, D)
        valid = (encoded_valid[:, safe] & (chunk_index >= 0)[None, :, None]).flatten(0, 1)  # (B*Lw, K*R)
        windows = padded.view(B * Lw, m, D)
        out = _attend_projected(self, windows, k, v, valid, q=windows).view(B, Lw * m, D)[:, front:front + n]
        # The branch is scaled by each position's residual RMS: a pretrained decoder's stream runs at RMS 5-25, and
        # an unscaled branch learning at the usual rates would stay a few percent of it for hundreds of steps.
        scale = hidden.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(out.dtype)  # (B, n, 1)
        return hidden + torch.tanh(self.gate).to(out.dtype) * scale * out  # (B, n, D)
