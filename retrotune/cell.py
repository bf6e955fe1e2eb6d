"""One run (one cell of an experiment) as a forward pass of the stages, each called once, top to bottom:

    1. task data        retrotune/tasks/       the task's train and evaluation examples
    2. neighbours       retrotune/neighbours   the run's index, or each example's own document -> records
    3. model + PEFT     retrotune/assemble     backbone, RETRO or GPT, the PEFT method, the QA contract
    4. train            retrotune/runs         -> output_dir/final/
    5. evaluate         retrotune/evaluation   -> scores with true, shuffled and no neighbours
    (6. table           retrotune/table        rows of many cells -> the results tables; experiment.py, grid.py)

`train_run` is what train.py calls (stages 1-4); `evaluate_run` reloads a finished run and scores it (stages 1, 2,
3 from the saved weights, 5), on its own task and index or on others whose neighbours it can read.
"""
from __future__ import annotations

import json
from pathlib import Path

from retrotune import assemble, neighbours
from retrotune.config import RunConfig
from retrotune.evaluation import evaluate_with_controls
from retrotune.runs import train, verify_final
from retrotune.tasks import get_task, task_split
from retrotune.trainer import seed_everything


def task_data(config: RunConfig, with_train: bool = True):
    """Stage 1: (train, evaluation) examples of the run's task, cut to its data scales."""
    from retrotune.qa import QADataError

    task = get_task(config.task)
    data = config.data
    train_set, evaluation = task_split(task, data.qa, data.train_split, data.eval_split, data.validation_groups,
                                       data.validation_fraction, config.train.seed, data.train_size,
                                       data.validation_size, data.eval_qa, with_train)
    if with_train and not train_set:
        raise QADataError(f"{data.qa}: the training split is empty (validation holds its articles or documents); "
                          f"give more articles or fewer validation_groups")
    if not evaluation:
        raise QADataError(f"{data.qa}: the validation split is empty; set data.validation_groups or data.eval_qa")
    return train_set, evaluation


def train_run(config: RunConfig, device: str | None = None) -> dict:
    """Stages 1-4 for one RunConfig; returns the summary stored in `output_dir/final/run.json`."""
    seed_everything(config.train.seed, config.train.deterministic)  # new layers start from the run's seed
    task = get_task(config.task)
    finetune = config.stage == "finetune"
    examples = task_data(config) if finetune else None  # 1
    base, tokenizer = assemble.build_backbone(config, device=device)
    retriever = neighbours.open_retrieval(config, task, tokenizer) if finetune \
        else neighbours.open_index(config, tokenizer)  # 2: the retro-fit reads corpus sequences of the index
    train_set = val_set = None
    if finetune:
        from accelerate import PartialState

        with PartialState().main_process_first():  # under torchrun one process fills the neighbour cache
            train_set, val_set = (neighbours.attach(config, task, retriever, part) for part in examples)
    identity = assemble.run_identity(config, retriever, base)  # 3
    model = assemble.build_model(config, base, retriever, with_peft=False)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    qa = None
    if finetune:
        from peft_methods import apply_peft
        from retro.checkpoint import save_retro

        if config.model == "retro":  # the RETRO weights the adapter is trained on top of, kept for evaluation
            save_retro(model, output_dir / "retro-init")
        model = apply_peft(model, config.peft)
        qa = assemble.qa_interface(config, model, tokenizer, retriever)
    return train(config, model, tokenizer, retriever, identity, qa, train_set, val_set)  # 4


def load_trained(run_dir: Path, config_index: str | None = None, decoder: str | None = None,
                 device: str | None = None, task: str | None = None):
    """Rebuild a trained run for evaluation: (qa contract, run summary, retriever, corpus note). `config_index`,
    `decoder` and `task` replace the run's own. Another base model is refused; another index is accepted when the
    checkpoint can read its neighbours (same tokenizer, chunk size, neighbour length), and the note records which
    corpus it was trained on and which it is evaluated on."""
    from peft_methods import load_peft
    from retro.checkpoint import load_retro

    final = verify_final(run_dir)
    summary = json.loads((final / "run.json").read_text())
    config = run_config(summary, config_index, decoder, task)
    base, tokenizer = assemble.build_backbone(config, device=device)
    retriever = neighbours.open_retrieval(config, get_task(config.task), tokenizer)
    note = assemble.check_identity(summary["identity"], retriever, base, final)
    model = base
    if config.model == "retro":
        model = load_retro(final / "retro", base, chunk_size=retriever.chunk_size)
    if (final / "adapter").is_dir():
        model = load_peft(model, final / "adapter")
    model.eval()
    return assemble.qa_interface(config, model, tokenizer, retriever), summary, retriever, note


def run_config(summary: dict, index: str | None = None, decoder: str | None = None, task: str | None = None,
               **data) -> RunConfig:
    """A finished run's config with the given replacements (index, decoder, task when given; each `data` field as
    given, None included: validation_size=None scores every question)."""
    values = {**summary["config"], **{k: v for k, v in (("index", index), ("decoder", decoder), ("task", task)) if v}}
    values["data"] = {**values.get("data", {}), **data}
    return RunConfig(**values)


def evaluate_run(run_dir: Path, out: Path | None = None, controls=(), index: str | None = None,
                 decoder: str | None = None, task: str | None = None, **data) -> dict:
    """Stages 1, 2, 3 (from the saved weights) and 5 for a finished run: its scores on the evaluation split of
    its task (or `task` with `data` fields such as qa=...), with the neighbours of its index (or `index`)."""
    qa, summary, retriever, note = load_trained(Path(run_dir), index, decoder, assemble.evaluation_device(),
                                                task=task)
    config = run_config(summary, index, decoder, task, **data)
    spec = get_task(config.task)
    _, evaluation = task_data(config, with_train=False)
    other = Path(out or Path(run_dir) / "eval") / "neighbours" if index else None  # the run's own cache otherwise
    records = neighbours.attach(config, spec, retriever, evaluation, cache_dir=other)
    scores = evaluate_with_controls(qa, records, Path(out or Path(run_dir) / "eval"), config.eval_batch_size,
                                    config.generation_length, config.neighbours, controls,
                                    f"evaluate {Path(run_dir).name}", config.task, config.train.precision)
    return {**scores, "task": config.task, "corpus": note}


def evaluate_untrained(config: RunConfig, out: Path, controls=(), closed_book: bool = False) -> dict:
    """Stages 1, 2, 3 (no PEFT) and 5: the zero-shot score of the run's model on its task (RETRO from `init_from`
    when set, else at initialisation, where it computes exactly its base model). `closed_book`: the GPT baseline
    without neighbours."""
    task = get_task(config.task)
    _, evaluation = task_data(config, with_train=False)  # 1
    base, tokenizer = assemble.build_backbone(config, device=assemble.evaluation_device())
    retriever = neighbours.open_retrieval(config, task, tokenizer)  # 2
    records = neighbours.attach(config, task, retriever, evaluation, with_answers=False)
    if closed_book:
        records = [{**r, "neighbour_texts": []} for r in records]
    model = assemble.build_model(config, base, retriever, with_peft=False)  # 3
    qa = assemble.qa_interface(config, model, tokenizer, retriever)
    scores = evaluate_with_controls(qa, records, out, config.eval_batch_size, config.generation_length,  # 5
                                    config.neighbours, () if closed_book else controls, f"zero-shot {out.name}",
                                    config.task, config.train.precision)
    return {**scores, "task": config.task}
