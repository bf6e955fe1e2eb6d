"""Every shipped config loads and validates; overrides reach nested fields; bad values name the field."""
from pathlib import Path

import pytest

from retrotune.config import ConfigError, load_config
from retrotune.experiment import load_experiment

CONFIGS = Path(__file__).parents[1] / "configs"
EXPERIMENTS = {"demo.yaml", "study.yaml", "study_scale.yaml", "experiment_gpu.yaml"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    from peft_methods import peft_config_from_dict, split_peft_entry
    from retrotune.experiment import cell_hparams

    if path.name == "paper.yaml":
        from retrotune.grid import load_grid

        grid = load_grid(str(path))  # every cell's config is built and checked
        assert len(grid.tasks) == 6 and len(grid.methods) == 5 and len(grid.base_models) >= 2
        return
    if path.name in EXPERIMENTS:
        experiment = load_experiment(str(path))
        assert experiment.models and experiment.peft
        for entry in experiment.peft:
            peft = {key: value for key, value in entry.items() if key != "seeds"}  # the grid's, not the method's
            fields, train = split_peft_entry(peft, where=str(path))
            peft_config_from_dict(fields, where=str(path))
            cell_hparams(experiment, peft)  # the cell's training settings resolve and validate
    else:
        config = load_config(str(path))
        assert config.stage in ("retrofit", "finetune")
        peft_config_from_dict(config.peft, where=str(path))


def test_overrides_reach_nested_fields():
    config = load_config(str(CONFIGS / "finetune_gpt_lora.yaml"), ["train.lr=1e-3", "peft.r=16", "data.train_size=100"])
    assert config.train.lr == pytest.approx(1e-3) and config.peft["r"] == 16 and config.data.train_size == 100
    assert config.train.batch_size == 4  # untouched siblings stay


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="train.schedule 'cubic' is unknown"):
        load_config(str(CONFIGS / "finetune_gpt_lora.yaml"), ["train.schedule=cubic"])
    with pytest.raises(ConfigError, match=r"train: unknown field\(s\) \['lr_typo'\]"):
        load_config(str(CONFIGS / "finetune_gpt_lora.yaml"), ["train.lr_typo=1"])
    with pytest.raises(ConfigError, match="set model: retro"):
        load_config(str(CONFIGS / "retrofit.yaml"), ["model=gpt"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))
