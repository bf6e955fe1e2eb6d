"""Two train.py runs of one config and seed log the same losses step by step: the PEFT and RETRO layers are
initialised from the run's seed (they used to take a seed the libraries draw at import), and torch runs in
deterministic mode on CPU."""
import json
from pathlib import Path

import pytest
import torch

from test_train_runs import _config, tiny_setup  # noqa: F401 - the module-scoped fixture

pytestmark = pytest.mark.integration


def _losses(output_dir):
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["gpt", "retro"])
def test_same_seed_runs_give_identical_losses(tiny_setup, model):  # noqa: F811
    from retrotune.cell import train_run

    root, tokenizer = tiny_setup
    runs = []
    for repeat in range(2):
        torch.manual_seed(1000 + repeat)  # whatever state the process is in before the run must not matter
        config = _config(root, tokenizer, "llama", model, "finetune", {"method": "lora", "r": 4}, max_steps=4,
                         eval_every=4, save_every=4)
        config.output_dir = str(root / f"determinism-{model}-{repeat}")
        train_run(config)
        runs.append(_losses(config.output_dir))
    assert len(runs[0]) == 4 and runs[0] == runs[1]  # exact equality, every step
    assert len(set(runs[0])) > 1  # the runs did train
