"""PEFT methods for any causal LM or RETRO model: one registry, one `apply_peft`, one record of owned parameters.

    model = apply_peft(model, peft_config_from_dict({"method": "lora", "r": 8}))
    optimiser = torch.optim.AdamW(trainable_parameters(model))
    print(count_trainable(model))          # exact counts by kind
    save_peft(model, "runs/x/adapter")     # later: load_peft(fresh_base, "runs/x/adapter")

Adding a method: write its config (a `MethodConfig` with a `method` name) and `apply(model, config) ->
(model, [(parameter, kind), ...])`, then add one `register_method` line below.
"""
from .adapters import AdapterConfig, apply_adapter
from .bitfit import BitFitConfig, apply_bitfit
from .checkpoint import load_peft, save_peft
from .core import (KINDS, MethodConfig, PeftRecord, count_trainable, get_record, owned_parameters,
                   trainable_parameters)
from .full import FullConfig, apply_full
from .hparams import HPARAM_DEFAULTS, HPARAM_SOURCES, default_hparams, resolve_hparams, split_peft_entry
from .lora import (DoRAConfig, IA3Config, LoRAConfig, RsLoRAConfig, VeRAConfig, apply_ia3, apply_lora,
                   apply_vera)
from .loretta import LorettaAdpConfig, LorettaRepConfig, apply_loretta_adp, apply_loretta_rep
from .ptuning import (PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningModel, apply_prefix_tuning,
                      apply_ptuning)
from .registry import (METHODS, apply_peft, check_fits, known_methods, merge_peft, peft_config_from_dict, register_method,
                       unmerge_peft)
from .targets import PRESETS, is_retro, resolve_targets

register_method(LoRAConfig, apply_lora, mergeable=True)
register_method(DoRAConfig, apply_lora, mergeable=True)
register_method(RsLoRAConfig, apply_lora, mergeable=True)
register_method(VeRAConfig, apply_vera, mergeable=True)
register_method(IA3Config, apply_ia3, mergeable=True)
register_method(PTuningConfig, apply_ptuning)
register_method(PromptTuningConfig, apply_ptuning)
register_method(PrefixTuningConfig, apply_prefix_tuning)
register_method(BitFitConfig, apply_bitfit)
register_method(AdapterConfig, apply_adapter)
register_method(LorettaAdpConfig, apply_loretta_adp)
register_method(LorettaRepConfig, apply_loretta_rep, mergeable=True)
register_method(FullConfig, apply_full)

__all__ = [
    "apply_peft", "check_fits", "peft_config_from_dict", "register_method", "known_methods", "METHODS", "MethodConfig",
    "LoRAConfig", "DoRAConfig", "RsLoRAConfig", "VeRAConfig", "IA3Config", "PTuningConfig", "PromptTuningConfig",
    "PrefixTuningConfig", "PTuningModel", "AdapterConfig", "LorettaAdpConfig", "LorettaRepConfig", "BitFitConfig",
    "FullConfig", "default_hparams", "resolve_hparams", "split_peft_entry", "HPARAM_DEFAULTS", "HPARAM_SOURCES", "count_trainable", "trainable_parameters", "owned_parameters", "get_record",
    "PeftRecord", "KINDS", "save_peft", "load_peft", "merge_peft", "unmerge_peft", "resolve_targets", "PRESETS",
    "is_retro",
]
