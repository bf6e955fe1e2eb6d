"""The side-by-side experiment: one YAML -> index, zero-shot rows, optional retro-fit, a grid of fine-tuning cells
(models x PEFT methods x data scales x seeds), their evaluation, and the report.

Output folder: `results.json`, `results.md` (rows: model and method, with zero-shot rows; columns: trainable
parameters, training time, EM, F1, ...), `score_vs_parameters.png`, `learning_curves.png`, and one folder per
cell. Finished cells and evaluations are read back, not recomputed, so an interrupted experiment resumes.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retrotune import assemble, neighbours, plots
from retrotune.cell import evaluate_run, task_data, train_run
from retrotune.config import ConfigError, RunConfig, apply_overrides
from retrotune.controls import CONTROLS
from retrotune.evaluation import evaluate_with_controls
from retrotune.preflight import check_experiment_peft
from retrotune.runs import FINAL
from retrotune.table import markdown_table
from retrotune.tasks import get_task

ZERO_SHOT = ("gpt_closed_book", "gpt", "retro")


@dataclass
class ExperimentConfig:
    output_dir: str = "runs/experiment"  # results.md, results.json, plots and one folder per cell
    run: dict = field(default_factory=dict)  # RunConfig fields every cell shares
    corpus: str | None = "data/squad-demo/passages.jsonl"  # built into run.index when that index is missing
    zero_shot: list[str] = field(default_factory=lambda: list(ZERO_SHOT))  # zero-shot rows to score
    retrofit: dict | None = None  # RunConfig overrides of a retro-fit stage that RETRO cells start from
    models: list[str] = field(default_factory=lambda: ["gpt", "retro"])  # models axis of the grid
    peft: list[dict] = field(default_factory=lambda: [{"method": "lora"}])  # PEFT entries: {method: lora, r: 8, ...}
    train_sizes: list[int | None] | None = None  # the data-scale axis; None: run.data.train_size alone
    seeds: list[int] = field(default_factory=lambda: [0])  # one cell per seed
    # every row that reads neighbours is also scored with shuffled neighbours and with none (the retrieval gain)
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    # merged into each PEFT entry of the RETRO cells, e.g. {train_retro: true}: whether RETRO's added layers
    # (CCA and neighbour encoder) also train during fine-tuning
    retro_peft: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.zero_shot) - set(ZERO_SHOT))
        if unknown:
            raise ConfigError(f"zero_shot: {unknown} unknown; choose from {ZERO_SHOT}")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise ConfigError(f"controls: {unknown} unknown; choose from {CONTROLS} (or [] for none)")
        if self.train_sizes is None:
            self.train_sizes = [self.run.get("data", {}).get("train_size")]
        for name in ("models", "peft", "train_sizes", "seeds"):
            if not isinstance(getattr(self, name), list) or not getattr(self, name):
                raise ConfigError(f"{name} must be a non-empty list")
        RunConfig(**{**self.run, "stage": "finetune"})  # every shared field is checked before anything runs
        check_experiment_peft(self)  # and each PEFT entry against each model, before any model loads


def load_experiment(path: str, overrides: list[str] = ()) -> ExperimentConfig:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: no such experiment file (shipped ones are in configs/)")
    values = apply_overrides(yaml.safe_load(file.read_text()) or {}, list(overrides))
    try:
        return ExperimentConfig(**values)
    except (TypeError, ConfigError) as error:
        raise ConfigError(f"{file}: {error}") from None


def _run_config(exp: ExperimentConfig, **fields) -> RunConfig:
    values = {"neighbours_cache": str(Path(exp.output_dir) / "neighbours"), **copy.deepcopy(exp.run)}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return RunConfig(**values)


def ensure_index(exp: ExperimentConfig) -> None:
    from retrieval import BuildConfig, CorpusSpec, build_index, is_index, load_corpus
    from retrotune.models import load_embedder, load_tokenizer

    config = _run_config(exp)
    if is_index(config.index):
        return
    if not exp.corpus:
        raise FileNotFoundError(f"{config.index} is not an index and the experiment names no corpus to build it from")
    chunk_size = config.retro.get("chunk_size", 64)
    build_index(load_corpus(CorpusSpec(exp.corpus)), config.index, tokenizer=load_tokenizer(config.decoder),
                embedder=load_embedder(config.embedder), config=BuildConfig(chunk_size=chunk_size),
                tokenizer_alias=config.decoder, embedder_alias=config.embedder)


def _cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _evaluate(qa, records, config: RunConfig, out: Path, desc: str, controls=()) -> dict:
    return evaluate_with_controls(qa, records, out, config.eval_batch_size, config.generation_length,
                                  config.neighbours, controls, desc, config.task)


def zero_shot_rows(exp: ExperimentConfig, out: Path, retrofit_dir: Path | None) -> list[dict]:
    """GPT closed-book, GPT with prepended neighbours, and RETRO (retro-fitted when a retro-fit stage ran)."""
    config = _run_config(exp)
    rows = []
    needed = [name for name in exp.zero_shot if not (out / "zero-shot" / name / "scores.json").is_file()]
    if needed:
        task = get_task(config.task)
        evaluation = task_data(config)[1]  # 1
        base, tokenizer = assemble.build_backbone(config)
        retriever = neighbours.open_retrieval(config, task, tokenizer)  # 2
        validation = neighbours.attach(config, task, retriever, evaluation)
    for name in exp.zero_shot:
        folder = out / "zero-shot" / name

        def compute():
            model_kind = "retro" if name == "retro" else "gpt"
            run = _run_config(exp, model=model_kind, init_from=str(retrofit_dir) if retrofit_dir and name == "retro" else None)
            model = assemble.build_model(run, base, retriever, with_peft=False)  # 3
            records = validation if name != "gpt_closed_book" else [{**r, "neighbour_texts": []} for r in validation]
            qa = assemble.qa_interface(run, model, tokenizer, retriever)
            controls = () if name == "gpt_closed_book" else exp.controls
            scores = _evaluate(qa, records, run, folder, f"zero-shot {name}", controls)
            if name == "gpt_closed_book":
                scores["answer_recall"] = None  # it reads no neighbours
            if model_kind == "retro":
                model.remove_hooks()  # the backbone is shared with the rows after this one
            return scores

        scores = _cached(folder / "scores.json", compute)
        label = {"gpt_closed_book": "GPT (no retrieval)", "gpt": "GPT + neighbours in prompt",
                 "retro": "RETRO" + (" (retro-fitted)" if retrofit_dir else " (at initialisation)")}[name]
        rows.append({"model": label, "method": "zero-shot", "trainable_parameters": 0, "train_seconds": 0.0,
                     "train_size": 0, "seed": None, **scores})
    return rows


def cell_hparams(exp: ExperimentConfig, entry: dict) -> tuple[dict, dict]:
    """(method fields, train settings) of a cell: the run's train settings, updated by the method's defaults from its
    paper (`peft_methods.default_hparams`), updated by the entry's own `train:` overrides."""
    from peft_methods import resolve_hparams, split_peft_entry

    fields, overrides = split_peft_entry(entry, where=f"peft entry {entry}")
    run_train = dataclasses.asdict(_run_config(exp).train)
    try:
        return fields, resolve_hparams(run_train, fields["method"], overrides)
    except ValueError as error:
        raise ConfigError(f"peft entry {entry}: {error}") from None


