"""The side-by-side experiment: one YAML -> index, zero-shot rows, optional retro-fit, a grid of fine-tuning cells
(models x PEFT methods x data scales x seeds), their evaluation, and the report.

Output folder: `results.json`, `results.md` and `results.csv` (the table: one row per model, method and data
scale, seeds averaged, every score with its 95% interval over questions; the paired comparisons; the paper's
findings),
`score_vs_parameters.png`, `learning_curves.png`, `data_scale.png` (with several training-set sizes),
`retrofit_reading.png` (with a retro-fit stage), `eval_questions.jsonl`, `report.html`, and one folder per cell.
Finished cells and evaluations are read back, not recomputed, so an interrupted experiment resumes. With `record`
set, each finished row's per-question scores are also kept there (a folder meant for version control), and a row
found there is neither trained nor evaluated again: the tables and plots are rebuilt from the record alone.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from retrotune import assemble, findings, neighbours, plots, scores
from retrotune.cell import evaluate_run, task_data, train_run
from retrotune.config import ConfigError, RunConfig, apply_overrides
from retrotune.controls import CONTROLS
from retrotune.evaluation import evaluate_with_controls, write_jsonl
from retrotune.preflight import check_experiment_peft
from retrotune.runs import FINAL
from retrotune.table import comparisons_table, findings_list, markdown_table
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
    # a folder (under version control) for each finished row's per-question scores; rows found there are not
    # recomputed, so a study is finished across several sittings and its tables rebuilt without retraining
    record: str | None = None
    # where the retro-fit stage runs (default OUTPUT_DIR/retrofit); experiments naming one folder share one retro-fit
    retrofit_dir: str | None = None

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
        for entry in self.peft:
            seeds = entry.get("seeds") if isinstance(entry, dict) else None
            if seeds is not None and (not isinstance(seeds, list) or not seeds
                                      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
                raise ConfigError(f"peft entry {entry}: seeds must be a non-empty list of integers, e.g. [0, 1, 2]")
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


# Fields of a run that do not change what it computes: where it writes and reads back.
_PLACES = ("output_dir", "neighbours_cache", "init_from")
# What decides a zero-shot row: how questions are drawn, retrieved, prompted and answered (not how anything trains).
_EVALUATION_FIELDS = ("task", "decoder", "embedder", "index", "retriever", "quantise", "neighbours", "retro",
                      "max_new_tokens", "eval_batch_size", "prompt_budget", "model")
_EVALUATION_DATA = ("qa", "eval_qa", "eval_split", "validation_groups", "validation_size", "max_question_tokens",
                    "max_answer_tokens")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def setup_of(config: RunConfig, evaluation_only: bool = False) -> dict:
    """The fields of `config` that decide its scores, flattened (`train.lr`, `retro.attention`, ...): every field
    but the folders, or for a row that trains nothing, the evaluation fields alone."""
    values = {k: v for k, v in config.to_dict().items() if k not in _PLACES}
    if config.model == "gpt":  # the GPT baseline reads chunk text only: of RETRO's fields, the chunk size counts
        values["retro"] = {"chunk_size": values["retro"].get("chunk_size")}
    if evaluation_only:
        data, precision = values["data"], values["train"]["precision"]
        values = {k: values[k] for k in _EVALUATION_FIELDS}
        values["data"] = {k: data[k] for k in _EVALUATION_DATA}
        if precision != "auto":  # evaluation computes in it (`auto` is fp32 on a CPU, as records before it were)
            values["train"] = {"precision": precision}
    return json.loads(json.dumps(_flat(values), default=str))


def saved_setup(summary: dict, evaluation_only: bool = False) -> dict:
    """`setup_of` the config a finished run saved in its `run.json`."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return setup_of(RunConfig(**{k: v for k, v in summary["config"].items() if k in known}), evaluation_only)


def row_setups(exp: ExperimentConfig, cells: list, retrofit_dir: Path | None) -> dict[str, dict]:
    """Each row's setup by name; a RETRO row's includes the setup of the retro-fit it starts from (`retrofit.*`)."""
    fitted = {}
    if retrofit_dir is not None:
        fitted = {f"retrofit.{k}": v for k, v in setup_of(retrofit_config(exp, retrofit_dir)).items()}
    setups = {}
    for name in exp.zero_shot:
        kind = "retro" if name == "retro" else "gpt"
        setups[f"zero-shot-{name}"] = {**setup_of(_run_config(exp, model=kind), evaluation_only=True),
                                       **(fitted if kind == "retro" else {})}
    for name, model, _, _, _, _, config in cells:
        setups[name] = {**setup_of(config), **(fitted if model == "retro" else {})}
    return setups


