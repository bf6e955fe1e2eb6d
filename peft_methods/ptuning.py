"""P-tuning (Liu et al., "GPT understands, too"): learned virtual tokens from a reparameterising prompt encoder.

Takes a causal LM or a RETRO model; gives a `PTuningModel` wrapper that prepends the virtual tokens (via
`inputs_embeds`) and forwards `input_ids / attention_mask / labels / neighbours`. On RETRO the virtual block is
padded to a whole number of m-token chunks and matched by missing (-1) neighbour chunks, so every real chunk keeps
its own neighbours and the m-1 causal offset (plain prepending, as peft does, would shift chunk boundaries).
The prompt encoder is peft's (MLP or bidirectional-LSTM head over an embedding table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from peft import PromptEncoder, PromptEncoderConfig
from torch import nn

from .core import MethodConfig, Owned, positive
from .targets import is_retro


@dataclass
class PTuningConfig(MethodConfig):
    """`n_virtual` virtual tokens produced by an 'mlp' or 'lstm' prompt encoder (`layers` does not apply)."""

    method = "ptuning"
    n_virtual: int = 20
    encoder: str = "mlp"
    encoder_hidden: int = 128
    lstm_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "n_virtual", "encoder_hidden", "lstm_layers")
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"PTuningConfig.encoder={self.encoder!r}: choose 'mlp' or 'lstm'")


def _cache_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2]) if len(past_key_values) else 0


class PTuningModel(nn.Module):
    """Wraps a (RETRO or plain) causal LM; logits and hidden outputs cover the real tokens only."""

    def __init__(self, model: nn.Module, config: PTuningConfig):
        super().__init__()
        self.model = model
        self.ptuning_config = config
        width = model.get_input_embeddings().embedding_dim
        encoder_config = PromptEncoderConfig(
            num_virtual_tokens=config.n_virtual, token_dim=width, num_transformer_submodules=1,
            encoder_reparameterization_type=config.encoder.upper(), encoder_hidden_size=config.encoder_hidden,
            **({"encoder_num_layers": config.lstm_layers} if config.encoder == "lstm" else {}))
        self.prompt_encoder = PromptEncoder(encoder_config)
        self.chunk_size: Optional[int] = model.chunk_size if is_retro(model) else None
        m = self.chunk_size or 1
        self.n_prefix = math.ceil(config.n_virtual / m) * m  # virtual block length, whole chunks on RETRO
        self.register_buffer("virtual_ids", torch.arange(config.n_virtual), persistent=False)
        reference = next(model.parameters())
        self.prompt_encoder.to(reference.device, reference.dtype)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def virtual_embeddings(self, batch: int) -> torch.Tensor:
        """(B, P, D); on RETRO the pad positions (zero vectors) come first so the learned tokens touch the text."""
        virtual = self.prompt_encoder(self.virtual_ids[None])  # (1, n, D)
        pad = self.n_prefix - virtual.shape[1]
        if pad:
            virtual = torch.cat([virtual.new_zeros(1, pad, virtual.shape[2]), virtual], dim=1)
        return virtual.expand(batch, -1, -1)

    def _prefix_neighbours(self, neighbours: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if neighbours is None or self.chunk_size is None:
            return neighbours
        B, _, K, R = neighbours.shape  # (B, L, K, R)
        missing = neighbours.new_full((B, self.n_prefix // self.chunk_size, K, R), -1)
        return torch.cat([missing, neighbours], dim=1)  # (B, P/m + L, K, R)

    def forward(self, input_ids=None, attention_mask=None, labels=None, neighbours=None, inputs_embeds=None,
                past_key_values=None, use_cache=False, position_ids=None, **kwargs):
        P = self.n_prefix
        extra = dict(kwargs)
        if self.chunk_size is not None:
            extra["neighbours"] = self._prefix_neighbours(neighbours)
        elif neighbours is not None:
            raise ValueError("neighbours were given but the wrapped model is not RETRO (it has no chunk_size)")
        if position_ids is not None:
            position_ids = position_ids + P
        past = _cache_length(past_key_values)
        if past > 0:
            # Generation after the first step: the virtual tokens already sit in the cache.
            new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            if attention_mask is not None and attention_mask.shape[1] + P == past + new:
                attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], 1)
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              labels=labels, past_key_values=past_key_values, use_cache=use_cache,
                              position_ids=position_ids, **extra)
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, D)
        B = inputs_embeds.shape[0]
        inputs_embeds = torch.cat([self.virtual_embeddings(B).to(inputs_embeds.dtype), inputs_embeds], 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
        if position_ids is not None:
            position_ids = torch.cat([torch.arange(P, device=position_ids.device).expand(B, P), position_ids], 1)
        if labels is not None:
            # The first real token is not scored either, so the loss covers the same targets as the base model's.
            labels = torch.cat([labels.new_full((B, P), -100), labels], 1)
            labels[:, P] = -100
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                         past_key_values=past_key_values, use_cache=use_cache, position_ids=position_ids, **extra)
        # Logits cover the last positions (all, or `logits_to_keep`): keep those of the caller's tokens, (B, <=T, V).
        T = inputs_embeds.shape[1] - P
        out["logits"] = out.logits[:, max(0, out.logits.shape[1] - T):]
        return out


def apply_ptuning(model: nn.Module, config: PTuningConfig) -> tuple[nn.Module, Owned]:
    wrapper = PTuningModel(model, config)
    encoder = wrapper.prompt_encoder
    table = {id(p) for p in encoder.embedding.parameters()}
    owned: Owned = [(p, "prompt" if id(p) in table else "encoder") for p in encoder.parameters()]
    return wrapper, owned
