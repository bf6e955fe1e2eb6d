"""Adapter-only checkpoints: save what a method owns, load it back onto the base model it was trained on.

Takes an adapted model (from `apply_peft`) and a directory. Every checkpoint holds `peft_method.json` (our method
name, its config, a fingerprint of the base model). The methods that come from HF peft (LoRA, DoRA, rsLoRA, VeRA,
IA3, prefix tuning) on a plain HF model are also written in the HF PEFT format (`adapter_config.json` with task type
CAUSAL_LM and the base model's id, + `adapter_model.safetensors`), loadable by `peft.PeftModel.from_pretrained` and
`peft.AutoPeftModelForCausalLM`; every other method writes `peft_weights.safetensors`, which HF peft cannot mistake
for one of its own adapters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .core import count_trainable, get_record, owned_parameters
from .registry import apply_peft, peft_config_from_dict

META_FILE = "peft_method.json"
WEIGHTS_FILE = "peft_weights.safetensors"
HF_WEIGHTS_FILE = "adapter_model.safetensors"
HF_CONFIG_FILE = "adapter_config.json"
# Tensors HF peft saves beside the trained ones: VeRA's shared random projections (regenerated from their seed).
_HF_FROZEN_SUFFIXES = ("vera_A", "vera_B")


def base_model_id(model: nn.Module) -> Optional[str]:
    """The name the base model was loaded by (`config._name_or_path`: a hub id or a folder), if it has one."""
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    name = getattr(config, "_name_or_path", None)
    return str(name) if name else None


def save_peft(model: nn.Module, directory: Union[str, Path], base_model: Optional[str] = None) -> Path:
    """Write the method's own parameters and its config to `directory` (created if needed).

    `base_model` is what HF peft records as `base_model_name_or_path` (the hub id that `AutoPeftModelForCausalLM`
    loads, rather than a local cache folder); by default the name the base was loaded by.
    """
    record = get_record(model)
    if record.merged:
        raise ValueError("the adapter is merged into the base weights; call unmerge_peft(model) before saving it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_model = base_model or base_model_id(model)
    if record.hf_format:
        model.save_pretrained(str(directory))
        config_path = directory / HF_CONFIG_FILE
        hf_config = json.loads(config_path.read_text())
        hf_config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    else:
        state = {name: param.detach().to("cpu").contiguous() for name, param, _ in owned_parameters(model)}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"method": record.method})
    meta = {"method": record.method, "config": record.config.to_dict(), "fingerprint": record.fingerprint,
            "base_model": base_model,
            "format": "hf-peft" if record.hf_format else "safetensors", "counts": count_trainable(model)}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_peft(base_model: nn.Module, directory: Union[str, Path], method: Optional[str] = None) -> nn.Module:
    """Rebuild the method on a fresh `base_model` and load the saved parameters; refuse a different base model."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {directory} was not written by peft_methods.save_peft")
    meta = json.loads(meta_path.read_text())
    if method is not None and meta["method"] != method:
        raise ValueError(f"{meta_path}: holds method {meta['method']!r}, not the {method!r} that was asked for")
    config = peft_config_from_dict(meta["config"], where=str(meta_path))
    model = apply_peft(base_model, config)
    record = get_record(model)
    if record.fingerprint != meta["fingerprint"]:
        raise ValueError(f"{meta_path}: this adapter was trained on a different base model (fingerprint "
                         f"{meta['fingerprint']}, this model {record.fingerprint}); load the base it was trained on")
    if meta["format"] == "hf-peft":
        state = load_file(str(directory / HF_WEIGHTS_FILE))
        result = set_peft_model_state_dict(model, state)
        trained = [k for k in state if not k.endswith(_HF_FROZEN_SUFFIXES)]
        # peft loads a prompt table itself and still reports its key as unexpected
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        if unexpected or len(trained) != len(record.owned):
            raise ValueError(f"{directory / HF_WEIGHTS_FILE}: holds {len(state)} tensors for {len(record.owned)} "
                             f"adapter parameters (unexpected: {unexpected[:5]})")
        return model
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = sorted(set(record.owned) - set(state)), sorted(set(state) - set(record.owned))
    shapes = dict((name, tuple(param.shape)) for name, param, _ in owned_parameters(model))
    reshaped = sorted(n for n in set(state) & set(shapes) if tuple(state[n].shape) != shapes[n])
    if missing or unexpected or reshaped:
        raise ValueError(f"{directory / WEIGHTS_FILE}: does not match method {meta['method']!r} on this model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, other shape {reshaped[:5]})")
    with torch.no_grad():
        for name, param, _ in owned_parameters(model):
            param.copy_(state[name])
    return model