def check_setup(saved: dict | None, wanted: dict, where: str, remedy: str) -> None:
    """Refuse results made with another setup than the one asked for, naming the fields that differ."""
    if saved is None:
        raise ConfigError(f"{where} does not say which setup made it (it predates setup records); {remedy}")
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(f"{where} was made with another setup ({shown}{more}); {remedy}")


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
                                  config.neighbours, controls, desc, config.task, config.train.precision)


def zero_shot_rows(exp: ExperimentConfig, out: Path, retrofit_dir: Path | None) -> list[dict]:
    """GPT closed-book, GPT with prepended neighbours, and RETRO (retro-fitted when a retro-fit stage ran)."""
    config = _run_config(exp)
    setups = row_setups(exp, [], retrofit_dir)
    rows = []
    needed = [name for name in exp.zero_shot if not (out / "zero-shot" / name / "scores.json").is_file()]
    if needed:
        task = get_task(config.task)
        evaluation = task_data(config)[1]  # 1
        base, tokenizer = assemble.build_backbone(config, device=assemble.evaluation_device())
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

        setup, setup_file = setups[f"zero-shot-{name}"], folder / "setup.json"
        if (folder / "scores.json").is_file():
            check_setup(json.loads(setup_file.read_text()) if setup_file.is_file() else None, setup,
                        f"the zero-shot row in {folder}", "delete that folder to score it again")
        scores = _cached(folder / "scores.json", compute)
        setup_file.write_text(json.dumps(setup, indent=1))
        label = {"gpt_closed_book": "GPT (no retrieval)", "gpt": "GPT + neighbours in prompt",
                 "retro": "RETRO" + (" (retro-fitted)" if retrofit_dir else " (at initialisation)")}[name]
        rows.append({"name": f"zero-shot-{name}", "model": label, "method": "zero-shot", "trainable_parameters": 0,
                     "train_seconds": 0.0, "train_size": 0, "seed": None, "eval_dir": str(folder), **scores})
    return rows


def write_eval_questions(exp: ExperimentConfig, path: Path) -> None:
    """The evaluation questions with the neighbour text each model reads, and the text the shuffled control reads:
    what the per-question report shows beside every row's answers."""
    from retrotune.controls import control_records
    from retrotune.models import load_tokenizer

    config = _run_config(exp)
    task = get_task(config.task)
    evaluation = task_data(config, with_train=False)[1]
    retriever = neighbours.open_retrieval(config, task, load_tokenizer(config.decoder))
    records = neighbours.attach(config, task, retriever, evaluation)
    shuffled = control_records(records, "shuffled")
    k = config.neighbours
    write_jsonl(path, [{"id": str(r["id"]), "question": r["question"], "answers": list(r["answers"]),
                        "group": r.get("group"), "neighbour_texts": list(r["neighbour_texts"][:k]),
                        "shuffled_neighbour_texts": list(s["neighbour_texts"][:k])}
                       for r, s in zip(records, shuffled)])


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
    retrofit_dir = retrofit_folder(exp)
    config = retrofit_config(exp, retrofit_dir)
    summary = retrofit_dir / FINAL / "run.json"
    if summary.is_file():
        check_setup(saved_setup(json.loads(summary.read_text())), setup_of(config), f"the retro-fit in {retrofit_dir}",
                    f"delete that folder to retro-fit again, or set retrofit_dir to another folder")
    else:
        train_run(config)
    return retrofit_dir


def retrofit_folder(exp: ExperimentConfig) -> Path:
    return Path(exp.retrofit_dir) if exp.retrofit_dir else Path(exp.output_dir) / "retrofit"


def retrofit_config(exp: ExperimentConfig, retrofit_dir: Path) -> RunConfig:
    """The retro-fit stage's run. Its corpus sequences never come from the articles the experiment evaluates on
    (they stay in the index, as neighbours): the retro-fit must not train on the text of the held-out questions."""
    held = sorted({e.group for e in task_data(_run_config(exp), with_train=False)[1]})
    data = {**(exp.retrofit.get("data") or {})}
    data["exclude_groups"] = sorted(set(data.get("exclude_groups") or ()) | set(held))
    return _run_config(exp, **{**exp.retrofit, "data": data, "stage": "retrofit", "model": "retro",
                               "output_dir": str(retrofit_dir)})


