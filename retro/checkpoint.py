"""Save and load only what retro-fitting added, tied to the base model it was trained on.

A checkpoint directory holds `retro.safetensors` (encoder and CCA weights) and `retro.json` (the RetroConfig and the
identity of the base: name, architecture, sizes and a fingerprint of its embedding table). Loading onto another base
model, or into a model built with another chunk size, is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RetroConfig
from .model import RetroModel, retrofit

WEIGHTS, META = "retro.safetensors", "retro.json"
FORMAT_VERSION = 1


def base_identity(base: nn.Module) -> dict:
    """Who the base model is; the fingerprint hashes the embedding table rounded to bfloat16, so the same weights
    loaded in float32 or bfloat16 agree."""
    cfg = base.config.get_text_config()
    emb = base.get_input_embeddings().weight.detach()
    digest = hashlib.sha256(emb.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()).hexdigest()
    return {
        "name_or_path": str(getattr(base.config, "_name_or_path", "") or getattr(base, "name_or_path", "")),
        "architecture": (base.config.architectures or [type(base).__name__])[0],
        "model_type": base.config.model_type,
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "embedding_sha256": digest,
    }


def save_retro(model: RetroModel, path: str | Path) -> Path:
    """Write the added weights and their metadata into directory `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.retro_state_dict().items()}
    save_file(tensors, str(path / WEIGHTS))
    meta = {"format_version": FORMAT_VERSION, "retro_config": model.config.to_dict(),
            "base_model": base_identity(model.base)}
    (path / META).write_text(json.dumps(meta, indent=2))
    return path


def _read_meta(path: Path) -> dict:
    meta_file = path / META
    if not meta_file.is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a RETRO checkpoint: expected {META} and {WEIGHTS} (written by "
                                f"retro.save_retro)")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _check_base(meta: dict, base: nn.Module, path: Path) -> None:
    saved, here = meta.get("base_model", {}), base_identity(base)
    diffs = [f"{k}: saved {saved.get(k)!r}, given {here[k]!r}" for k in
             ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "embedding_sha256")
             if saved.get(k) != here[k]]
    if diffs:
        raise ValueError(f"{path / META}: these RETRO weights were trained on base model "
                         f"{saved.get('name_or_path')!r}, not on the one given ({here['name_or_path']!r}); "
                         f"mismatched fields: " + "; ".join(diffs) + ". Load them onto the base they were trained on.")


def load_retro_weights(model: RetroModel, path: str | Path) -> RetroModel:
    """Load saved weights into an existing `model`; refuses another base model or another RETRO shape."""
    path = Path(path)
    meta = _read_meta(path)
    saved_cfg = RetroConfig.from_dict(meta["retro_config"])
    if saved_cfg.chunk_size != model.config.chunk_size:
        raise ValueError(f"{path / META}: retro_config.chunk_size is {saved_cfg.chunk_size} but the model was built "
                         f"with chunk size {model.config.chunk_size}; rebuild with RetroConfig(chunk_size="
                         f"{saved_cfg.chunk_size}) or use retro.load_retro(path, base)")
    _check_base(meta, model.base, path)
    for field in ("attention", "cca_layers", "encoder_layers", "encoder_width", "neighbour_length"):
        if getattr(saved_cfg, field) != getattr(model.config, field):
            raise ValueError(f"{path / META}: retro_config.{field} is {getattr(saved_cfg, field)} but the model has "
                             f"{getattr(model.config, field)}; build the model from the saved config "
                             f"(retro.load_retro(path, base))")
    state = load_file(str(path / WEIGHTS))
    own = model.retro_state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS}: weights do not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    dev = model.get_input_embeddings().weight.device
    with torch.no_grad():
        model.encoder.load_state_dict({k[len("encoder."):]: v.to(dev) for k, v in state.items()
                                       if k.startswith("encoder.")}, strict=True)
        model.cca.load_state_dict({k[len("cca."):]: v.to(dev) for k, v in state.items() if k.startswith("cca.")},
                                  strict=True)
    return model


def load_retro(path: str | Path, base: nn.Module, chunk_size: int | None = None) -> RetroModel:
    """Retro-fit `base` with the saved config and load the saved weights.

    `chunk_size`, when given, is the chunk size the caller expects (e.g. the one its index was built with);
    a checkpoint trained with another one is refused.
    """
    path = Path(path)
    meta = _read_meta(path)
    cfg = RetroConfig.from_dict(meta["retro_config"])
    if chunk_size is not None and chunk_size != cfg.chunk_size:
        raise ValueError(f"{path / META}: these RETRO weights use chunk size {cfg.chunk_size}, not the requested "
                         f"{chunk_size}; use an index and config with chunk size {cfg.chunk_size}")
    _check_base(meta, base, path)
    model = retrofit(base, cfg)
    try:
        return load_retro_weights(model, path)
    except Exception:
        model.remove_hooks()  # leave the caller's base as it was
        raise
