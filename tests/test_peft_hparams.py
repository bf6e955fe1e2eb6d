"""Per-method training settings: each paper's defaults, per-entry overrides, and what an experiment cell records."""
import pytest

import peft_methods as pm

RUN = {"lr": 1e-4, "max_steps": 1000, "warmup_steps": 50, "batch_size": 16}


def test_every_method_has_a_sourced_default():
    assert set(pm.HPARAM_DEFAULTS) == set(pm.known_methods()) == set(pm.HPARAM_SOURCES)
    lora = pm.default_hparams("lora")["lr"]
    # soft prompts, vectors and tensor trains train faster than LoRA; full fine-tuning ~10x slower
    for method in ("ia3", "ptuning", "prompt_tuning", "vera", "loretta_adp", "loretta_rep"):
        assert pm.default_hparams(method)["lr"] >= 10 * lora, method
    assert pm.default_hparams("full")["lr"] < lora / 5


def test_resolution_order_run_then_method_then_overrides():
    cell = pm.resolve_hparams(RUN, "full")
    assert cell == {"lr": 2e-5, "max_steps": 1000, "warmup_steps": 30, "batch_size": 16}
    cell = pm.resolve_hparams(RUN, "lora", {"lr": 3e-4, "max_steps": 200})
    assert cell == {**RUN, "lr": 3e-4, "max_steps": 200, "warmup_steps": 12}  # 6% of the overridden steps
    assert pm.resolve_hparams(RUN, "adapter", {"warmup_steps": 7})["warmup_steps"] == 7
    assert pm.resolve_hparams(RUN, "ia3", {"warmup_ratio": 0.5})["warmup_steps"] == 500
    assert RUN["lr"] == 1e-4  # the run's settings are not modified
    with pytest.raises(ValueError, match="warmup_ratio"):
        pm.resolve_hparams(RUN, "lora", {"warmup_ratio": 1.5})


def test_peft_entries_split_into_method_fields_and_train_overrides():
    fields, train = pm.split_peft_entry({"method": "lora", "r": 8, "train": {"lr": 3e-4}})
    assert fields == {"method": "lora", "r": 8} and train == {"lr": 3e-4}
    assert pm.split_peft_entry({"method": "ia3"}) == ({"method": "ia3"}, {})
    with pytest.raises(ValueError, match="train must be a mapping"):
        pm.split_peft_entry({"method": "ia3", "train": 3e-4}, where="configs/x.yaml")


def test_experiment_cells_resolve_per_method():
    from retrotune.experiment import ExperimentConfig, cell_hparams

    exp = ExperimentConfig(run={"train": {"lr": 5e-4, "max_steps": 100, "warmup_steps": 10}},
                           peft=[{"method": "lora", "r": 4, "train": {"lr": 1e-3}}, {"method": "full"}])
    fields, train = cell_hparams(exp, exp.peft[0])
    assert fields == {"method": "lora", "r": 4} and train["lr"] == 1e-3 and train["warmup_steps"] == 6
    fields, train = cell_hparams(exp, exp.peft[1])
    assert train["lr"] == 2e-5 and train["warmup_steps"] == 3 and train["max_steps"] == 100
