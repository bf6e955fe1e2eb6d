"""The shipped study config end to end on tiny models: every PEFT method on both models, seeds, the record, and the
table rebuilt from the record alone."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from test_train_runs import _config, tiny_setup  # noqa: F401 - the fixture is used by name

STUDY = Path(__file__).parents[1] / "configs" / "study.yaml"


def test_study_config_runs_end_to_end_on_fixtures(tiny_setup, tmp_path):  # noqa: F811
    from retrotune.config import ConfigError
    from retrotune.experiment import ExperimentConfig, grid_cells, prepare, retrofit_folder, run_cell, run_experiment

    root, tokenizer = tiny_setup
    values = yaml.safe_load(STUDY.read_text())
    shipped = {**values["run"]}
    tiny = _config(root, tokenizer, "llama", "gpt", "finetune").to_dict()
    values["run"] = {**{k: v for k, v in tiny.items() if k not in ("stage", "model", "output_dir", "peft",
                                                                   "init_from", "neighbours_cache")},
                     "neighbours": shipped["neighbours"], "eval_batch_size": 4}
    values["run"]["train"].update(max_steps=2, eval_every=2, save_every=2)
    values["retrofit"]["train"].update(max_steps=4, eval_every=2, save_every=2)
    values["retrofit"]["data"]["sequence_chunks"] = 3
    values["peft"] = [{**entry, "seeds": [0, 1]} if entry.get("seeds") else entry
                      for entry in values["peft"]]  # two seeds keep the fixture quick; the shape is the study's
    values["peft"] = [{**e, "n_virtual": 4} if e["method"] in ("ptuning", "prompt_tuning") else e
                      for e in values["peft"]]
    values.update(output_dir=str(tmp_path / "study"), record=str(tmp_path / "record"), corpus=None)
    exp = ExperimentConfig(**values)
    first = run_experiment(exp)

    methods = [e["method"] for e in values["peft"]]
    assert methods == ["lora", "ptuning", "prompt_tuning", "adapter", "ia3", "loretta_adp", "loretta_rep"]
    table = [(row["model"], row["method"]) for row in first["rows"]]
    assert len(table) == 3 + 2 * len(methods)  # zero-shot rows, then every method on both models
    for method in methods:
        assert ("GPT + neighbours in prompt", method) in table and ("RETRO", method) in table
    lora = [row for row in first["rows"] if row["method"] == "lora"]
    assert [row["seeds"] for row in lora] == [[0, 1], [0, 1]]
    for row in first["rows"]:
        assert row["n"] == 4 and row["f1_ci"][0] <= row["f1"] <= row["f1_ci"][1]
        if row["method"] != "zero-shot" or row["kind"] != "gpt_closed_book":
            assert "retrieval_gain_f1_ci" in row and "f1_none" in row  # every reading row keeps its controls
    assert {"index", "retro-fit", "zero-shot rows", "gpt-lora-nall-s0"} <= set(first["stages"])  # time by stage
    assert first["wall_seconds"] >= sum(first["stages"][name] for name in first["stages"] if "-nall-" in name) * 0.9
    assert {f["finding"][:2] for f in first["findings"]} == {"1.", "2.", "3.", "4."}
    assert all(f["verdict"] in ("supported", "contradicted", "inconclusive") for f in first["findings"])
    retrofit = json.loads((tmp_path / "record" / "retrofit.json").read_text())
    assert retrofit["validation"] and "val_loss_shuffled" in retrofit["validation"][0]
    # the retro-fit never reads the evaluation articles' text
    summary = json.loads((tmp_path / "study" / "retrofit" / "final" / "run.json").read_text())
    assert summary["config"]["data"]["exclude_groups"] == ["Geology"]
    for name in ("results.md", "results.csv", "score_vs_parameters.png", "retrofit_reading.png", "report.html",
                 "eval_questions.jsonl"):
        assert (tmp_path / "study" / name).stat().st_size > 0

    # a finished retro-fit or cell made with another setup is refused, never silently reused
    deeper = ExperimentConfig(**{**values, "run": {**values["run"],
                                                   "retro": {**values["run"]["retro"], "neighbour_depth": 1}}})
    with pytest.raises(ConfigError, match=r"retro-fit in .* \(retro.neighbour_depth: None there, 1 now\)"):
        prepare(deeper)
    wider = ExperimentConfig(**{**values, "peft": [{**values["peft"][0], "r": 16}] + values["peft"][1:]})
    name, *_, folder, config = next(grid_cells(wider, retrofit_folder(wider)))
    with pytest.raises(ConfigError, match=r"finished cell .* \(peft.r: 8 there, 16 now\)"):
        run_cell(wider, name, folder, config)

    # the record alone rebuilds the same table: nothing is trained or evaluated again
    shutil.rmtree(tmp_path / "study")
    again = run_experiment(exp)
    assert again["table"] == first["table"]
    assert not (tmp_path / "study" / "cells").exists()

    # so is a recorded row: the GPT rows do not depend on RETRO's design, the RETRO rows do
    with pytest.raises(ConfigError, match=r"gpt-lora-nall-s0.json was made with another setup \(peft.r: 8 there"):
        run_experiment(wider, partial=True)
    with pytest.raises(ConfigError, match=r"zero-shot-retro.json was made with another setup "
                                          r"\(retro.neighbour_depth: None there, 1 now; retrofit.retro"):
        run_experiment(deeper, partial=True)
    # a zero-shot row computes in the run's precision, so another precision is another setup
    bf16 = ExperimentConfig(**{**values, "run": {**values["run"],
                                                 "train": {**values["run"]["train"], "precision": "bf16"}}})
    with pytest.raises(ConfigError, match=r"zero-shot-gpt_closed_book.json was made with another setup "
                                          r"\(train.precision: None there, 'bf16' now\)"):
        run_experiment(bf16, partial=True)
    row = tmp_path / "record" / "rows" / "gpt-ia3-nall-s0.json"
    kept = row.read_text()
    data = json.loads(kept)
    del data["row"]["setup"]
    row.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="gpt-ia3-nall-s0.json does not say which setup made it"):
        run_experiment(exp, partial=True)
    row.write_text(kept)

    # a study in progress: the table of what is recorded, naming the rest, with nothing trained or evaluated
    (tmp_path / "record" / "rows" / "retro-loretta_rep-nall-s0.json").unlink()
    partial = run_experiment(exp, partial=True)
    assert partial["missing"] == ["retro-loretta_rep-nall-s0"]
    assert len(partial["rows"]) == len(first["rows"]) - 1
    assert "Not run yet (1): retro-loretta_rep-nall-s0." in (tmp_path / "study" / "results.md").read_text()
    assert not (tmp_path / "study" / "cells").exists()
