"""Saving and loading only the RETRO-added weights, bound to their base model and chunk size."""
import json

import pytest
import torch

from conftest import TINY_VOCAB, build_tiny_lm
from retro import RetroConfig, load_retro, load_retro_weights, retrofit, save_retro

M = 4


def trained_like(family, seed=0):
    model = retrofit(build_tiny_lm(family, seed=seed), RetroConfig(chunk_size=M, num_neighbours=2))
    with torch.no_grad():  # stand-in for training: move every added weight away from its init
        for p in model.retro_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_round_trip_restores_outputs(tiny_family, tmp_path):
    model = trained_like(tiny_family)
    save_retro(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "retro.json").read_text())
    assert meta["retro_config"]["chunk_size"] == M
    assert meta["base_model"]["num_hidden_layers"] == 4 and len(meta["base_model"]["embedding_sha256"]) == 64
    ids = torch.randint(1, TINY_VOCAB, (2, 3 * M))
    nb = torch.randint(0, TINY_VOCAB, (2, 3, 2, 2 * M))
    with torch.no_grad():
        want = model(input_ids=ids, neighbours=nb).logits
        loaded = load_retro(tmp_path / "ckpt", build_tiny_lm(tiny_family)).eval()
        got = loaded(input_ids=ids, neighbours=nb).logits
        fresh = retrofit(build_tiny_lm(tiny_family), RetroConfig(chunk_size=M, num_neighbours=2)).eval()
        assert (fresh(input_ids=ids, neighbours=nb).logits - want).abs().max() > 1e-4  # the weights matter
        load_retro_weights(fresh, tmp_path / "ckpt")
        again = fresh(input_ids=ids, neighbours=nb).logits
    assert torch.equal(got, want) and torch.equal(again, want)


def test_refuses_another_base_or_chunk_size(tmp_path):
    save_retro(trained_like("llama"), tmp_path)
    other = build_tiny_lm("llama", seed=1)
    keys = list(other.state_dict())
    with pytest.raises(ValueError, match="embedding_sha256"):
        load_retro(tmp_path, other)
    assert list(other.state_dict()) == keys and not other.base_model.layers[1]._forward_hooks  # left as it was
    with pytest.raises(ValueError, match="architecture"):
        load_retro(tmp_path, build_tiny_lm("gpt2"))
    with pytest.raises(ValueError, match="chunk size 4"):
        load_retro(tmp_path, build_tiny_lm("llama"), chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size is 4"):
        load_retro_weights(retrofit(build_tiny_lm("llama"), RetroConfig(chunk_size=8)), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a RETRO checkpoint"):
        load_retro(tmp_path / "missing", build_tiny_lm("llama"))
