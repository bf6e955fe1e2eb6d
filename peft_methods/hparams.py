"""Per-method training hyper-parameters: each paper's learning rate and warm-up, overridable per method.

Takes a method name (or a peft entry such as `{method: lora, r: 8, train: {lr: 3e-4}}`) and a run's training
settings; gives the settings a cell of that method trains with: the run's, updated by the method's defaults,
updated by the entry's own `train` overrides. Methods differ by more than 10x in the rate they need (soft prompts
and vectors want 10-100x LoRA's, full fine-tuning 10x less), so one rate for all would favour whichever method it
happens to suit.

    default_hparams("ia3")                          # {'lr': 0.003, 'warmup_ratio': 0.06}
    resolve_hparams({"lr": 1e-4, "max_steps": 1000, "warmup_steps": 50}, "full")
    # {'lr': 2e-05, 'max_steps': 1000, 'warmup_steps': 30}
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

# lr: peak learning rate (AdamW); warmup_ratio: share of max_steps spent warming up (turned into warmup_steps).
HPARAM_DEFAULTS: dict[str, dict] = {
    "lora": {"lr": 2e-4, "warmup_ratio": 0.06},
    "rslora": {"lr": 2e-4, "warmup_ratio": 0.06},
    "dora": {"lr": 2e-4, "warmup_ratio": 0.06},
    "vera": {"lr": 4e-3, "warmup_ratio": 0.06},
    "ia3": {"lr": 3e-3, "warmup_ratio": 0.06},
    "ptuning": {"lr": 3e-3, "warmup_ratio": 0.06},
    "prompt_tuning": {"lr": 3e-2, "warmup_ratio": 0.06},
    "prefix_tuning": {"lr": 5e-3, "warmup_ratio": 0.06},
    "adapter": {"lr": 1e-4, "warmup_ratio": 0.1},
    "loretta_adp": {"lr": 2e-3, "warmup_ratio": 0.06},
    "loretta_rep": {"lr": 2e-3, "warmup_ratio": 0.06},
    "bitfit": {"lr": 1e-3, "warmup_ratio": 0.06},
    "full": {"lr": 2e-5, "warmup_ratio": 0.03},
}

# Where each default comes from (also rendered in the README).
HPARAM_SOURCES: dict[str, str] = {
    "lora": "Hu et al. 2021: 2e-4 for GPT-2 on E2E; warm-up 6% as in their RoBERTa runs",
    "rslora": "same rate as LoRA (Kalajdzievski 2023 changes only the scaling)",
    "dora": "Liu et al. 2024: LoRA's rates (1e-4 to 2e-4 on LLaMA)",
    "vera": "Kopiczko et al. 2024: rates of 1e-3 to 1e-2, ~10-20x LoRA's, for the scaling vectors",
    "ia3": "Liu et al. 2022 (T-Few): 3e-3, 6% warm-up",
    "ptuning": "Liu et al. 2021/2022: prompt encoders train at ~10x LoRA's rate (P-tuning v2: 5e-3 to 1e-2)",
    "prompt_tuning": "Lester et al. 2021 use 0.3 with Adafactor; 3e-2 is the usual AdamW equivalent",
    "prefix_tuning": "P-tuning v2's 5e-3 (Li & Liang 2021 use 5e-5 only with their MLP reparameterisation)",
    "adapter": "Houlsby et al. 2019: 1e-4 (searched 3e-5 to 1e-3), 10% warm-up",
    "loretta_adp": "Yang et al. 2024: tensor-train factors train at ~10x LoRA's rate",
    "loretta_rep": "Yang et al. 2024: tensor-train factors train at ~10x LoRA's rate",
    "bitfit": "Ben Zaken et al. 2022: searched 1e-4 to 1e-3; biases take the high end",
    "full": "~10x below LoRA: 2e-5 with 3% warm-up (the Alpaca/LLaMA full fine-tuning recipe)",
}

TRAIN_KEY = "train"  # the key of a peft entry that holds per-method training overrides


def default_hparams(method: str) -> dict:
    """The method's default training settings (a copy); unknown methods get none."""
    return dict(HPARAM_DEFAULTS.get(method, {}))


def split_peft_entry(entry: Mapping, where: str = "peft entry") -> tuple[dict, dict]:
    """({method fields}, {train overrides}) from one peft entry; `train` must be a mapping if present."""
    fields = dict(entry)
    overrides = fields.pop(TRAIN_KEY, None) or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}: {TRAIN_KEY} must be a mapping of training settings, e.g. {{lr: 3.0e-4}}; "
                         f"got {overrides!r}")
    return fields, dict(overrides)


def resolve_hparams(train: Mapping, method: str, overrides: Optional[Mapping] = None) -> dict:
    """The run's `train` settings, updated by `method`'s defaults, updated by `overrides`.

    A `warmup_ratio` (from the defaults or the overrides) becomes `warmup_steps` of the resolved `max_steps`, unless
    the overrides set `warmup_steps` themselves.
    """
    out = copy.deepcopy(dict(train))
    defaults = default_hparams(method)
    overrides = dict(overrides or {})
    ratio = overrides.pop("warmup_ratio", None)
    if ratio is None and "warmup_steps" not in overrides:
        ratio = defaults.pop("warmup_ratio", None)
    else:
        defaults.pop("warmup_ratio", None)
    out.update(defaults)
    out.update(overrides)
    if ratio is not None:
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"warmup_ratio={ratio!r} for method {method!r}: must lie in [0, 1)")
        if "max_steps" in out:
            out["warmup_steps"] = int(round(float(ratio) * int(out["max_steps"])))
    return out
