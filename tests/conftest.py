"""Shared fixtures: tiny in-memory decoders of every supported family, and test tiers.

Tiers (markers in setup.cfg): unmarked tests are unit tests on tiny models built from configs;
`integration` tests load the real embedded models (offline) and run in CI; `gpu` tests need CUDA.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_VOCAB = 96
TINY_FAMILIES = ("llama", "gpt2", "gpt_neox")


def tiny_config(family: str, n_layer: int = 4, hidden: int = 32, heads: int = 4, vocab_size: int = TINY_VOCAB):
    """A small config of `family`; every later model test is parametrised over `TINY_FAMILIES`."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=n_layer, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=n_layer, n_head=heads, n_positions=512,
                          pad_token_id=0)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=n_layer, num_attention_heads=heads, max_position_embeddings=512,
                             rotary_pct=0.5, pad_token_id=0)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")


def build_tiny_lm(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
    return model.eval()


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family(request) -> str:
    return request.param


@pytest.fixture
def tiny_lm(tiny_family) -> torch.nn.Module:
    """A randomly initialised 4-layer decoder of each family in turn (seeded, float32, eval mode)."""
    return build_tiny_lm(tiny_family)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def open_retro(model, gate: float = 1.0, seed: int = 0):
    """Make retrieval visible in a fresh RETRO model, as training would: each CCA block gets random value and
    output projections (a new block reads only where its input matches a neighbour, which random test data rarely
    does), null slots out of the way, and the gate `gate`. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.cca.values():
            for w in (block.v_proj.weight, block.o_proj.weight):
                w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)
            block.sink.fill_(-10.0)
    model.set_gates(gate)
    return model