def grid_cells(exp: ExperimentConfig, retrofit_dir: Path | None):
    """Every cell of the grid: (name, model, peft entry, train size, seed, folder, RunConfig). A PEFT entry's own
    `seeds` replace the experiment's (e.g. LoRA with three seeds, the other methods with one). Order: the first seed
    of every cell before any second one, then by PEFT entry, training-set size and model, so GPT and RETRO under
    one method finish side by side and an interrupted study already holds one seed of everything it reached."""
    out = Path(exp.output_dir)
    order = []
    for (e, entry), (z, size), (m, model) in itertools.product(enumerate(exp.peft), enumerate(exp.train_sizes),
                                                                 enumerate(exp.models)):
        for rank, seed in enumerate(entry.get("seeds") or exp.seeds):
            order.append(((rank, e, z, m), model, {k: v for k, v in entry.items() if k != "seeds"}, size, seed))
    for _, model, entry, size, seed in sorted(order, key=lambda item: item[0]):
        yield _cell(exp, out, retrofit_dir, model, entry, size, seed)


def _cell(exp: ExperimentConfig, out: Path, retrofit_dir: Path | None, model: str, peft: dict, size, seed: int):
    name = f"{model}-{peft['method']}-n{size or 'all'}-s{seed}"
    peft = {**peft, **exp.retro_peft} if model == "retro" else peft
    folder = out / "cells" / name
    peft, train = cell_hparams(exp, peft)
    config = _run_config(exp, model=model, peft=peft, output_dir=str(folder), data={"train_size": size},
                         train={**train, "seed": seed},
                         init_from=str(retrofit_dir) if model == "retro" and retrofit_dir else None)
    return name, model, peft, size, seed, folder, config


def cell_finished(folder: Path) -> bool:
    return (folder / FINAL / "run.json").is_file() and (folder / "eval" / "scores.json").is_file()


def run_cell(exp: ExperimentConfig, name: str, folder: Path, config: RunConfig) -> tuple[dict, dict]:
    """Train one cell (unless finished) and evaluate it (unless evaluated): (run summary, scores)."""
    if (folder / FINAL / "run.json").is_file():
        check_setup(saved_setup(json.loads((folder / FINAL / "run.json").read_text())), setup_of(config),
                    f"the finished cell {folder}", "delete that folder to run the cell again")
    else:
        train_run(config)
    summary = json.loads((folder / FINAL / "run.json").read_text())

    return summary, _cached(folder / "eval" / "scores.json",
                            lambda: evaluate_run(folder, folder / "eval", exp.controls))


