"""Trainable parameters per PEFT method, as a markdown table, on a GPT model and its RETRO counterpart.

Takes model factories (each call gives a fresh base) and method configs; gives one row per config with the exact
count from `count_trainable`, its share of the model's parameters and the breakdown by kind.

    python -m retrotune.parameter_table                   # default decoder (SmolLM2-135M) and its RETRO
    python -m retrotune.parameter_table --tiny            # a 4-layer toy Llama, no files needed
    python -m retrotune.parameter_table --model PATH      # any HF causal LM folder, alias or hub id
    python -m retrotune.parameter_table --model llama3-8b # a shape from backbones.SHAPES, no files needed

Models are built on the meta device: shapes, no weights. It lives here rather than in `peft_methods/` because it
builds RETRO models: the PEFT library knows nothing of the models it tunes.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

from torch import nn
from tqdm import tqdm

from peft_methods import KINDS, apply_peft, count_trainable, peft_config_from_dict

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


def tiny_config():
    """A 4-layer toy Llama's config: what `--tiny` builds."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def load_cli_decoder(name: Optional[str], tiny: bool) -> nn.Module:
    """The decoder the command lines use, with weights: a seeded toy Llama, or the named (default) decoder."""
    import torch
    from transformers import AutoModelForCausalLM

    from backbones import DEFAULT_DECODER, load_decoder

    if tiny:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config()).eval()
    return load_decoder(name or DEFAULT_DECODER)[0]


def decoder_config(name: Optional[str], tiny: bool):
    """The decoder's config alone, without loading its weights."""
    from backbones import DEFAULT_DECODER, decoder_config as resolve_config

    return tiny_config() if tiny else resolve_config(name or DEFAULT_DECODER)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 2 with one `error: ...` line when the model cannot be found or read (`--debug`: traceback)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="decoder alias, folder, hub id or a shape of backbones.SHAPES (default: "
                                        "the project's default decoder)")
    parser.add_argument("--tiny", action="store_true", help="use a 4-layer toy Llama instead")
    parser.add_argument("--chunk-size", type=int, default=64, help="RETRO chunk size m for the RETRO column")
    parser.add_argument("--no-retro", action="store_true", help="GPT column only")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    args = parser.parse_args(argv)
    if args.chunk_size <= 0:
        parser.error(f"--chunk-size must be a positive number of tokens, got {args.chunk_size}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backbones import meta_decoder

    try:
        config = decoder_config(args.model, args.tiny)
    except OSError as error:  # a missing folder or file, an unknown alias, no hub: the user's to fix
        if args.debug:
            raise
        print(f"error: the decoder {args.model or 'smollm2-135m'!r} could not be loaded ({str(error).splitlines()[0]})"
              f"; pass --model with a model folder or alias, or --tiny", file=sys.stderr)
        return 2

    def base() -> nn.Module:  # shapes only: counting needs no weights
        return meta_decoder(config)

    models: dict[str, Factory] = {"GPT": base}
    if not args.no_retro:
        from retro import RetroConfig, retrofit

        chunk = 4 if args.tiny else args.chunk_size
        models["RETRO"] = lambda: retrofit(base(), RetroConfig(chunk_size=chunk))

        def joint() -> nn.Module:
            return retrofit(base(), RetroConfig(chunk_size=chunk, attention="joint"))

        try:
            joint()
            models["RETRO joint CCA"] = joint
        except ValueError:  # joint CCA reads through Llama-style attention only
            pass
    print(parameter_table(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
