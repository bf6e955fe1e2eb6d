"""The paper's grid: tasks x base models x {GPT, RETRO} x methods (zero-shot and PEFT methods) -> one cell each
(retrotune/cell.py) -> the paper-layout table (retrotune/table.py).

    grid = load_grid("configs/paper.yaml")
    run_grid(grid)                                   # every cell; finished cells are read back, not rerun
    run_grid(grid, cells=["qasper/smollm2-135m/retro/lora"])     # one cell by name: task/base/model/method
    run_grid(grid, methods=["zero_shot"])            # the zero-shot row, all tasks

Output folder: `cells/<task>/<base>/<model>/<method>-s<seed>/` (final/, eval/), `retrofit/<base>/` (RETRO's
retro-fit, one per base model, that RETRO cells start from), `neighbours/` (shared cache), `results.json` (a row per
cell and seed, its score with `score_ci`, the 95% interval over its `n` questions), `paper_table.md`.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retrotune.config import ConfigError, RunConfig, apply_overrides
from retrotune.runs import FINAL
from retrotune.table import paper_table, score_interval
from retrotune.tasks import PAPER_TASKS, TASKS

ZERO_SHOT = "zero_shot"
LABELS = {"gpt": "GPT", "retro": "RETRO"}


def _merge(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for key, value in copy.deepcopy(layer or {}).items():
            out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class GridConfig:
    output_dir: str = "runs/paper"  # paper_table.md and cells/
    run: dict = field(default_factory=dict)  # RunConfig fields every cell shares
    tasks: dict = field(default_factory=lambda: {t: {} for t in PAPER_TASKS})  # task -> its RunConfig fields
    # base decoders, each {decoder: an alias, folder or model id, name: its label in the table}
    base_models: list = field(default_factory=lambda: [{"name": "smollm2-135m", "decoder": "smollm2-135m"}])
    models: list = field(default_factory=lambda: ["gpt", "retro"])  # gpt and/or retro
    # zero_shot, or a PEFT entry ({method: lora, r: 8, train: {lr: ...}}); `name` labels an entry in the table
    methods: list = field(default_factory=lambda: [ZERO_SHOT, {"method": "ptuning"}, {"method": "adapter"},
                                                   {"method": "lora"}, {"method": "loretta_rep"}])
    retrofit: dict | None = None  # RunConfig fields of the retro-fit each base model's RETRO starts from
    retro_peft: dict = field(default_factory=dict)  # merged into RETRO cells' PEFT entries, e.g. {train_retro: true}
    seeds: list = field(default_factory=lambda: [0])  # one cell per seed
    controls: list = field(default_factory=list)  # shuffled / none: also score every cell under these

    def __post_init__(self):
        if not isinstance(self.tasks, dict) or not self.tasks:
            raise ConfigError("tasks must be a mapping of task name -> its settings (data, index, ...)")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ConfigError(f"tasks: {unknown} unknown; choose from {sorted(TASKS)}")
        for i, base in enumerate(self.base_models):
            if not isinstance(base, dict) or "decoder" not in base:
                raise ConfigError(f"base_models[{i}] must be a mapping with 'decoder' (and a short 'name'), got "
                                  f"{base!r}")
        names = [base_name(b) for b in self.base_models]
        if len(set(names)) != len(names):
            raise ConfigError(f"base_models: names {names} repeat; give each a distinct 'name'")
        for model in self.models:
            if model not in LABELS:
                raise ConfigError(f"models: {model!r} unknown; choose from {sorted(LABELS)}")
        labels = [method_name(m) for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"methods: labels {labels} repeat; give entries a distinct 'name'")
        for m in self.methods:
            if m != ZERO_SHOT and not (isinstance(m, dict) and "method" in m):
                raise ConfigError(f"methods: {m!r} must be {ZERO_SHOT!r} or a PEFT entry such as {{method: lora}}")
        from retrotune.preflight import check_peft

        for i, m in enumerate(self.methods):
            if m != ZERO_SHOT:
                check_peft({k: v for k, v in m.items() if k != "name"}, f"methods[{i}]")
        from retrotune.preflight import check_peft_fits

        for name in self.tasks:  # every cell's config is checked before anything runs
            for base in self.base_models:
                for model in self.models:
                    for method in self.methods:
                        config = cell_config(self, name, base, model, method, 0)
                        if method != ZERO_SHOT:
                            check_peft_fits(config, f"cell {cell_name(name, base, model, method)}: peft")


def base_name(base: dict) -> str:
    return str(base.get("name") or Path(base["decoder"]).name)


def method_name(method) -> str:
    return ZERO_SHOT if method == ZERO_SHOT else str(method.get("name") or method["method"])


def load_grid(path: str, overrides: list[str] = ()) -> GridConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such grid file (the paper's is configs/paper.yaml)")
    values = apply_overrides(yaml.safe_load(file.read_text()) or {}, list(overrides))
    try:
        return GridConfig(**values)
    except (TypeError, ConfigError) as error:
        raise ConfigError(f"{file}: {error}") from None


def cell_name(task: str, base: dict, model: str, method) -> str:
    return f"{task}/{base_name(base)}/{model}/{method_name(method)}"


def cell_config(grid: GridConfig, task: str, base: dict, model: str, method, seed: int) -> RunConfig:
    from peft_methods import resolve_hparams, split_peft_entry

    out = Path(grid.output_dir)
    layers = [grid.run, {k: v for k, v in base.items() if k not in ("name", "retrofit")}, grid.tasks[task] or {}]
    values = _merge(*layers, {"task": task, "model": model, "stage": "finetune",
                              "neighbours_cache": str(out / "neighbours"),
                              "output_dir": str(out / "cells" / cell_name(task, base, model, method)) + f"-s{seed}"})
    values.setdefault("train", {})["seed"] = seed
    if model == "retro" and grid.retrofit is not None:
        values["init_from"] = str(out / "retrofit" / base_name(base))
    if method != ZERO_SHOT:
        entry = {**method, **(grid.retro_peft if model == "retro" else {})}
        entry.pop("name", None)
        try:
            fields, overrides = split_peft_entry(entry, where=f"methods entry {method}")
            values["train"] = resolve_hparams(_merge(RunConfig().train.__dict__, values.get("train")),
                                              fields["method"], overrides)
        except ValueError as error:
            raise ConfigError(f"methods entry {method}: {error}") from None
        values["peft"] = fields
    try:
        return RunConfig(**values)
    except (TypeError, ConfigError) as error:
        raise ConfigError(f"cell {cell_name(task, base, model, method)}: {error}") from None


def _cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


def retrofit(grid: GridConfig, base: dict) -> None:
    """RETRO's retro-fit for one base model (once; RETRO cells of every task start from it)."""
    from retrotune.cell import train_run

    folder = Path(grid.output_dir) / "retrofit" / base_name(base)
    if grid.retrofit is None or (folder / FINAL / "run.json").is_file():
        return
    values = _merge(grid.run, {k: v for k, v in base.items() if k not in ("name", "retrofit")}, grid.retrofit,
                    base.get("retrofit") or {}, {"stage": "retrofit", "model": "retro", "output_dir": str(folder),
                                                 "init_from": None})
    train_run(RunConfig(**values))


