"""A quantised frozen base, QLoRA-style: the decoder's linear layers in 4-bit NF4 or 8-bit through bitsandbytes.

Takes a mode (`nf4`, `int8` or None) and the device the run uses; gives the `BitsAndBytesConfig` that
`from_pretrained` loads with. bitsandbytes kernels run on CUDA only, so anywhere else the mode is refused with
`QuantisationUnavailable` before any weight is read, never silently ignored.
"""
from __future__ import annotations

import importlib.util

import torch

QUANTISATIONS = ("nf4", "int8")


class QuantisationUnavailable(ValueError):
    pass


def check_quantise(mode: str | None, device: str | None = None) -> None:
    """Refuse a quantised base that this machine (or the chosen device) cannot run; None passes."""
    if mode is None:
        return
    if mode not in QUANTISATIONS:
        raise QuantisationUnavailable(f"quantise={mode!r} is unknown; choose nf4 (4-bit NormalFloat, QLoRA), int8 or "
                                      f"null (no quantisation)")
    if not torch.cuda.is_available():
        raise QuantisationUnavailable(
            f"quantise={mode}: a quantised base (bitsandbytes) needs a CUDA GPU and this machine has none; remove "
            f"quantise (or set quantise=null) to train with the base in full precision")
    if device is not None and not str(device).startswith("cuda"):
        raise QuantisationUnavailable(f"quantise={mode}: a quantised base needs a CUDA device, the run asks for "
                                      f"device {device!r}; drop --device or pass --device cuda")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantisationUnavailable(f"quantise={mode} needs the bitsandbytes package, which is not installed; run: "
                                      f"pip install bitsandbytes")


def quantization_config(mode: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The bitsandbytes settings of a mode: NF4 with double quantisation and `compute_dtype` matmuls (the QLoRA
    recipe), or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
