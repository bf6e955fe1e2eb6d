"""Parameter counts against hand computations, target presets per family, layer selection, config validation."""
import math

import pytest
import torch

from conftest import build_tiny_lm
import peft_methods as pm
from peft_methods.tensor_train import TTMatrix, auto_modes, factorize

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
    # the paper's placement: output scaling of k (16) and v (16), input scaling of down_proj (the FFN intermediate, 64)
    assert trainable("llama", {"method": "ia3"})["adapter"] == 4 * (16 + 16 + 64)
    # the former placement, kept as a named option: q (32), k, v, o (32) and down_proj's input
    assert trainable("llama", {"method": "ia3", "placement": "attention_mlp_out"})["adapter"] == \
        4 * (32 + 16 + 16 + 32 + 64)
    # NeoX fuses q/k/v into query_key_value (96), so keys and values are scaled there; dense_4h_to_h input (64)
    assert trainable("gpt_neox", {"method": "ia3"})["adapter"] == 4 * (96 + 64)


def test_adapter_counts_by_hand():
    per_adapter = (32 * 8 + 8) + (8 * 32 + 32)
    # Houlsby et al. train the layer norms too (two per layer, 32 weights each on Llama)
    counts = trainable("llama", {"method": "adapter", "bottleneck": 8})
    assert counts == {**counts, "adapter": 4 * 2 * per_adapter, "norm": 4 * 64}
    counts = trainable("gpt2", {"method": "adapter", "bottleneck": 8, "train_norms": False, "layers": "bottom:1"})
    assert counts == {**counts, "adapter": 2 * per_adapter, "norm": 0, "trainable": 2 * per_adapter}


def test_loretta_counts_by_hand():
    # width 32 has no shape of the authors': automatic modes 32 -> [8, 4], 8 -> [8]; TT ranks 3
    down = 1 * 8 * 3 + 3 * 4 * 3 + 3 * 8 * 1  # modes [8, 4, 8]
    up = 1 * 8 * 3 + 3 * 8 * 3 + 3 * 4 * 1  # modes [8, 8, 4]
    per_adapter = down + up + 8 + 32  # with the biases of both projections
    counts = trainable("llama", {"method": "loretta_adp", "bottleneck": 8, "tt_rank": 3})
    assert counts["adapter"] == counts["trainable"] == 4 * 3 * per_adapter  # gate_proj, up_proj in; down_proj out
    counts = trainable("gpt2", {"method": "loretta_adp", "bottleneck": 8, "tt_rank": 3, "train_norms": True})
    assert counts["adapter"] == 4 * 2 * per_adapter  # c_fc in; c_proj out
    assert counts["norm"] == 4 * 2 * 64  # ln_1 and ln_2 (weight and bias), only when asked for
    no_bias = trainable("gpt2", {"method": "loretta_adp", "bottleneck": 8, "tt_rank": 3, "bias": False})
    assert no_bias["adapter"] == 4 * 2 * (down + up)
    houlsby = trainable("gpt2", {"method": "loretta_adp", "bottleneck": 8, "tt_rank": 3, "placement": "houlsby"})
    assert houlsby["adapter"] == 4 * 2 * per_adapter  # after attention and after the MLP
    # _rep on Llama q_proj (32 -> 32) and v_proj (32 -> 16), r=4, TT rank 2: A [8, 4, 4], B_q [4, 8, 4], B_v [4, 16]
    a = 1 * 8 * 2 + 2 * 4 * 2 + 2 * 4 * 1
    b_q = 1 * 4 * 2 + 2 * 8 * 2 + 2 * 4 * 1
    b_v = 1 * 4 * 2 + 2 * 16 * 1
    cfg = {"method": "loretta_rep", "r": 4, "tt_rank": 2, "layers": [0]}
    assert trainable("llama", cfg)["trainable"] == 2 * a + b_q + b_v


