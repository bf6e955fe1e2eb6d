"""Per-question scores of a results row: read from an evaluation folder, kept as a compact record, summarised.

An evaluation folder holds `true/`, and for rows that read neighbours `shuffled/` and `none/`, each with a
`predictions.jsonl` (one line per question, in the evaluation's order). A record (`write_record`) is one JSON file
per row: the row's summary and, per condition, the questions' predictions and scores as columns. A study keeps its
records under version control, so its tables, intervals and plots are rebuilt from them without retraining.
Scores are percentages (0-100), as in the tables.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONDITIONS = ("true", "shuffled", "none")
METRICS = ("em", "f1", "rouge_l")


def read_evaluation(folder: Path) -> dict:
    """{"ids": [...], condition: {"prediction": [...], metric: [...]}} for every condition the folder holds."""
    questions: dict = {}
    for condition in CONDITIONS:
        file = Path(folder) / condition / "predictions.jsonl"
        if not file.is_file():
            continue
        lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        ids = [str(line["id"]) for line in lines]
        if "ids" not in questions:
            questions["ids"] = ids
        elif ids != questions["ids"]:
            raise ValueError(f"{file}: its questions differ from those of {folder / 'true'}; per-question "
                             f"comparisons need every condition scored on the same questions in the same order")
        columns = {"prediction": [line.get("prediction", "") for line in lines]}
        for metric in METRICS:
            if all(metric in line for line in lines):
                columns[metric] = [round(100 * float(line[metric]), 4) for line in lines]
        questions[condition] = columns
    if "true" not in questions:
        raise FileNotFoundError(f"{folder}: no true/predictions.jsonl; evaluate the row first")
    return questions


def vector(questions: dict, condition: str, metric: str) -> np.ndarray | None:
    """(Q,) scores of one condition and metric, or None where the row lacks them."""
    values = questions.get(condition, {}).get(metric)
    return None if values is None else np.asarray(values, dtype=float)


def write_record(path: Path, row: dict, questions: dict) -> None:
    """One row's summary and per-question columns; written whole (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"row": row, "questions": questions}, separators=(",", ":")) + "\n")
    partial.replace(path)


def read_record(path: Path) -> tuple[dict, dict]:
    data = json.loads(Path(path).read_text())
    return data["row"], data["questions"]
