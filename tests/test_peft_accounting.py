"""Parameter counts against hand computations, target presets per family, layer selection, config validation."""
import pytest
import torch

from conftest import build_tiny_lm
import peft_methods as pm
from peft_methods.tensor_train import TTMatrix, factorize

retro = pytest.importorskip("retro")

# Tiny models: width 32, 4 layers, MLP width 64; Llama has 4 heads of 8 with 2 key/value heads (k/v out = 16).


def trainable(model_or_family, config) -> dict:
    model = build_tiny_lm(model_or_family) if isinstance(model_or_family, str) else model_or_family
    return pm.count_trainable(pm.apply_peft(model, config))


def test_lora_counts_by_hand():
    # Llama attention, r=4: q 4*(32+32) + k 4*(32+16) + v 4*(32+16) + o 4*(32+32) = 896 per layer
    assert trainable("llama", {"method": "lora", "r": 4})["adapter"] == 4 * 896
    # Llama MLP in the top 2 layers: gate/up 4*(32+64) each, down 4*(64+32)
    counts = trainable("llama", {"method": "lora", "r": 4, "targets": ["mlp"], "layers": "top:2"})
    assert counts["trainable"] == 2 * 3 * 384
    # GPT-2 (Conv1D): c_attn 32->96 gives 4*(32+96), attn.c_proj 4*(32+32)
    counts = trainable("gpt2", {"method": "lora", "r": 4, "layers": [0, 2]})
    assert counts["adapter"] == counts["trainable"] == 2 * (512 + 256)
    # bias='all' (peft's meaning) trains every bias: c_attn, attn.c_proj, c_fc, mlp.c_proj of each layer, and the
    # biases of the 9 layer norms, which count as 'norm' because of the module they belong to.
    counts = trainable("gpt2", {"method": "lora", "r": 4, "bias": "all"})
    assert counts["bias"] == 4 * (96 + 32 + 128 + 32)
    assert counts["norm"] == 9 * 32  # ln_1, ln_2 of 4 layers + ln_f


def test_ia3_counts_by_hand():
    # output scaling of q (32), k (16), v (16), o (32); input scaling of down_proj (64)
    assert trainable("llama", {"method": "ia3"})["adapter"] == 4 * (32 + 16 + 16 + 32 + 64)
    # NeoX: query_key_value (96) and attention.dense (32) outputs, dense_4h_to_h input (64)
    assert trainable("gpt_neox", {"method": "ia3"})["adapter"] == 4 * (96 + 32 + 64)


def test_adapter_counts_by_hand():
    per_adapter = (32 * 8 + 8) + (8 * 32 + 32)
    assert trainable("llama", {"method": "adapter", "bottleneck": 8})["trainable"] == 4 * 2 * per_adapter
    counts = trainable("gpt2", {"method": "adapter", "bottleneck": 8, "train_norms": True, "layers": "bottom:1"})
    assert counts == {**counts, "adapter": 2 * per_adapter, "norm": 2 * 64, "trainable": 2 * per_adapter + 128}


def test_loretta_counts_by_hand():
    # 32 = 4*4*2 and 8 = 2*2*2 over 3 cores, TT ranks (1, 3, 3, 1)
    down = 1 * 4 * 2 * 3 + 3 * 4 * 2 * 3 + 3 * 2 * 2 * 1
    up = 1 * 2 * 4 * 3 + 3 * 2 * 4 * 3 + 3 * 2 * 2 * 1
    counts = trainable("gpt2", {"method": "loretta_adp", "bottleneck": 8, "tt_rank": 3, "n_cores": 3})
    assert counts["adapter"] == 4 * 2 * (down + up)
    assert counts["norm"] == 4 * 2 * 64  # ln_1 and ln_2 (weight and bias) really are trained and counted
    # _rep on Llama q_proj of layer 0, r=4, 2 cores: 32 = 8*4, 4 = 2*2, TT ranks (1, 2, 1)
    a = 1 * 8 * 2 * 2 + 2 * 4 * 2 * 1
    b = 1 * 2 * 8 * 2 + 2 * 2 * 4 * 1
    cfg = {"method": "loretta_rep", "r": 4, "tt_rank": 2, "n_cores": 2, "targets": ["q_proj"], "layers": [0]}
    assert trainable("llama", cfg)["trainable"] == a + b


def test_ptuning_counts_by_hand():
    counts = trainable("llama", {"method": "ptuning", "n_virtual": 3, "encoder_hidden": 16})
    assert counts["prompt"] == 3 * 32
    assert counts["encoder"] == (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32)
    counts = trainable("llama", {"method": "ptuning", "n_virtual": 3, "encoder_hidden": 16, "encoder": "lstm"})
    lstm_direction = 4 * 16 * (32 + 16) + 2 * 4 * 16  # both LSTM layers see 32 inputs (2 x 16 from layer 1)
    assert counts["encoder"] == 2 * 2 * lstm_direction + 2 * (32 * 32 + 32)


def test_full_and_retro_counts_by_hand():
    # Llama: tied embedding 96*32; per layer q 32*32, k/v 32*16, o 32*32, gate/up/down 32*64, two norms; final norm
    per_layer = 2 * 1024 + 2 * 512 + 3 * 2048 + 2 * 32
    counts = trainable("llama", {"method": "full"})
    assert counts["trainable"] == counts["total"] == 96 * 32 + 4 * per_layer + 32
    assert counts["norm"] == 4 * 64 + 32
    model = retro.retrofit(build_tiny_lm("llama"), retro.RetroConfig(chunk_size=4, num_neighbours=2))
    added = sum(p.numel() for p in model.retro_parameters())
    # LoRA r=4 on CCA (layers 1..3 of 4, four bias-free 32x32 projections each), plus RETRO's own modules
    counts = trainable(model, {"method": "lora", "r": 4, "targets": ["cca"], "train_retro": True})
    assert counts["adapter"] == 3 * 4 * 4 * (32 + 32)
    assert counts["retro"] == added


