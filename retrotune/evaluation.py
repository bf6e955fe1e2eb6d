"""Stage 5, evaluation: a QA contract (RETRO or GPT) + a task's records with neighbours -> the task's scores and
per-example predictions, with the true neighbours and under each control (shuffled, none).

Scores are percentages: EM and F1 over all answer aliases, ROUGE-1/2/L over all references and their geometric
mean (QMSum), and for multiple choice the accuracy of the option with the highest log-likelihood as the answer
(`accuracy`) and of the letter the model generates (`accuracy_letter`). Answer recall@k (is a gold answer in the
neighbours?) tells reader errors from retriever errors for the extractive tasks.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retro import reusing_neighbours
from retrotune.controls import CONTROLS, control_records
from retrotune.metrics import exact_match, f1_score, predicted_letter, rouge, score_task
from retrotune.precision import autocast
from retrotune.tasks import get_task
from retrotune.tasks.prompts import option_text


def option_choices(qa, records: list[dict], batch_size: int = 8) -> list[int]:
    """For each multiple-choice record, the option whose answer text '(X) option' has the highest summed
    log-likelihood after the record's prompt (and neighbours)."""
    flat = [(i, j, {**r, "answer": option_text(r["options"], j)}) for i, r in enumerate(records)
            for j in range(len(r["options"]))]
    scores = np.full((len(records), max((len(r["options"]) for r in records), default=0)), -np.inf)
    for lo in range(0, len(flat), batch_size):
        part = flat[lo:lo + batch_size]
        values = qa.answer_log_likelihood(qa.encode_batch([rec for _, _, rec in part]))
        for (i, j, _), value in zip(part, values.tolist()):
            scores[i, j] = value
    return [int(np.argmax(row)) for row in scores]


def evaluate_qa(qa, records: list[dict], batch_size: int = 8, max_new_tokens: int = 16, k: int | None = None,
                desc: str = "evaluate", task: str = "squad_open") -> tuple[dict, list[dict]]:
    """Generate an answer for every record and score it with the task's metrics."""
    from retrieval import has_answer

    spec = get_task(task)
    # Batches of similar length waste little on padding: answer in order of prompt size, report in record order.
    order = sorted(range(len(records)), key=lambda i: _prompt_size(records[i]))
    answered, started = {}, time.perf_counter()
    if hasattr(qa, "neighbours_cut"):
        qa.neighbours_cut = 0
    for lo in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        part = order[lo:lo + batch_size]
        chunk = [{key: value for key, value in records[i].items() if key != "answer"} for i in part]
        answered.update(zip(part, qa.generate(qa.encode_batch(chunk), max_new_tokens=max_new_tokens)))
    seconds = time.perf_counter() - started
    predictions = [answered[i] for i in range(len(records))]
    generated = sum(len(qa.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions)
    golds = [r["answers"] for r in records]
    rows = [{"id": r["id"], "question": r["question"], "prediction": p, "answers": r["answers"]}
            for r, p in zip(records, predictions)]
    if spec.multiple_choice:
        labelled = [i for i, r in enumerate(records) if r.get("label") is not None]
        if not labelled:
            raise ValueError(f"{task}: no evaluation example has a gold option; evaluate on a labelled split")
        chosen = option_choices(qa, [records[i] for i in labelled], batch_size)
        for i, choice in zip(labelled, chosen):
            letter = predicted_letter(predictions[i], len(records[i]["options"]))
            rows[i].update(label=records[i]["label"], chosen=choice, letter=letter)
        hits = [rows[i]["chosen"] == rows[i]["label"] for i in labelled]
        letters = [rows[i]["letter"] == rows[i]["label"] for i in labelled]
        scores = {"accuracy": 100 * sum(hits) / len(hits), "accuracy_letter": 100 * sum(letters) / len(letters)}
    else:
        scores = score_task(spec.metrics, predictions, golds)
        for row, p, g in zip(rows, predictions, golds):
            row.update({"em": exact_match(p, g), "f1": f1_score(p, g), **rouge(p, g)})
    if spec.multiple_choice or spec.score.startswith("rouge"):
        scores["answer_recall"] = None  # an option letter or a summary is not a span to find in the neighbours
    else:
        found = [any(has_answer(text, r["answers"]) for text in r["neighbour_texts"][:k]) for r in records]
        scores["answer_recall"] = 100 * sum(found) / len(found)
        for row, hit in zip(rows, found):
            row["answer_in_neighbours"] = hit
    scores["score"] = scores[spec.score]
    scores["n"] = len(records)
    scores["seconds_per_question"] = seconds / len(records)
    cut = getattr(qa, "neighbours_cut", None)
    if cut is not None:
        scores["neighbours_cut"] = cut
        if cut:
            warnings.warn(f"{desc}: {cut} of {len(records)} questions lost neighbour text to the prompt budget "
                          f"(prompt_budget={qa.budget} tokens); raise prompt_budget to give them whole neighbours",
                          stacklevel=2)
    # inference speed: answer tokens generated per second (prompt encoding and retrieval lookups included)
    scores["tokens_per_second"] = generated / seconds if seconds > 0 else None
    return scores, rows


def _prompt_size(record: dict) -> int:
    """A cheap stand-in for a record's prompt length in tokens: its characters."""
    return len(record.get("prompt") or record["question"]) + sum(len(t) for t in record.get("neighbour_texts") or ())


def evaluate_with_controls(qa, records: list[dict], out: Path, batch_size: int = 8, max_new_tokens: int = 16,
                           k: int | None = None, controls=CONTROLS, desc: str = "evaluate",
                           task: str = "squad_open", precision: str = "fp32") -> dict:
    """Scores with the true neighbours plus, under `controls`, the same questions with shuffled neighbours and with
    none, computed in `precision` (`retrotune.precision`). Each evaluation writes
    `out/<true|control>/predictions.jsonl` and `scores.json`; a score a previous run left is read back, so an
    interrupted evaluation resumes. `retrieval_gain`: the task's score with the true
    neighbours minus with shuffled ones (`retrieval_gain_f1` the same in F1, where the task has F1)."""
    def cached(folder: Path, recs: list[dict], label: str) -> dict:
        file = folder / "scores.json"
        if file.is_file():
            return json.loads(file.read_text())
        scores, rows = evaluate_qa(qa, recs, batch_size, max_new_tokens, k, label, task)
        write_jsonl(folder / "predictions.jsonl", rows)
        file.write_text(json.dumps(scores, indent=2))
        return scores

    # RETRO encodes each neighbour once for every pass: the shuffled control reads the true pass's neighbours
    device = qa.model.get_input_embeddings().weight.device
    with reusing_neighbours(qa.model), autocast(precision, device):
        scores = dict(cached(out / "true", records, desc))
        scores["controls"] = {c: cached(out / c, control_records(records, c), f"{desc} [{c}]") for c in controls}
    if "shuffled" in scores["controls"]:
        shuffled = scores["controls"]["shuffled"]
        scores["retrieval_gain"] = scores["score"] - shuffled["score"]
        if "f1" in scores:
            scores["retrieval_gain_f1"] = scores["f1"] - shuffled["f1"]
    return scores


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