def question_scores(eval_dir: Path, task: str) -> dict:
    """The per-question values behind a cell's task score, in percent, from `eval_dir/true/predictions.jsonl`:
    {"ids": [...], "statistic": "mean", "columns": {score: (Q,)}} for a score that is a mean over questions (EM,
    F1, ROUGE-L; accuracy over the labelled questions), or {"statistic": "geometric_mean", "columns": {rouge_1,
    rouge_2, rouge_l}} for QMSum's score, the geometric mean of the dataset's ROUGE means, not a per-question mean."""
    score = TASKS[task].score
    file = Path(eval_dir) / "true" / "predictions.jsonl"
    lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if score in ("accuracy", "accuracy_letter"):
        pick = "chosen" if score == "accuracy" else "letter"
        lines = [line for line in lines if line.get("label") is not None]
        columns = {score: [100.0 * (line[pick] == line["label"]) for line in lines]}
    else:
        names = ("rouge_1", "rouge_2", "rouge_l") if score == "rouge_geo" else (score,)
        missing = [name for name in names if any(name not in line for line in lines)]
        if missing:
            raise ValueError(f"{file}: questions lack {missing}; re-evaluate the cell (delete {file.parent.parent})")
        columns = {name: [100.0 * float(line[name]) for line in lines] for name in names}
    if not lines:
        raise ValueError(f"{file}: no scored questions")
    return {"ids": [str(line["id"]) for line in lines],
            "statistic": "geometric_mean" if score == "rouge_geo" else "mean", "columns": columns}


def run_cell(grid: GridConfig, task: str, base: dict, model: str, method, seed: int = 0,
             finished_only: bool = False) -> dict | None:
    """One cell: zero-shot evaluation, or training (stages 1-4) then evaluation (5); a results row, with its
    score's 95% interval over questions (`score_ci`), `n` and the per-question values (`questions`) that the table
    aggregates over seeds. `finished_only`: the row of a cell that has run before, else None (nothing runs)."""
    from retrotune.cell import evaluate_run, evaluate_untrained, train_run

    config = cell_config(grid, task, base, model, method, seed)
    folder = Path(config.output_dir)
    if finished_only and not (folder / "eval" / "scores.json").is_file():
        return None
    if model == "retro":
        retrofit(grid, base)
    if method == ZERO_SHOT:
        scores = _cached(folder / "eval" / "scores.json",
                         lambda: evaluate_untrained(config, folder / "eval", grid.controls))
        cost = {"trainable_parameters": 0, "train_seconds": 0.0}
    else:
        if not (folder / FINAL / "run.json").is_file():
            train_run(config)
        summary = json.loads((folder / FINAL / "run.json").read_text())
        scores = _cached(folder / "eval" / "scores.json", lambda: evaluate_run(folder, folder / "eval", grid.controls))
        cost = {"trainable_parameters": summary["trainable_parameters"]["trainable"],
                "train_seconds": summary["train_seconds"]}
    questions = question_scores(folder / "eval", task)
    low, high, n = score_interval([questions])
    return {"cell": cell_name(task, base, model, method), "task": task, "base": base_name(base),
            "model": f"{LABELS[model]} ({base_name(base)})", "method": method_name(method), "seed": seed,
            **cost, **scores, "score_ci": [low, high], "n": n, "questions": questions}


