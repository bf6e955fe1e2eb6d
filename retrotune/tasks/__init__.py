"""Stage 1, task data: a task name + a data source -> train and evaluation `QAExample`s, the task's prompt, its
training answer, its metrics and its generation length.

    task = get_task("qasper")
    train, validation = task_split(task, "tau/scrolls")        # or a local folder of train/validation files

Tasks are registered like PEFT methods (`register_task(Task(...))`, one line each below). Two kinds of retrieval:
`corpus` (open-domain QA: the question searches the run's index) and `document` (long-document tasks: the question
searches the chunks of its own document; retrotune/neighbours.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from retrotune.qa import QADataError, QAExample, load_qa, split_by_group, take
from retrotune.tasks import prompts, schemas
from retrotune.tasks.sources import has_split, read_rows

RETRIEVAL = ("corpus", "document")


@dataclass(frozen=True)
class Task:
    name: str
    retrieval: str  # "corpus" or "document"
    metrics: tuple[str, ...]  # what evaluation reports (retrotune/metrics.py: score_task)
    score: str  # the one number in the paper-layout table
    max_new_tokens: int  # generation length
    read: Callable | None  # [(where, row)] -> [QAExample]; None: retrotune.qa.load_qa (SQuAD JSON, JSONL, hub)
    prompt: Callable[[QAExample], str] = prompts.question
    answer: Callable[[QAExample], str] = prompts.first_answer  # the training target
    hub: tuple[str, str | None] | None = None  # (dataset id, configuration) on the Hugging Face hub
    title: str = ""  # the table's column header

    def __post_init__(self):
        if self.retrieval not in RETRIEVAL:
            raise ValueError(f"task {self.name}: retrieval {self.retrieval!r} is unknown; choose from {RETRIEVAL}")
        if self.score not in self.metrics:
            raise ValueError(f"task {self.name}: score {self.score!r} is not one of its metrics {self.metrics}")

    @property
    def multiple_choice(self) -> bool:
        return "accuracy" in self.metrics


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise QADataError(f"task {name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]


OPEN_QA = ("em", "f1", "rouge_l")
register_task(Task("squad_open", "corpus", OPEN_QA, "f1", 16, None, title="SQuAD-open"))
register_task(Task("nq_open", "corpus", OPEN_QA, "em", 16, schemas.read_nq_open,
                   hub=("google-research-datasets/nq_open", None), title="NQ"))
register_task(Task("triviaqa", "corpus", OPEN_QA, "em", 16, schemas.read_triviaqa,
                   hub=("mandarjoshi/trivia_qa", "rc.nocontext"), title="TriviaQA"))
register_task(Task("narrativeqa", "document", ("f1", "rouge_l"), "f1", 32, schemas.read_narrativeqa,
                   hub=("tau/scrolls", "narrative_qa"), title="NarrativeQA"))
register_task(Task("qasper", "document", ("f1",), "f1", 48, schemas.read_qasper, hub=("tau/scrolls", "qasper"),
                   title="Qasper"))
register_task(Task("quality", "document", ("accuracy", "accuracy_letter"), "accuracy", 8, schemas.read_quality,
                   prompt=prompts.multiple_choice, answer=prompts.option_answer, hub=("tau/scrolls", "quality"),
                   title="QuALITY"))
register_task(Task("qmsum", "document", ("rouge_1", "rouge_2", "rouge_l", "rouge_geo"), "rouge_geo", 128,
                   schemas.read_qmsum, prompt=prompts.summary, hub=("tau/scrolls", "qmsum"), title="QMSum"))

PAPER_TASKS = ("nq_open", "triviaqa", "narrativeqa", "qasper", "quality", "qmsum")


def load_examples(task: Task, source: str | None, split: str = "train") -> list[QAExample]:
    """Examples of `split` from `source` (a file, a folder of split files, a hub id; None: the task's hub id)."""
    if task.read is None:
        return load_qa(source or "data/squad-demo", split)
    if source is None:
        if task.hub is None:
            raise QADataError(f"task {task.name}: no data given and no default dataset; set data.qa")
        source = task.hub[0]
    examples = task.read(read_rows(source, split, task.hub))
    if not examples:
        raise QADataError(f"{source} [{split}]: no {task.name} examples found")
    return examples


def task_split(task: Task, source: str | None, train_split: str = "train", eval_split: str = "validation",
               validation_groups: list[str] | None = None, validation_fraction: float = 0.25, seed: int = 0,
               train_size: int | None = None, validation_size: int | None = None, eval_source: str | None = None,
               with_train: bool = True):
    """(train, evaluation) examples. A source with named splits (a folder of split files, a hub dataset) or a
    separate `eval_source` gives the evaluation split as released; a single file is split by group (article or
    document), so no document is shared between training and evaluation. Each side is cut to its data scale;
    `with_train=False` reads the evaluation side only (train is then []). `seed` draws the training subset only:
    the held-out groups and the evaluation questions are the same for every seed, so seeds are compared question by
    question."""
    source = source if source is not None else (task.hub[0] if task.hub else None)
    named = eval_source is None and source is not None and task.read is not None and has_split(source, eval_split)
    if eval_source is not None or named:
        train = load_examples(task, source, train_split) if with_train else []
        evaluation = load_examples(task, eval_source or source, eval_split)
    else:
        split = split_by_group(load_examples(task, source, train_split), validation_groups, validation_fraction)
        train, evaluation = (split.train if with_train else []), split.validation
    return take(train, train_size, seed), take(evaluation, validation_size)
