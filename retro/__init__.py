"""RETRO: chunked cross-attention retro-fitted onto a pretrained HF causal LM, and the GPT baseline it is compared to.

Stages: `config` (RetroConfig) -> `model` (retrofit -> RetroModel) -> `generate` (cached decoding, re-retrieval)
-> `qa` (batches, loss and answers for RETRO and GPT alike) ; `checkpoint` saves/loads the added weights.
"""
from .checkpoint import base_identity, load_retro, load_retro_weights, save_retro
from .config import RetroConfig, default_cca_layers
from .generate import generate, positions_from_mask
from .model import RetroModel, decoder_layers, retrofit, reusing_neighbours
from .qa import GPTQA, RetroQA, format_answer, format_question, gpt_prompt, prompt_part, qa_layout

__all__ = [
    "RetroConfig", "RetroModel", "retrofit", "reusing_neighbours", "default_cca_layers", "decoder_layers",
    "generate", "positions_from_mask",
    "RetroQA", "GPTQA", "qa_layout", "prompt_part", "format_question", "format_answer", "gpt_prompt",
    "save_retro", "load_retro", "load_retro_weights", "base_identity",
]
