"""Soft prompts: P-tuning (Liu et al., "GPT understands, too"), prompt tuning (Lester et al. 2021), prefix tuning.

Takes a causal LM or a RETRO model; P-tuning and prompt tuning give a `PTuningModel` wrapper that prepends the
virtual tokens (via `inputs_embeds`) and forwards `input_ids / attention_mask / labels / neighbours`. On RETRO the
virtual block is padded to a whole number of m-token chunks and matched by missing (-1) neighbour chunks, so every
real chunk keeps its own neighbours and the m-1 causal offset (plain prepending, as peft does, would shift chunk
boundaries); the pad slots are masked out (attention mask 0), so GPT and RETRO attend to the same `n_virtual` real
virtual tokens. P-tuning's prompt encoder is peft's (MLP or bidirectional-LSTM head over an embedding table);
prompt tuning trains the embedding table alone, initialised from the embeddings of random vocabulary tokens.
Prefix tuning (Li & Liang 2021) is peft's, on GPT only: its learned keys/values enter as a KV cache, which RETRO's
chunk positions cannot absorb.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import peft
import torch
from peft import PromptEncoder, PromptEncoderConfig
from torch import nn

from .core import MethodConfig, Owned, positive
from .targets import is_retro


@dataclass
class PTuningConfig(MethodConfig):
    """`n_virtual` virtual tokens produced by an 'mlp' or 'lstm' prompt encoder (`layers` does not apply)."""

    method = "ptuning"
    n_virtual: int = 20  # number of virtual tokens
    encoder: str = "mlp"  # prompt encoder: mlp | lstm
    encoder_hidden: int = 128  # hidden width of the prompt encoder
    lstm_layers: int = 2  # LSTM layers when encoder is lstm

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "n_virtual", "encoder_hidden", "lstm_layers")
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"PTuningConfig.encoder={self.encoder!r}: choose 'mlp' or 'lstm'")


@dataclass
class PromptTuningConfig(MethodConfig):
    """`n_virtual` learned input embeddings, nothing else (`layers` does not apply)."""

    method = "prompt_tuning"
    n_virtual: int = 20  # number of virtual tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "n_virtual")


@dataclass
class PrefixTuningConfig(MethodConfig):
    """`n_virtual` learned key/value vectors per layer (GPT only), optionally through an MLP (`projection_hidden`)."""

    method = "prefix_tuning"
    n_virtual: int = 20  # number of virtual tokens
    projection_hidden: Optional[int] = None  # hidden width of the prefix MLP; None: no MLP

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "n_virtual")
        if self.projection_hidden is not None:
            positive(self, "projection_hidden")


class PromptTable(nn.Module):
    """Prompt tuning's 'encoder': the table itself, rows initialised from random vocabulary embeddings."""

    def __init__(self, n_virtual: int, vocabulary: torch.Tensor):
        super().__init__()
        rows = torch.randint(0, vocabulary.shape[0], (n_virtual,))
        self.embedding = nn.Embedding(n_virtual, vocabulary.shape[1])
        if not vocabulary.is_meta:
            with torch.no_grad():
                self.embedding.weight.copy_(vocabulary.detach()[rows].to(self.embedding.weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


def _cache_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2]) if len(past_key_values) else 0


class PTuningModel(nn.Module):
    """Wraps a (RETRO or plain) causal LM; logits and hidden outputs cover the real tokens only."""

    def __init__(self, model: nn.Module, config: PTuningConfig | PromptTuningConfig):
        super().__init__()
        self.model = model
        self.ptuning_config = config
        table = model.get_input_embeddings().weight
        if isinstance(config, PromptTuningConfig):
            self.prompt_encoder = PromptTable(config.n_virtual, table)
        else:
            encoder_config = PromptEncoderConfig(
                num_virtual_tokens=config.n_virtual, token_dim=table.shape[1], num_transformer_submodules=1,
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

    def prefix_mask(self, like: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, P) attention mask of the virtual block: 0 on the pad slots, 1 on the real virtual tokens."""
        pad = self.n_prefix - self.ptuning_config.n_virtual
        mask = like.new_ones(batch, self.n_prefix)
        mask[:, :pad] = 0
        return mask

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
        padded = P > self.ptuning_config.n_virtual
        tokens = input_ids if input_ids is not None else inputs_embeds
        past = _cache_length(past_key_values)
        if padded and attention_mask is None:  # the pad slots must stay masked, so a mask is always passed
            attention_mask = torch.ones(tokens.shape[0], max(0, past - P) + tokens.shape[1], dtype=torch.long,
                                        device=tokens.device)
        if past > 0:
            # Generation after the first step: the virtual tokens already sit in the cache.
            new = tokens.shape[1]
            if attention_mask is not None and attention_mask.shape[1] + P == past + new:
                attention_mask = torch.cat([self.prefix_mask(attention_mask, attention_mask.shape[0]),
                                            attention_mask], 1)
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              labels=labels, past_key_values=past_key_values, use_cache=use_cache,
                              position_ids=position_ids, **extra)
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)  # (B, T, D)
        B = inputs_embeds.shape[0]
        inputs_embeds = torch.cat([self.virtual_embeddings(B).to(inputs_embeds.dtype), inputs_embeds], 1)
        if attention_mask is not None:
            attention_mask = torch.cat([self.prefix_mask(attention_mask, B), attention_mask], 1)
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


def apply_ptuning(model: nn.Module, config: PTuningConfig | PromptTuningConfig) -> tuple[nn.Module, Owned]:
    wrapper = PTuningModel(model, config)
    encoder = wrapper.prompt_encoder
    table = {id(p) for p in encoder.embedding.parameters()}
    owned: Owned = [(p, "prompt" if id(p) in table else "encoder") for p in encoder.parameters()]
    return wrapper, owned


PREFIX_ON_RETRO = ("prefix_tuning is not available on RETRO: its learned keys/values enter every layer as a KV "
                   "cache of n_virtual positions, which shifts RETRO's chunk boundaries and its cached retrieval "
                   "state; use ptuning or prompt_tuning (chunk-aligned virtual tokens) on RETRO")


def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> tuple[nn.Module, Owned]:
    if is_retro(model):
        raise ValueError(PREFIX_ON_RETRO)
    projection = config.projection_hidden is not None
    peft_config = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=config.n_virtual,
                                          prefix_projection=projection,
                                          **({"encoder_hidden_size": config.projection_hidden} if projection else {}))
    out = peft.get_peft_model(model, peft_config)
    table = {id(p) for p in out.prompt_encoder.default.embedding.parameters()}
    owned: Owned = [(p, "prompt" if id(p) in table else "encoder") for p in out.prompt_encoder.default.parameters()]
    return out, owned
