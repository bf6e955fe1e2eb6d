"""QA data: SQuAD JSON, JSONL or Hugging Face datasets -> `QAExample`s, split by article, cut to a data scale.

Validation must never share an article with training (questions about one paragraph leak each other's answers),
so splits are made over groups: the article title, or the part of a passage id before '#'.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.corpus import json_column


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]
    group: str  # article or document: the unit of the train/validation split
    passage_id: str | None = None
    # long-document tasks: the example's own document, searched instead of the corpus index
    document_id: str | None = None
    document_title: str = ""
    document: str | None = None
    # multiple choice: the options and the index of the correct one (None where the split has no labels)
    options: tuple[str, ...] = ()
    label: int | None = None


class QADataError(ValueError):
    pass


def _example(record: dict, where: str, index: int) -> QAExample:
    for name in ("question", "answers"):
        if name not in record:
            raise QADataError(f"{where}: field {name!r} is missing; every QA record needs 'question' and "
                              f"'answers' (a list of strings)")
    answers = record["answers"]
    if isinstance(answers, dict):  # the Hugging Face squad layout: {"text": [...], "answer_start": [...]}
        answers = answers.get("text", [])
    if isinstance(answers, str):
        answers = [answers]
    answers = tuple(a["text"] if isinstance(a, dict) else str(a) for a in answers)
    if not answers:
        raise QADataError(f"{where}: field 'answers' is empty; give at least one gold answer")
    passage_id = record.get("passage_id")
    group = record.get("title") or (passage_id.split("#")[0] if passage_id else None) or record.get("group")
    return QAExample(id=str(record.get("id", index)), question=str(record["question"]), answers=answers,
                     group=str(group if group is not None else index), passage_id=passage_id)


def jsonl_rows(path: Path):
    """Yield (where, row) for each non-blank line of a JSONL file, `where` naming the file and line; a line that is
    not UTF-8, not JSON or not a JSON object is refused with that place and what to do."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise QADataError(f"{where}: byte 0x{raw[error.start]:02x} at column {error.start + 1} is not UTF-8; "
                                  f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise QADataError(f"{where}: not valid JSON ({error.msg} at {json_column(line, error)}); each line "
                                  f"must be one JSON object") from None
            if not isinstance(row, dict):
                raise QADataError(f"{where}: a JSON {type(row).__name__}, not an object; each line must be one "
                                  f"JSON object")
            yield where, row


def _read_jsonl(path: Path) -> list[QAExample]:
    examples = []
    for where, record in jsonl_rows(path):
        examples.append(_example(record, where, len(examples)))
    return examples


def _read_squad_json(path: Path) -> list[QAExample]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise QADataError(f"{path}: byte offset {error.start} is not UTF-8; convert the file to UTF-8") from None
    except json.JSONDecodeError as error:
        raise QADataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}); give a SQuAD .json or a "
                          f".jsonl with one question per line") from None
    if not isinstance(data, dict):
        raise QADataError(f"{path}: expected the SQuAD layout {{data: [...]}}, found a JSON {type(data).__name__}")
    if "data" not in data:
        raise QADataError(f"{path}: no top-level 'data' list; expected the SQuAD layout "
                          f"{{data: [{{title, paragraphs: [{{context, qas}}]}}]}}")
    examples = []
    for article in data["data"]:
        for p_index, paragraph in enumerate(article.get("paragraphs", [])):
            for qa in paragraph.get("qas", []):
                record = {**qa, "title": article.get("title"), "passage_id": f"{article.get('title')}#{p_index}"}
                examples.append(_example(record, f"{path}, question {qa.get('id', len(examples))}", len(examples)))
    return examples


def load_qa(source: str, split: str = "train") -> list[QAExample]:
    """Read QA examples from a .jsonl/.json file, a folder holding questions.jsonl, or a `datasets` name."""
    path = Path(source)
    if path.is_dir() and (path / "questions.jsonl").is_file():
        path = path / "questions.jsonl"
    local = path.is_absolute() or source.startswith((".", "~")) \
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    if path.is_file():
        examples = _read_jsonl(path) if path.suffix == ".jsonl" else _read_squad_json(path)
    elif path.suffix in (".json", ".jsonl") or path.is_dir() or local:
        raise QADataError(f"{path}: no such QA file or folder; give a .jsonl of {{question, answers}}, a SQuAD "
                          f".json, a folder with questions.jsonl, or a Hugging Face dataset name")
    else:
        import datasets

        try:
            rows = datasets.load_dataset(source, split=split)
        except Exception as error:  # noqa: BLE001 - the hub, the network or the name: all the user's to fix
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise QADataError(f"{source}: not a local QA file or folder, and loading it as a Hugging Face dataset "
                              f"failed ({first}); check the path, or the dataset name and your connection") from None
        examples = [_example(row, f"{source}[{split}] row {i}", i) for i, row in enumerate(rows)]
    if not examples:
        raise QADataError(f"{source}: no QA examples found")
    return examples


@dataclass(frozen=True)
class QASplit:
    train: list[QAExample]
    validation: list[QAExample]
    validation_groups: tuple[str, ...] = field(default=())


def split_by_group(examples: list[QAExample], validation_groups: list[str] | None = None,
                   validation_fraction: float = 0.25, seed: int = 0) -> QASplit:
    """Hold out whole groups (articles); named groups if given, else a seeded share of them."""
    groups = sorted({e.group for e in examples})
    if validation_groups:
        unknown = sorted(set(validation_groups) - set(groups))
        if unknown:
            raise QADataError(f"validation_groups {unknown} do not occur in the data; known groups: {groups[:20]}")
        held = set(validation_groups)
    else:
        if len(groups) < 2:
            raise QADataError("an article-disjoint split needs at least two articles (groups); "
                              "give the data a 'title' or a passage_id of the form 'Title#n'")
        shuffled = groups[:]
        random.Random(seed).shuffle(shuffled)
        held = set(shuffled[:max(1, round(validation_fraction * len(groups)))])
    return QASplit(train=[e for e in examples if e.group not in held],
                   validation=[e for e in examples if e.group in held], validation_groups=tuple(sorted(held)))


def take(examples: list[QAExample], limit: int | None, seed: int = 0) -> list[QAExample]:
    """A seeded random subset of `limit` examples (all when None): the data-scale axis of an experiment."""
    if limit is None or limit >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]