def run_experiment(exp: ExperimentConfig, collect_only: bool = False, partial: bool = False) -> dict:
    """Run (or resume) the whole experiment and write its report. `collect_only`: train nothing, only read the
    finished cells into the table (the end of a plan, `retrotune.plan`); a missing cell is an error naming it.
    `partial`: read what is finished or recorded, evaluate nothing, and name the rows still missing."""
    collect_only = collect_only or partial
    out = Path(exp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = Path(exp.record) if exp.record else None
    started = time.perf_counter()
    retrofit_dir = retrofit_folder(exp) if exp.retrofit is not None else None
    cells = list(grid_cells(exp, retrofit_dir))
    names = [f"zero-shot-{name}" for name in exp.zero_shot] + [cell[0] for cell in cells]
    recorded = {name: scores.read_record(record / "rows" / f"{name}.json") for name in names
                if record is not None and (record / "rows" / f"{name}.json").is_file()}
    setups = row_setups(exp, cells, retrofit_dir)
    for name, (row, _) in recorded.items():
        check_setup(row.get("setup"), setups[name], f"{record / 'rows' / name}.json",
                    "delete that file to run the row again, or set `record:` to another folder")
    stages = {}  # this run's seconds by stage (a stage finished by an earlier run takes ~0 here)
    if len(recorded) < len(names) and not collect_only:
        clock = time.perf_counter()
        ensure_index(exp)
        stages["index"], clock = time.perf_counter() - clock, time.perf_counter()
        prepare(exp)
        stages["retro-fit"] = time.perf_counter() - clock
        _record_retrofit(retrofit_dir, record)
    rows, missing, trained = [], [], []
    unrecorded = [name for name in exp.zero_shot if f"zero-shot-{name}" not in recorded]
    if partial:
        missing += [f"zero-shot-{name}" for name in unrecorded]
    elif unrecorded:
        clock = time.perf_counter()
        fresh = {row["name"]: row for row in zero_shot_rows(exp, out, retrofit_dir)}
        stages["zero-shot rows"] = time.perf_counter() - clock
    for name in exp.zero_shot:
        key = f"zero-shot-{name}"
        if key in recorded:
            rows.append(_recorded_row(recorded[key]))
        elif not partial:
            rows.append(_keep({**fresh[key], "setup": setups[key]}, record))
    for index, (name, model, peft, size, seed, folder, config) in enumerate(cells, start=1):
        if name in recorded:
            rows.append(_recorded_row(recorded[name]))
            _progress(index, len(cells), name, "recorded", started)
            continue
        if collect_only and not cell_finished(folder):
            missing.append(name)
            continue
        began = time.perf_counter()
        summary, cell_scores = run_cell(exp, name, folder, config)
        label = {"gpt": "GPT + neighbours in prompt", "retro": "RETRO"}[model]
        rows.append(_keep({"name": name, "model": label, "method": peft["method"], "peft": peft,
                           "train": {k: getattr(config.train, k) for k in ("lr", "warmup_steps", "max_steps",
                                                                           "batch_size")},
                           "trainable_parameters": summary["trainable_parameters"]["trainable"],
                           "train_seconds": summary["train_seconds"], "train_size": size, "seed": seed,
                           "wall_seconds": _wall(folder, began), "eval_dir": str(folder / "eval"),
                           "setup": setups[name], **cell_scores}, record))
        trained.append(folder)
        stages[name] = time.perf_counter() - began
        _progress(index, len(cells), name, f"F1 {cell_scores['f1']:.1f}, trained in "
                  f"{summary['train_seconds'] / 60:.1f} min", started)
    if missing and not partial:
        raise ConfigError(f"{len(missing)} cell(s) of {out} are not finished: {', '.join(missing)}; run their lines "
                          f"of the plan (eval.py experiment ... --cell NAME) first, or drop --collect to run them here")
    if not (out / "eval_questions.jsonl").is_file() and len(recorded) < len(names) and not partial:
        write_eval_questions(exp, out / "eval_questions.jsonl")
    return write_results(exp, rows, out, trained, time.perf_counter() - started, missing, stages)


def _wall(folder: Path, began: float) -> float:
    """A cell's wall time, training and evaluation, kept beside it so a resumed study reports the first run's."""
    file = folder / "wall_seconds.json"
    if not file.is_file():
        file.write_text(json.dumps(time.perf_counter() - began))
    return json.loads(file.read_text())


def _progress(index: int, total: int, name: str, what: str, started: float) -> None:
    print(f"[cell {index}/{total}] {name}: {what} ({(time.perf_counter() - started) / 60:.1f} min so far)",
          file=sys.stderr, flush=True)


def _keep(row: dict, record: Path | None) -> dict:
    """A freshly evaluated row with its per-question scores, kept in the record when there is one."""
    row = {**row, "questions": scores.read_evaluation(Path(row["eval_dir"]))}
    if record is not None:
        scores.write_record(record / "rows" / f"{row['name']}.json",
                            {k: v for k, v in row.items() if k not in ("questions", "eval_dir")}, row["questions"])
    return row


def _recorded_row(entry: tuple[dict, dict]) -> dict:
    row, questions = entry
    return {**row, "questions": questions}


def _record_retrofit(retrofit_dir: Path | None, record: Path | None) -> None:
    """The retro-fit's validation curve (loss with true, shuffled and no neighbours per evaluation) in the record."""
    if retrofit_dir is None or record is None or not (retrofit_dir / "metrics.jsonl").is_file():
        return
    rows = [json.loads(line) for line in (retrofit_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((retrofit_dir / FINAL / "run.json").read_text())
    record.mkdir(parents=True, exist_ok=True)
    (record / "retrofit.json").write_text(json.dumps({
        "steps": summary["steps"], "stopped_early": summary["stopped_early"], "train_seconds": summary["train_seconds"],
        "validation": [r for r in rows if "val_loss" in r]}, indent=1) + "\n")


def with_intervals(rows: list[dict]) -> list[dict]:
    """Rows whose `eval_dir` holds their predictions -> the table's rows (seeds aggregated, 95% intervals)."""
    return findings.aggregate([{**r, "questions": scores.read_evaluation(Path(r["eval_dir"]))} for r in rows])


def write_results(exp: ExperimentConfig, rows: list[dict], out: Path, trained: list[Path], seconds: float,
                  missing: list[str] = (), stages: dict | None = None) -> dict:
    """The table, comparisons and findings (results.md, results.json), the plots and report.html; `missing`: rows
    not run yet (a partial table), named under it; `stages`: this run's seconds by stage."""
    from retrotune.report import write_report

    # a zero-shot row's time is its answering, under every control
    rows = [r if r.get("wall_seconds") is not None else {**r, "wall_seconds": _answering_seconds(r)} for r in rows]
    table_rows = findings.aggregate(rows)
    compared, verdicts = findings.comparisons(table_rows), findings.paper_findings(table_rows)
    first_dir = {}
    for row in rows:
        first_dir.setdefault((row["model"], row["method"], row.get("train_size")), row.get("eval_dir"))
    public = [{**{k: v for k, v in r.items() if k != "per_question"},
               "eval_dir": _relative(first_dir.get((r["model"], r["method"], r["train_size"])), out),
               "controls": _controls(r)}
              for r in table_rows]
    retrofit = _retrofit_summary(exp)
    # the whole study's time: the retro-fit, every row's answering and every cell's training and answering
    total = (retrofit["train_seconds"] if retrofit else 0.0) + sum(r.get("wall_seconds") or 0.0 for r in rows)
    results = {"rows": public, "comparisons": compared, "findings": verdicts, "seconds": seconds,
               "train_seconds": sum(r.get("train_seconds") or 0.0 for r in rows), "wall_seconds": total,
               "missing": list(missing), "stages": stages or {}, "config": dataclasses.asdict(exp)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown_table(table_rows)
    parts = [table, "Paired comparisons (F1, per question):", comparisons_table(compared),
             "The paper's findings:", findings_list(verdicts)]
    fit = f" (the retro-fit: {retrofit['train_seconds'] / 60:.1f} min, {retrofit['steps']} steps)" if retrofit else ""
    parts.insert(1, f"Wall time: {total / 60:.0f} min in all{fit}.")
    if stages:
        parts.insert(2, "This run by stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items()) +
                     f"; {seconds / 60:.1f} min in all.")
    if missing:
        parts.insert(1, f"Not run yet ({len(missing)}): {', '.join(missing)}.")
    text = "\n\n".join(parts)
    (out / "results.md").write_text(text + "\n")
    write_csv(table_rows, out / "results.csv")
    plots.score_vs_parameters(table_rows, out / "score_vs_parameters.png")
    plots.learning_curves(trained, out / "learning_curves.png")
    if len({r["train_size"] for r in table_rows if r["method"] != "zero-shot"}) > 1:
        plots.data_scale(table_rows, out / "data_scale.png")
    if retrofit is not None:
        plots.retrofit_reading(retrofit["validation"], out / "retrofit_reading.png")
    if all(r.get("eval_dir") and Path(r["eval_dir"]).is_dir() for r in rows):
        write_report(out)
    return {"table": table, "text": text, **results}


CSV_COLUMNS = ("model", "method", "train_size", "seeds", "n", "trainable_parameters", "train_seconds",
               "wall_seconds", "seconds_per_question", "neighbours_cut", "answer_recall")


def write_csv(rows: list[dict], path: Path) -> None:
    """The table for a spreadsheet: one line per row, every score with its interval bounds and seed spread."""
    import csv

    scored = [key for key in dict.fromkeys(k for r in rows for k in r)
              if key.split("_")[0] in ("em", "f1", "rouge", "retrieval") and not key.endswith(("_ci", "_sd"))]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_COLUMNS, *(f"{k}{s}" for k in scored for s in ("", "_low", "_high", "_sd"))])
        for row in rows:
            values = [";".join(map(str, row["seeds"])) if key == "seeds" else row.get(key) for key in CSV_COLUMNS]
            for key in scored:
                ci = row.get(f"{key}_ci") or [None, None]
                values += [row.get(key), ci[0], ci[1], row.get(f"{key}_sd")]
            writer.writerow(["" if v is None else v for v in values])


def _controls(row: dict) -> dict:
    """A table row's control scores in the layout of an evaluation's scores: {"shuffled": {"f1": .., "f1_ci": ..}}."""
    return {c: {m + s: row[f"{m}_{c}{s}"] for m in scores.METRICS for s in ("", "_ci") if f"{m}_{c}{s}" in row}
            for c in ("shuffled", "none")}


def _retrofit_summary(exp: ExperimentConfig) -> dict | None:
    """The retro-fit's steps, time and validation curve: from the record, else from its run folder."""
    kept = Path(exp.record) / "retrofit.json" if exp.record else None
    if kept is not None and kept.is_file():
        return json.loads(kept.read_text())
    folder = retrofit_folder(exp)
    if exp.retrofit is None or not (folder / FINAL / "run.json").is_file():
        return None
    summary = json.loads((folder / FINAL / "run.json").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []
    return {"steps": summary["steps"], "train_seconds": summary["train_seconds"],
            "validation": [row for row in map(json.loads, filter(str.strip, lines)) if "val_loss" in row]}


def _answering_seconds(row: dict) -> float:
    parts = (row, *(row.get("controls") or {}).values())
    return sum((part.get("seconds_per_question") or 0.0) * (part.get("n") or 0) for part in parts)


def _relative(path: str | None, out: Path) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)
