"""Answer metrics: SQuAD exact match and F1 (with the official answer normalisation), ROUGE-1/2/L (rouge-score,
no stemming) and their geometric mean (SCROLLS' QMSum score), multiple-choice accuracy.

Each takes a prediction string and a list of gold answers (aliases, or several references) and scores the
best-matching gold, as SQuAD's and SCROLLS' evaluation scripts do; `score_answers` and `score_task` aggregate a
dataset into percentages.
"""
from __future__ import annotations

import collections
import math
import re
from functools import lru_cache

from retrieval import normalize_answer  # one normalisation for answer recall and for EM/F1


def exact_match(prediction: str, golds: list[str]) -> float:
    normalised = normalize_answer(prediction)
    return float(any(normalised == normalize_answer(gold) for gold in golds))


def _f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if not predicted or not expected:
        return float(predicted == expected)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: list[str]) -> float:
    return max(_f1(prediction, gold) for gold in golds)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(prediction: str, golds: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures in [0, 1], each the best over the references."""
    scores = [_rouge().score(gold, prediction) for gold in golds]
    return {name: max(s[key].fmeasure for s in scores)
            for name, key in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL"))}


def rouge_l(prediction: str, golds: list[str]) -> float:
    return rouge(prediction, golds)["rouge_l"]


def geometric_mean(values: list[float]) -> float:
    """SCROLLS' QMSum score: the geometric mean of the dataset's ROUGE-1, ROUGE-2 and ROUGE-L."""
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def predicted_letter(text: str, n_options: int) -> int | None:
    """The option a generated answer names: its first standalone letter A.. ('(B)', 'B.', 'B) ...'), or None."""
    letters = "ABCDEFGH"[:n_options]
    match = re.search(rf"(?<![A-Za-z])\(?([{letters}])(?![a-z])", text.strip())
    return "ABCDEFGH".index(match.group(1)) if match else None


def score_answers(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Percentages over the dataset: {"em", "f1", "rouge_l"}."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    n = len(predictions)
    return {
        "em": 100 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": 100 * sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n,
        "rouge_l": 100 * sum(rouge_l(p, g) for p, g in zip(predictions, golds)) / n,
    }


def score_task(metrics: tuple[str, ...], predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Percentages of the generation metrics a task reports (em, f1, rouge_1/2/l, rouge_geo); multiple-choice
    accuracy is scored from option likelihoods and letters (retrotune/evaluation.py)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    n = len(predictions)
    out = {}
    if "em" in metrics:
        out["em"] = 100 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n
    if "f1" in metrics:
        out["f1"] = 100 * sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n
    if any(m.startswith("rouge") for m in metrics):
        each = [rouge(p, g) for p, g in zip(predictions, golds)]
        for name in ("rouge_1", "rouge_2", "rouge_l"):
            out[name] = 100 * sum(e[name] for e in each) / n
        if "rouge_geo" in metrics:
            out["rouge_geo"] = geometric_mean([out["rouge_1"], out["rouge_2"], out["rouge_l"]])
    return out
