"""`eval.py experiment --plan`: one shell line per cell that runs unchanged on one machine, then `--collect` builds
the table from the finished cells and trains nothing."""
import json
import os
import subprocess
import sys

import pytest
import yaml

import eval as eval_cli
from test_train_runs import _config, tiny_setup  # noqa: F401 - the fixture: a tiny index, QA file and decoder


def _experiment(root, tokenizer, out):
    run = {key: value for key, value in _config(root, tokenizer, "llama", "gpt", "finetune").to_dict().items()
           if key not in ("stage", "model", "output_dir", "peft", "init_from", "neighbours_cache")}
    run["train"].update(max_steps=2, eval_every=2, save_every=2)
    run["data"]["validation_generate"] = 0
    return {"output_dir": str(out), "run": run, "corpus": None, "zero_shot": ["gpt"], "controls": [],
            "models": ["gpt", "retro"], "peft": [{"method": "lora", "r": 4}]}


def test_plan_runs_as_a_shell_script_then_collects(tiny_setup, tmp_path, capsys):
    root, tokenizer = tiny_setup
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(_experiment(root, tokenizer, tmp_path / "exp")))
    script = tmp_path / "plan.sh"
    assert eval_cli.main(["experiment", str(file), "--plan", str(script)]) == 0
    lines = script.read_text().splitlines()
    cells = [line for line in lines if " --cell " in line and not line.startswith("#")]
    assert [line.split(" --cell ")[1] for line in cells] == ["gpt-lora-nall-s0  # gpus=1", "retro-lora-nall-s0  # gpus=1"]
    assert " --prepare" in lines[-len(cells) - 2] and lines[-1].endswith(" --collect")

    # collecting before the cells ran names what is missing
    assert eval_cli.main(["experiment", str(file), "--collect"]) == 2
    assert "2 cell(s)" in capsys.readouterr().err

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [(row["model"], row["method"]) for row in results["rows"]] == [
        ("GPT + neighbours in prompt", "zero-shot"), ("GPT + neighbours in prompt", "lora"), ("RETRO", "lora")]
    stamp = (tmp_path / "exp" / "cells" / "retro-lora-nall-s0" / "final" / "run.json").stat().st_mtime_ns
    assert eval_cli.main(["experiment", str(file), "--collect"]) == 0  # reads back, trains nothing
    assert (tmp_path / "exp" / "cells" / "retro-lora-nall-s0" / "final" / "run.json").stat().st_mtime_ns == stamp
    assert "| RETRO | lora |" in (tmp_path / "exp" / "results.md").read_text()


def test_unknown_cell_and_bad_gpus_are_refused(tiny_setup, tmp_path, capsys):
    root, tokenizer = tiny_setup
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(_experiment(root, tokenizer, tmp_path / "exp")))
    assert eval_cli.main(["experiment", str(file), "--cell", "gpt-nope"]) == 2
    assert "--cell 'gpt-nope' is not a cell of this experiment; its cells are ['gpt-lora-nall-s0'" in \
        capsys.readouterr().err
    assert eval_cli.main(["experiment", str(file), "--plan", "-", "--gpus", "0"]) == 2
    assert "--gpus must be a positive number" in capsys.readouterr().err
    assert eval_cli.main(["experiment", str(file), "--plan", "-", "--gpus", "2"]) == 0
    assert "-m torch.distributed.run --nproc_per_node 2 " in capsys.readouterr().out