def prepare(exp: ExperimentConfig) -> Path | None:
    """What every cell needs first: the index (built when missing) and the retro-fit stage, when there is one.
    Returns the retro-fit run's folder (or None)."""
    out = Path(exp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ensure_index(exp)
    if exp.retrofit is None:
        return None
    retrofit_dir = out / "retrofit"
    if not (retrofit_dir / FINAL / "run.json").is_file():
        train_run(_run_config(exp, **{**exp.retrofit, "stage": "retrofit", "model": "retro",
                                      "output_dir": str(retrofit_dir)}))
    return retrofit_dir


def grid_cells(exp: ExperimentConfig, retrofit_dir: Path | None):
    """Every cell of the grid in table order: (name, model, peft entry, train size, seed, folder, RunConfig)."""
    out = Path(exp.output_dir)
    for model, peft, size, seed in itertools.product(exp.models, exp.peft, exp.train_sizes, exp.seeds):
        name = f"{model}-{peft['method']}-n{size or 'all'}-s{seed}"
        peft = {**peft, **exp.retro_peft} if model == "retro" else peft
        folder = out / "cells" / name
        peft, train = cell_hparams(exp, peft)
        config = _run_config(exp, model=model, peft=peft, output_dir=str(folder), data={"train_size": size},
                             train={**train, "seed": seed},
                             init_from=str(retrofit_dir) if model == "retro" and retrofit_dir else None)
        yield name, model, peft, size, seed, folder, config


def cell_finished(folder: Path) -> bool:
    return (folder / FINAL / "run.json").is_file() and (folder / "eval" / "scores.json").is_file()


def run_cell(exp: ExperimentConfig, name: str, folder: Path, config: RunConfig) -> tuple[dict, dict]:
    """Train one cell (unless finished) and evaluate it (unless evaluated): (run summary, scores)."""
    if not (folder / FINAL / "run.json").is_file():
        train_run(config)
    summary = json.loads((folder / FINAL / "run.json").read_text())

    return summary, _cached(folder / "eval" / "scores.json",
                            lambda: evaluate_run(folder, folder / "eval", exp.controls))


def run_experiment(exp: ExperimentConfig, collect_only: bool = False) -> dict:
    """Run (or resume) the whole experiment and write its report. `collect_only`: train nothing, only read the
    finished cells into the table (the end of a plan, `retrotune.plan`); a missing cell is an error naming it."""
    out = Path(exp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    retrofit_dir = prepare(exp)
    rows = zero_shot_rows(exp, out, retrofit_dir)
    cells, missing = [], []
    for name, model, peft, size, seed, folder, config in grid_cells(exp, retrofit_dir):
        if collect_only and not cell_finished(folder):
            missing.append(name)
            continue
        summary, scores = run_cell(exp, name, folder, config)
        label = {"gpt": "GPT + neighbours in prompt", "retro": "RETRO"}[model]
        rows.append({"model": label, "method": peft["method"], "peft": peft,
                     "train": {k: getattr(config.train, k) for k in ("lr", "warmup_steps", "max_steps", "batch_size")},
                     "trainable_parameters": summary["trainable_parameters"]["trainable"],
                     "train_seconds": summary["train_seconds"], "train_size": size, "seed": seed, **scores})
        cells.append(folder)
    if missing:
        raise ConfigError(f"{len(missing)} cell(s) of {out} are not finished: {', '.join(missing)}; run their lines "
                          f"of the plan (eval.py experiment ... --cell NAME) first, or drop --collect to run them here")
    results = {"rows": rows, "seconds": time.perf_counter() - started, "config": exp.__dict__}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    plots.score_vs_parameters(rows, out / "score_vs_parameters.png")
    plots.learning_curves(cells, out / "learning_curves.png")
    return {"table": table, **results}
