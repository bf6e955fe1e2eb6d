"""Model resolution lives in the ground-floor package `backbones` (which `retrieval/` and `peft_methods/` may import
too); its names stay importable from here for the stages that compose a run."""
from backbones.resolve import (DECODER_ALIASES, DECODER_HUB_IDS, DEFAULT_DECODER, DEFAULT_EMBEDDER,  # noqa: F401
                               EMBEDDER_ALIASES, Alias, ModelNotFoundError, cache_dir, check_model_name,
                               default_device, hub_id, load_decoder, load_embedder, load_tokenizer, resolve_decoder,
                               resolve_embedder)