@pytest.mark.parametrize("family,layer,attention,mlp", [
    ("llama", "model.layers.{}.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
     ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("gpt2", "transformer.h.{}.", ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]),
    ("gpt_neox", "gpt_neox.layers.{}.", ["attention.query_key_value", "attention.dense"],
     ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
])
def test_presets_resolve_per_family(family, layer, attention, mlp):
    model = build_tiny_lm(family)
    assert pm.resolve_targets(model, ("attention",), "top:1") == [layer.format(3) + n for n in attention]
    assert pm.resolve_targets(model, ("mlp",), [1, 3]) == [layer.format(i) + n for i in (1, 3) for n in mlp]
    assert pm.resolve_targets(model, ("mlp_out",), "bottom:2") == [layer.format(i) + mlp[-1] for i in (0, 1)]
    assert pm.resolve_targets(model, (attention[0].rsplit(".", 1)[1],), "all") == \
        [layer.format(i) + attention[0] for i in range(4)]


def test_retro_presets():
    model = retro.retrofit(build_tiny_lm("gpt2"), retro.RetroConfig(chunk_size=4, num_neighbours=2))
    cca = pm.resolve_targets(model, ("cca",), "top:1")
    assert cca == [f"cca.3.{p}_proj" for p in "qkvo"]
    encoder = pm.resolve_targets(model, ("retro_encoder",), "all")
    assert "encoder.layers.0.self_attn.q_proj" in encoder and "encoder.layers.1.mlp.down_proj" in encoder
    assert all(n.startswith("base.transformer.h.") for n in pm.resolve_targets(model, ("attention",), "all"))
    with pytest.raises(ValueError, match="RETRO"):
        pm.resolve_targets(build_tiny_lm("gpt2"), ("cca",), "all")


def test_config_validation():
    with pytest.raises(ValueError, match=r"known methods: \['adapter', 'full', 'ia3'"):
        pm.peft_config_from_dict({"method": "dora"})
    with pytest.raises(ValueError, match="valid fields"):
        pm.peft_config_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ValueError, match="layers"):
        pm.LoRAConfig(layers="top:zero")
    with pytest.raises(ValueError, match="r=0"):
        pm.peft_config_from_dict({"method": "lora", "r": 0}, where="configs/x.yaml:peft")
    with pytest.raises(ValueError, match="do not exist"):
        pm.apply_peft(build_tiny_lm("llama"), {"method": "lora", "layers": [7]})
    with pytest.raises(ValueError, match="matched no linear layer"):
        pm.apply_peft(build_tiny_lm("llama"), {"method": "lora", "targets": ["c_attn"]})
    with pytest.raises(ValueError, match="train_retro"):
        pm.apply_peft(build_tiny_lm("llama"), {"method": "adapter", "train_retro": True})
    config = pm.peft_config_from_dict({"method": "loretta_rep", "r": 2, "targets": ["mlp"], "layers": [1, 0]})
    assert isinstance(config, pm.LorettaRepConfig) and config.targets == ("mlp",)
    assert pm.peft_config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("n", [1, 7, 32, 97, 576, 1536, 2048, 3 * 5 * 7 * 11])
def test_factorize_any_width(n):
    factors = factorize(n, 3)
    assert len(factors) == 3 and factors[0] * factors[1] * factors[2] == n
    assert factors == sorted(factors, reverse=True)


def test_tt_matrix_contracts_to_its_dense_form():
    torch.manual_seed(0)
    tt = TTMatrix(24, 10, rank=3, n_cores=3)
    x = torch.randn(5, 24)
    torch.testing.assert_close(tt(x), x @ tt.dense())
    # element (0, 0) is the product of the cores' first slices
    w = tt.cores[0][:, 0, 0] @ tt.cores[1][:, 0, 0] @ tt.cores[2][:, 0, 0]
    torch.testing.assert_close(tt.dense()[0, 0], w.squeeze())
    assert TTMatrix(24, 10, 3, 3, zero_last=True).dense().abs().sum() == 0


@pytest.mark.integration
def test_counts_and_no_op_on_the_default_decoder():
    from retrotune.models import load_decoder

    model, tokenizer = load_decoder()
    ids = tokenizer(["Retrieval helps small models answer"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    # SmolLM2-135M: width 576, 30 layers, k/v projections 576 -> 192 (3 key/value heads of 64)
    lora = pm.apply_peft(model, {"method": "lora", "r": 8})
    assert pm.count_trainable(lora)["adapter"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))
    model = lora.unload()  # peft's own way back to the bare model
    rep = pm.apply_peft(model, {"method": "loretta_rep", "r": 8, "tt_rank": 5, "targets": ["q_proj"], "layers": [0]})
    # 576 = 12*8*6 and 8 = 2*2*2 over 3 cores, TT ranks (1, 5, 5, 1)
    a = 1 * 12 * 2 * 5 + 5 * 8 * 2 * 5 + 5 * 6 * 2 * 1
    b = 1 * 2 * 12 * 5 + 5 * 2 * 8 * 5 + 5 * 2 * 6 * 1
    assert pm.count_trainable(rep)["trainable"] == a + b
    with torch.no_grad():
        assert torch.equal(rep(input_ids=ids).logits, want)
