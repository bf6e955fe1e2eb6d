"""Memory of a training run, estimated on the meta device: weights, trainable state (weights, gradients, AdamW) and
activations per token, for a decoder x PEFT method, without loading or allocating a single weight.

    python -m retrotune.memory                      # SmolLM2-135M, a 1.7B and an 8B Llama shape x full, LoRA, LoRETTA
    python -m retrotune.memory --models llama3-8b --methods lora --quantise nf4 --tokens 8192
    python -m retrotune.memory --models PATH_OR_ALIAS --methods lora ia3

Takes decoder names (`backbones.SHAPES`, aliases, folders) and PEFT configs; gives a markdown table. How each column
is counted:
- frozen weights: the parameters that do not train, at `--dtype` (bf16), or with `--quantise` the decoder layers'
  linear weights at 4.127 bits (NF4 with double quantisation, as QLoRA counts it) or 8 bits;
- trainable state: 16 bytes per trained parameter (an fp32 copy, its fp32 gradient, AdamW's two fp32 moments);
- activations per token: what autograd keeps for the backward pass, measured by running one forward pass of
  `--seq-len` tokens on the meta device through the PEFT-wrapped model and summing the distinct storages it saves
  (not the parameters), with attention counted as FlashAttention keeps it (q, k, v, output, log-sum-exp) rather than
  as the quadratic probabilities of the math kernel; the fp32 logits of the loss are included. "Checkpointed" is the
  same with gradient checkpointing of every decoder layer (its input stays, its inside is recomputed);
- total: frozen + trainable state + activations of `--tokens` tokens (checkpointed), before allocator overhead,
  CUDA context (~0.5 GiB) and temporary buffers.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

DEFAULT_MODELS = ("smollm2-135m", "smollm2-1.7b", "llama3-8b")
DEFAULT_METHODS = ({"method": "full"}, {"method": "lora"}, {"method": "loretta_rep"}, {"method": "loretta_adp"})
ATTENTION = "memory_estimate"  # a name without "flash": transformers looks those up as hub kernels
TRAINABLE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
QUANTISED_BITS = {"nf4": 4.127, "int8": 8.0}
GiB = 2 ** 30


class _FlashAttentionMemory(torch.autograd.Function):
    """Attention that keeps for the backward pass what FlashAttention-2 keeps: q, k, v, the output and one fp32
    log-sum-exp per query row. Only for counting: it has no backward."""

    @staticmethod
    def forward(ctx, query, key, value, module, attention_mask, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # (B, T, H, d)
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)  # (B, H, T)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("this attention only counts memory on the meta device")


def _flash_estimate(module, query, key, value, attention_mask, **kwargs):
    return _FlashAttentionMemory.apply(query, key, value, module, attention_mask, kwargs), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _flash_estimate)


@dataclass
class Estimate:
    parameters: int
    trainable: int
    frozen_bytes: float
    trainable_bytes: float
    activation_bytes_per_token: float
    checkpointed_bytes_per_token: float

    def total(self, tokens: int) -> float:
        return self.frozen_bytes + self.trainable_bytes + tokens * self.checkpointed_bytes_per_token


def saved_bytes_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Bytes autograd keeps per token for one training forward pass of (1, seq_len) tokens on the meta device."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t

    device = next(model.parameters()).device
    ids = torch.zeros(1, seq_len, dtype=torch.long, device=device)  # (B=1, T)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(kept.values()) / seq_len


def estimate(name: str, peft: dict, dtype: torch.dtype = torch.bfloat16, quantise: Optional[str] = None,
             seq_len: int = 512) -> Estimate:
    """The memory estimate of training decoder `name` with the PEFT config `peft` (see the module docstring)."""
    from backbones import decoder_config, meta_decoder
    from peft_methods import apply_peft

    _register_attention()
    config = decoder_config(name)
    text = config.get_text_config()

    def build(checkpointing: bool):
        model = apply_peft(meta_decoder(config, dtype=dtype, attn_implementation=ATTENTION), dict(peft))
        if checkpointing:
            inner = getattr(model, "base_model", model)
            inner = getattr(inner, "model", inner) if not hasattr(inner, "gradient_checkpointing_enable") else inner
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    model = build(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    trained = {id(p) for p in trainable}
    frozen_bytes = 0.0
    layers = _decoder_linear_weights(model) if quantise else set()
    for p in model.parameters():
        if id(p) in trained:
            continue
        bits = QUANTISED_BITS[quantise] if id(p) in layers else 8 * p.element_size()
        frozen_bytes += p.numel() * bits / 8
    per_token = saved_bytes_per_token(model, seq_len)
    # with checkpointing the recomputed layers keep nothing but their input, held outside autograd's saved tensors
    layer_inputs = text.num_hidden_layers * text.hidden_size * torch.empty((), dtype=dtype).element_size()
    checkpointed = saved_bytes_per_token(build(True), seq_len) + layer_inputs
    return Estimate(sum(p.numel() for p in model.parameters()), n_trainable, frozen_bytes,
                    n_trainable * TRAINABLE_BYTES, per_token, checkpointed)


def _decoder_linear_weights(model: torch.nn.Module) -> set[int]:
    """ids of the weights bitsandbytes quantises: every nn.Linear except the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = id(head.weight) if head is not None else None
    return {id(m.weight) for m in model.modules()
            if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and id(m.weight) != head_weight}


def memory_table(models: Sequence[str] = DEFAULT_MODELS, methods: Sequence[dict] = DEFAULT_METHODS,
                 dtype: torch.dtype = torch.bfloat16, quantise: Optional[str] = None, seq_len: int = 512,
                 tokens: int = 4096) -> str:
    from retrotune.parameter_table import describe

    lines = [f"| model | method | parameters | trainable | frozen weights | trainable state | activations / token "
             f"| checkpointed / token | total at {tokens:,} tokens |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in models:
        for peft in methods:
            e = estimate(name, peft, dtype, quantise, seq_len)
            lines.append(f"| {name} | {describe(peft)} | {e.parameters / 1e6:,.1f} M | {e.trainable:,} | "
                         f"{e.frozen_bytes / GiB:.2f} GiB | {e.trainable_bytes / GiB:.2f} GiB | "
                         f"{e.activation_bytes_per_token / 2 ** 20:.2f} MiB | "
                         f"{e.checkpointed_bytes_per_token / 2 ** 20:.3f} MiB | {e.total(tokens) / GiB:.1f} GiB |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 2 with one `error: ...` line for an unknown model or method (`--debug`: traceback)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="decoder shapes (backbones.SHAPES), aliases or folders")
    parser.add_argument("--methods", nargs="+", help="PEFT methods with their defaults (default: full, lora, "
                                                     "loretta_rep, loretta_adp)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="frozen weights and "
                                                                                         "activations")
    parser.add_argument("--quantise", choices=sorted(QUANTISED_BITS), help="frozen linear weights quantised")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens of the measured forward pass")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step for the total (batch x length)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    args = parser.parse_args(argv)
    for flag in ("seq_len", "tokens"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive number of tokens")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    methods = [{"method": m} for m in args.methods] if args.methods else DEFAULT_METHODS
    if args.quantise and any(m["method"] == "full" for m in methods):
        methods = [m for m in methods if m["method"] != "full"]  # a quantised base does not train
    try:
        print(memory_table(args.models, methods, dtype, args.quantise, args.seq_len, args.tokens))
    except (OSError, ValueError) as error:  # an unknown model or method: the user's to fix
        if args.debug:
            raise
        print(f"error: {str(error).splitlines()[0]}; pass --models with shapes of backbones.SHAPES, aliases or "
              f"folders and --methods with PEFT method names", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