def test_new_method_counts_by_hand():
    # DoRA: LoRA's A, B plus one magnitude per output feature (q 32, k 16, v 16, o 32)
    assert trainable("llama", {"method": "dora", "r": 4})["adapter"] == 4 * 896 + 4 * 96
    assert trainable("llama", {"method": "rslora", "r": 4})["adapter"] == 4 * 896
    # VeRA: per layer d (r) and b (out); the shared random A, B are frozen buffers
    assert trainable("llama", {"method": "vera", "r": 16})["adapter"] == 4 * (4 * 16 + 32 + 16 + 16 + 32)
    assert trainable("llama", {"method": "prompt_tuning", "n_virtual": 5}) == \
        {**trainable("llama", {"method": "prompt_tuning", "n_virtual": 5}), "prompt": 5 * 32, "trainable": 5 * 32}
    # prefix tuning: a key and a value vector per virtual token and layer (Llama: 2 key/value heads of 8 = 16 wide)
    assert trainable("llama", {"method": "prefix_tuning", "n_virtual": 5})["prompt"] == 5 * 4 * 2 * 16
    assert trainable("gpt2", {"method": "prefix_tuning", "n_virtual": 5})["prompt"] == 5 * 4 * 2 * 32
    # BitFit on GPT-2: c_attn 96, attn.c_proj 32, c_fc 128, mlp.c_proj 32 biases; ln_1/ln_2 biases count as norms
    counts = trainable("gpt2", {"method": "bitfit"})
    assert counts == {**counts, "bias": 4 * (96 + 32 + 128 + 32), "norm": 4 * 2 * 32}


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
    # LoRA r=4 on CCA (layers 1..3 of 4, eight bias-free 32x32 projections each: q, k, v, o and the induction
    # path's token and previous-token queries and its two previous-token keys), plus RETRO's own modules
    counts = trainable(model, {"method": "lora", "r": 4, "targets": ["cca"], "train_retro": True})
    assert counts["adapter"] == 3 * 8 * 4 * (32 + 32)
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
    assert cca == [f"cca.3.{p}_proj" for p in ("q", "k", "v", "o", "q_token", "q_prev", "k_prev", "k_prev2")]
    encoder = pm.resolve_targets(model, ("retro_encoder",), "all")
    assert "encoder.layers.0.self_attn.q_proj" in encoder and "encoder.layers.1.mlp.down_proj" in encoder
    assert all(n.startswith("base.transformer.h.") for n in pm.resolve_targets(model, ("attention",), "all"))
    with pytest.raises(ValueError, match="RETRO"):
        pm.resolve_targets(build_tiny_lm("gpt2"), ("cca",), "all")


def test_config_validation():
    with pytest.raises(ValueError, match=r"known methods: \['adapter', 'bitfit', 'dora'"):
        pm.peft_config_from_dict({"method": "qlora"})
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
    modes = auto_modes(n)
    assert math.prod(modes) == n and (max(modes) <= 16 or n == 97)


def test_auto_modes_examples():
    assert auto_modes(4096) == [16, 16, 16] and auto_modes(576) == [12, 8, 6]
    assert auto_modes(64) == [8, 8] and auto_modes(8) == [8] and auto_modes(97) == [97]


@pytest.mark.parametrize("in_dim,out_dim,modes", [(24, 10, [4, 6, 10]), (24, 10, [4, 3, 4, 5]),
                                                  (4096, 8, [16, 16, 8, 4, 4]), (8, 4096, [16, 16, 8, 4, 4]),
                                                  (6, 4, [4, 6])])
def test_tt_matrix_streams_like_its_dense_form(in_dim, out_dim, modes):
    torch.manual_seed(0)
    tt = TTMatrix(in_dim, out_dim, modes, rank=3)
    x = torch.randn(5, 7, in_dim)
    want = x @ tt.dense()
    torch.testing.assert_close(tt(x), want, rtol=1e-4, atol=1e-5)  # grad enabled: streamed where it is cheaper
    if tt.split is not None:
        torch.testing.assert_close(tt._contract(x.reshape(-1, in_dim)).reshape(want.shape), want,
                                   rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(tt(x), want, rtol=1e-4, atol=1e-5)  # cached dense weight
        tt.cores[0].mul_(2)  # the cache notices a changed core
        torch.testing.assert_close(tt(x), 2 * want, rtol=1e-4, atol=1e-5)
    assert TTMatrix(24, 10, [4, 6, 10], 3, zero_last=True).dense().abs().sum() == 0
    with pytest.raises(ValueError, match="multiply to"):
        TTMatrix(24, 10, [4, 6, 9], 3)


def test_tt_streaming_is_taken_for_the_papers_shapes():
    tt = TTMatrix(4096, 8, [16, 16, 8, 4, 4], rank=5)
    assert tt.split == [(16, 1), (16, 1), (8, 1), (2, 2), (1, 4)]
    assert tt._stream_cost(128) < tt._dense_cost() + 128 * 4096 * 8
    assert TTMatrix(6, 4, [4, 6], rank=2).split is None  # 6 rows do not fall on the modes: dense only


LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
# Hand-derived counts on LLaMA-2-7B shapes (32 layers, width 4096, MLP 11008), each method's defaults.
LLAMA2_7B_COUNTS = {
    "lora": 32 * 4 * 8 * (4096 + 4096),  # r=8 on q, k, v, o: 8,388,608
    "rslora": 32 * 4 * 8 * (4096 + 4096),
    "dora": 32 * 4 * (8 * (4096 + 4096) + 4096),  # + a magnitude per output feature
    "vera": 32 * 4 * (256 + 4096),  # d (r=256) and b (out) per layer
    "ia3": 32 * (4096 + 4096 + 11008),  # keys, values, FFN intermediate: 614,400
    "ptuning": 20 * 4096 + (4096 * 128 + 128) + (128 * 128 + 128) + (128 * 4096 + 4096),
    "prompt_tuning": 20 * 4096,
    "prefix_tuning": 20 * 32 * 2 * 4096,
    "adapter": 32 * (2 * (4096 * 64 + 64 + 64 * 4096 + 4096) + 2 * 4096),  # Houlsby: two adapters + layer norms
    "loretta_adp": 610_560,  # the reference's count; derivation in peft_methods/loretta.py
    "loretta_rep": 102_400,
    "full": 6_738_415_616,
}


@pytest.fixture(scope="module")
def llama2_7b_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    def build():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B))
    return build