def task_order(grid: GridConfig) -> list[str]:
    """The grid's tasks in the paper's column order, any others after them."""
    return sorted(grid.tasks, key=lambda t: (PAPER_TASKS.index(t) if t in PAPER_TASKS else len(PAPER_TASKS), t))


def select(grid: GridConfig, cells: list[str] | None = None, methods: list[str] | None = None):
    """The (task, base, model, method) cells to run, in table order; `cells` by name, `methods` by label."""
    every = [(task, base, model, method) for base in grid.base_models for model in grid.models
             for method in grid.methods for task in task_order(grid)]
    names = {cell_name(*c): c for c in every}
    if cells:
        unknown = [c for c in cells if c not in names]
        if unknown:
            raise ConfigError(f"cell(s) {unknown} not in the grid; names are task/base/model/method, e.g. "
                              f"{next(iter(names))}")
        return [names[c] for c in cells]
    if methods:
        known = {method_name(m) for m in grid.methods}
        if set(methods) - known:
            raise ConfigError(f"method(s) {sorted(set(methods) - known)} not in the grid; known: {sorted(known)}")
        return [c for c in every if method_name(c[3]) in methods]
    return every


def prepare(grid: GridConfig) -> None:
    """What the cells share, done once before they run side by side: each base model's retro-fit and the
    neighbours of every task's questions (written into the shared cache here, only read by the cells)."""
    from backbones import load_tokenizer
    from retrotune import neighbours
    from retrotune.cell import task_data

    if "retro" in grid.models:
        for base in grid.base_models:
            retrofit(grid, base)
    seen = set()
    for task, base, model, method in select(grid):
        if method == ZERO_SHOT:
            continue
        config = cell_config(grid, task, base, model, method, grid.seeds[0])
        key = (task, config.decoder, config.index, config.retriever, config.neighbours, config.data.qa)
        if key in seen:
            continue
        seen.add(key)
        retriever = neighbours.open_retrieval(config, TASKS[task], load_tokenizer(config.decoder))
        for part in task_data(config):
            neighbours.attach(config, TASKS[task], retriever, part)


def plan_script(file: str, overrides: list[str], grid: GridConfig, gpus: int = 1) -> str:
    """The grid as a bash script: a `--prepare` line, one `--cell` line per cell (each independent, marked with
    the GPUs it uses; with more than one it runs under torchrun), and a `--collect` line that writes the table from
    the finished cells. On one machine it runs as it is; on a cluster the cell lines go to a job array."""
    from retrotune.plan import shell_script

    names = [cell_name(*cell) for cell in select(grid)]
    return shell_script("paper", file, overrides, names, grid.output_dir, gpus)


def run_grid(grid: GridConfig, cells: list[str] | None = None, methods: list[str] | None = None,
             collect_only: bool = False) -> dict:
    """Run the selected cells (all by default) and return their table; `paper_table.md` and `results.json` hold
    every finished cell of the grid, so running cells one by one builds up the whole table. `collect_only`: run
    nothing, write the table of the finished cells (a missing one is an error naming it)."""
    import torch

    started = time.perf_counter()
    out = Path(grid.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if collect_only:
        missing = [cell_name(*cell) for cell in select(grid) for seed in grid.seeds
                   if run_cell(grid, *cell, seed, finished_only=True) is None]
        if missing:
            raise ConfigError(f"{len(missing)} cell(s) of {out} are not finished: {', '.join(missing)}; run their "
                              f"plan lines (eval.py paper ... --cell NAME) first")
    rows = [] if collect_only else [run_cell(grid, *cell, seed) for cell in select(grid, cells, methods)
                                    for seed in grid.seeds]
    finished = [row for cell in select(grid) for seed in grid.seeds
                if (row := run_cell(grid, *cell, seed, finished_only=True)) is not None]
    rows = rows or finished
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    titles = {name: TASKS[name].title for name in grid.tasks}
    table = paper_table(rows, task_order(grid), titles)
    whole = table if rows is finished else paper_table(finished, task_order(grid), titles)

    def listed(row: dict) -> dict:  # the per-question values stay in each cell's eval/ folder
        return {key: value for key, value in row.items() if key != "questions"}

    results = {"rows": [listed(row) for row in finished], "seconds": time.perf_counter() - started,
               "device": device, "config": grid.__dict__}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "paper_table.md").write_text(f"{whole}\n\neach task: its score, mean over seeds, [95% bootstrap interval "
                                        f"over its n evaluation questions]; train hours on {device}; tokens/s: "
                                        f"generated answer tokens per second at evaluation\n")
    return {"table": table, **results, "rows": [listed(row) for row in rows]}
