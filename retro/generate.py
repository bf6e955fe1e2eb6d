"""Batched greedy (or sampled) decoding for a `RetroModel`, KV-cached, with RETRO's re-retrieval.

Takes left-padded prompts and their neighbours (B, L, K, R); gives the new tokens (B, N), padded after EOS.
Whenever a generated token completes a chunk, that chunk's text is sent to `retrieve` and the neighbours it returns
serve from the next position on; without `retrieve` the last prompt chunk's neighbours are kept for new chunks.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

RetrieveFn = Callable[[list[str]], "torch.Tensor | np.ndarray"]  # texts -> (N, K, R) ids, -1 padded


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def as_retrieve_fn(retrieve, k: int) -> RetrieveFn | None:
    """Accept `texts -> (N, K, R)` or an object with `neighbour_tokens(texts, k)` (e.g. a `Retriever`)."""
    if retrieve is None or not hasattr(retrieve, "neighbour_tokens"):
        return retrieve
    return lambda texts: retrieve.neighbour_tokens(texts, k)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    # logits (B, V) -> (B,)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _refresh_neighbours(neighbours: torch.Tensor, chunk: int, ids: torch.Tensor, mask: torch.Tensor, m: int,
                        retrieve: RetrieveFn | None, tokenizer) -> torch.Tensor:
    """neighbours (B, L, K, R) -> (B, max(L, chunk+1), K, R) with row `chunk` set for the chunk just completed."""
    B, L, K, R = neighbours.shape
    if retrieve is None:
        if chunk < L:
            return neighbours
        return torch.cat([neighbours, neighbours[:, -1:]], dim=1)
    span, keep = ids[:, chunk * m:(chunk + 1) * m], mask[:, chunk * m:(chunk + 1) * m].bool()
    texts = [tokenizer.decode(span[b][keep[b]].tolist(), skip_special_tokens=True) for b in range(B)]
    fresh = torch.as_tensor(np.asarray(retrieve(texts)), device=neighbours.device).long()  # (B, K', R')
    if fresh.dim() != 3 or fresh.shape[0] != B or fresh.shape[1] != K or fresh.shape[2] > R:
        raise ValueError(f"retrieve returned shape {tuple(fresh.shape)}; expected ({B}, {K}, <= {R}) like the "
                         f"prompt's neighbours")
    fresh = torch.nn.functional.pad(fresh, (0, R - fresh.shape[2]), value=-1)
    if chunk < L:
        neighbours = neighbours.clone()
        neighbours[:, chunk] = fresh
        return neighbours
    return torch.cat([neighbours, fresh[:, None]], dim=1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             neighbours: torch.Tensor | None = None, max_new_tokens: int = 32, retrieve=None, tokenizer=None,
             eos_token_id: int | None = None, pad_token_id: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Decode up to `max_new_tokens` for left-padded `input_ids` (B, T); returns the new tokens (B, N).

    `neighbours` (B, L, K, R) must cover every finished prompt chunk (L >= T // m). `retrieve` maps chunk texts to
    (B, K, R) neighbours (or is an object with `neighbour_tokens(texts, k)`); it needs `tokenizer` to decode chunks.
    `use_cache=False` re-runs the whole sequence each step (the reference the cached path must match).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)).long()
    m = getattr(model, "chunk_size", None)  # None: a plain HF causal LM (the GPT baseline)
    nb = None if neighbours is None else torch.as_tensor(neighbours, device=device).long()
    if nb is not None and m is None:
        raise ValueError("generate: neighbours were given but the model is not a RetroModel")
    retrieve = as_retrieve_fn(retrieve, nb.shape[2] if nb is not None else 0)
    if retrieve is not None and tokenizer is None:
        raise ValueError("generate: re-retrieval needs `tokenizer` to turn finished chunks into query texts")
    B = ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new, cache = [], None
    for step in range(max_new_tokens):
        pos = positions_from_mask(mask)
        extra = {} if nb is None else {"neighbours": nb}
        if use_cache and cache is not None:
            out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], past_key_values=cache,
                        use_cache=True, logits_to_keep=1, **extra)
        else:
            # Only the last position's logits are read: skip the vocabulary projection of the prompt.
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, logits_to_keep=1,
                        **extra)
        cache = out.past_key_values if use_cache else None
        token = _pick(out.logits[:, -1].float(), do_sample, temperature, top_k, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        new.append(token)
        if finished.all() or step == max_new_tokens - 1:
            break
        if nb is not None and ids.shape[1] % m == 0:  # this token completed chunk T/m - 1
            nb = _refresh_neighbours(nb, ids.shape[1] // m - 1, ids, mask, m, retrieve, tokenizer)
    return torch.stack(new, dim=1)
