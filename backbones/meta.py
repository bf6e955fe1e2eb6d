"""Decoders built on the meta device: shapes and dtypes without weights, so an 8B or 48B model's parameter counts,
memory estimate and PEFT layout are known before a byte of it is loaded.

Takes a decoder name (an alias, a folder, a hub id whose config is cached, or one of `SHAPES`, Llama-shaped configs
of well-known sizes that need no files); gives its config, or the model itself on the meta device.
"""
from __future__ import annotations

import torch

# Llama-family shapes of published models (their config.json values), for estimates without any file.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=130000.0),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                      max_position_embeddings=8192, rope_theta=500000.0),
}


def decoder_config(name: str):
    """The decoder's config without its weights: a `SHAPES` entry, or the config of an alias, folder or hub id
    (an alias is converted once, as `resolve_decoder` does)."""
    from transformers import AutoConfig, LlamaConfig

    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    from .resolve import resolve_decoder

    return AutoConfig.from_pretrained(resolve_decoder(name))


def meta_decoder(config, dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"):
    """A causal LM of `config` (or a name `decoder_config` takes) on the meta device: every parameter has its shape
    and dtype and no storage. `to_empty(device=...)` materialises it (e.g. shard by shard under FSDP)."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, str):
        config = decoder_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
