"""Checkpoints: HF PEFT format for LoRA/IA3 on GPT, our own format refused by HF peft, wrong base refused."""
import json

import pytest
import torch
from peft import PeftModel

from conftest import TINY_VOCAB, build_tiny_lm
import peft_methods as pm

IDS = torch.randint(1, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))  # (B, T)


def trained(config, family="llama"):
    model = pm.apply_peft(build_tiny_lm(family), config)
    with torch.no_grad():
        for _, param, _ in pm.owned_parameters(model):
            param.add_(0.1 * torch.randn_like(param))
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


HF_CONFIGS = [{"method": "lora", "r": 4, "targets": ["attention", "mlp"]}, {"method": "ia3"},
              {"method": "dora", "r": 4}, {"method": "rslora", "r": 4}, {"method": "vera", "r": 8},
              {"method": "prefix_tuning", "n_virtual": 3}]


@pytest.mark.parametrize("config", HF_CONFIGS, ids=[c["method"] for c in HF_CONFIGS])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_methods_load_with_hf_peft(config, family, tmp_path):
    model = trained(config, family)
    pm.save_peft(model, tmp_path, base_model="example-org/tiny-" + family)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    hf_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf_config["task_type"] == "CAUSAL_LM"
    assert hf_config["base_model_name_or_path"] == "example-org/tiny-" + family
    hf = PeftModel.from_pretrained(build_tiny_lm(family), str(tmp_path))
    assert torch.equal(logits(hf), logits(model))
    assert json.loads((tmp_path / "peft_method.json").read_text())["method"] == config["method"]
    assert torch.equal(logits(pm.load_peft(build_tiny_lm(family), tmp_path)), logits(model))


def test_auto_peft_model_loads_a_reachable_base(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    build_tiny_lm("llama").save_pretrained(tmp_path / "base")
    model = pm.apply_peft(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), {"method": "lora", "r": 4})
    with torch.no_grad():
        for _, param, _ in pm.owned_parameters(model):
            param.add_(0.1 * torch.randn_like(param))
    pm.save_peft(model, tmp_path / "adapter")  # the base id defaults to the name the base was loaded by
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert torch.equal(logits(auto), logits(model))


@pytest.mark.parametrize("method", ["loretta_rep", "loretta_adp", "adapter", "prompt_tuning", "bitfit"])
def test_our_checkpoints_are_not_mistaken_for_hf_adapters(method, tmp_path):
    family = "gpt2" if method == "bitfit" else "llama"
    pm.save_peft(trained({"method": method}, family), tmp_path)
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(build_tiny_lm(family), str(tmp_path))
    with pytest.raises(ValueError, match="not the 'lora'"):
        pm.load_peft(build_tiny_lm(family), tmp_path, method="lora")
    assert pm.load_peft(build_tiny_lm(family), tmp_path, method=method) is not None


@pytest.mark.parametrize("config", [{"method": "lora"}, {"method": "loretta_rep"}, {"method": "ptuning"},
                                    {"method": "full"}], ids=["lora", "loretta_rep", "ptuning", "full"])
def test_wrong_base_model_is_refused(config, tmp_path):
    pm.save_peft(trained(config), tmp_path)
    other = build_tiny_lm("llama", seed=1) if config["method"] != "full" else build_tiny_lm("llama", hidden=16)
    with pytest.raises(ValueError, match="different base model"):
        pm.load_peft(other, tmp_path)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_same_base_in_another_precision_is_accepted(method, tmp_path):
    model = trained({"method": method})
    pm.save_peft(model, tmp_path)
    loaded = pm.load_peft(build_tiny_lm("llama").to(torch.bfloat16), tmp_path)
    torch.testing.assert_close(logits(loaded).float(), logits(model), atol=0.1, rtol=0.1)


def test_missing_or_broken_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="peft_method.json"):
        pm.load_peft(build_tiny_lm("llama"), tmp_path)
    pm.save_peft(trained({"method": "adapter", "bottleneck": 4}), tmp_path)
    meta = json.loads((tmp_path / "peft_method.json").read_text())
    meta["config"]["bottleneck"] = 8
    (tmp_path / "peft_method.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match method 'adapter'"):
        pm.load_peft(build_tiny_lm("llama"), tmp_path)


def test_applying_twice_is_refused():
    model = pm.apply_peft(build_tiny_lm("llama"), {"method": "lora"})
    with pytest.raises(ValueError, match="already carries"):
        pm.apply_peft(model, {"method": "ia3"})