@pytest.mark.parametrize("method", sorted(LLAMA2_7B_COUNTS))
def test_llama2_7b_counts_on_the_meta_device(method, llama2_7b_on_meta):
    counts = pm.count_trainable(pm.apply_peft(llama2_7b_on_meta(), {"method": method}))
    assert counts["trainable"] == LLAMA2_7B_COUNTS[method]


def test_llama2_7b_loretta_presets_by_hand(llama2_7b_on_meta):
    # _adp: TT over [16,16,16,4,4,4] at rank 5: 16*5 + 5*16*5 + 5*16*5 + 5*4*5 + 5*4*5 + 5*4 = 1,100 per projection;
    # an adapter is two projections plus biases (64 + 4096); three adapters (gate/up inputs, down output) a layer
    tt = 1 * 16 * 5 + 5 * 16 * 5 + 5 * 16 * 5 + 5 * 4 * 5 + 5 * 4 * 5 + 5 * 4 * 1
    assert 32 * 3 * (2 * tt + 64 + 4096) == LLAMA2_7B_COUNTS["loretta_adp"]
    # _rep: A and B over [16,16,8,4,4] at rank 5 (800 each) on q_proj and v_proj
    tt = 1 * 16 * 5 + 5 * 16 * 5 + 5 * 8 * 5 + 5 * 4 * 5 + 5 * 4 * 1
    assert 32 * 2 * 2 * tt == LLAMA2_7B_COUNTS["loretta_rep"]
    counts = pm.count_trainable(pm.apply_peft(llama2_7b_on_meta(), {"method": "loretta_rep", "train_norms": True}))
    assert counts == {**counts, "adapter": 102_400, "norm": 32 * 2 * 4096}
    # the automatic shapes (4096 -> [16,16,16], 8 -> [8]) give another count, as intended
    auto = pm.count_trainable(pm.apply_peft(llama2_7b_on_meta(), {"method": "loretta_rep", "shapes": "auto"}))
    a = 1 * 16 * 5 + 5 * 16 * 5 + 5 * 16 * 5 + 5 * 8 * 1
    assert auto["trainable"] == 32 * 2 * 2 * a
    with pytest.raises(ValueError, match="no bias parameters"):
        pm.apply_peft(llama2_7b_on_meta(), {"method": "bitfit"})


@pytest.mark.integration
def test_counts_and_no_op_on_the_default_decoder():
    from backbones import load_decoder

    model, tokenizer = load_decoder()
    ids = tokenizer(["Retrieval helps small models answer"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    # SmolLM2-135M: width 576, 30 layers, k/v projections 576 -> 192 (3 key/value heads of 64)
    lora = pm.apply_peft(model, {"method": "lora", "r": 8})
    assert pm.count_trainable(lora)["adapter"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192))
    model = lora.unload()  # peft's own way back to the bare model
    rep = pm.apply_peft(model, {"method": "loretta_rep", "r": 8, "tt_rank": 5, "targets": ["q_proj"], "layers": [0]})
    # no shape of the authors' for width 576: automatic modes 576 -> [12, 8, 6], 8 -> [8]; TT rank 5
    a = 1 * 12 * 5 + 5 * 8 * 5 + 5 * 6 * 5 + 5 * 8 * 1  # A: [12, 8, 6, 8]
    b = 1 * 8 * 5 + 5 * 12 * 5 + 5 * 8 * 5 + 5 * 6 * 1  # B: [8, 12, 8, 6]
    assert pm.count_trainable(rep)["trainable"] == a + b
    with torch.no_grad():
        assert torch.equal(rep(input_ids=ids).logits, want)


def test_loretta_rep_inference_uses_cached_factors_that_follow_the_cores():
    torch.manual_seed(0)
    model = pm.apply_peft(build_tiny_lm("llama"), {"method": "loretta_rep", "r": 4, "tt_rank": 3})
    layer = next(m for m in model.modules() if type(m).__name__ == "TTLoRALayer")
    with torch.no_grad():
        for core in layer.tt_b.cores:
            core.normal_(0, 0.3)  # a non-zero update
    x = torch.randn(2, 5, layer.tt_a.in_dim)
    want = layer(x)  # grad enabled: core-by-core contraction
    with torch.no_grad():
        got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        first = layer.__dict__["_factors"][1]
        assert layer(x) is not None and layer.__dict__["_factors"][1] is first  # reused while the cores stand
        layer.tt_a.cores[0].mul_(2.0)  # an optimiser step changes a core in place
    want = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
        assert layer.__dict__["_factors"][1] is not first
