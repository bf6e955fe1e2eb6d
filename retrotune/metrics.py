"""Answer metrics: SQuAD exact match and F1 (with the official answer normalisation) and ROUGE-L.

Each takes a prediction string and a list of gold answers and scores the best-matching gold, as SQuAD's
evaluation script does; `score_answers` aggregates a dataset into percentages.
"""
from __future__ import annotations

import collections
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

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, golds: list[str]) -> float:
    return max(_rouge().score(gold, prediction)["rougeL"].fmeasure for gold in golds)


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
