"""Retrieval-gain controls: the same questions with another question's neighbours (`shuffled`), or with none.

A model that reads its neighbours scores clearly better with the true ones than with shuffled ones; training logs
the validation loss under `shuffled` and evaluation scores every reading row under each control.
"""
from __future__ import annotations

import numpy as np

CONTROLS = ("shuffled", "none")


def donors(groups: list[str]) -> list[int]:
    """For each example, the example whose neighbours it gets in the shuffled control: never itself when there are
    two or more, and from another group (article) wherever the split allows, so the donor's neighbours are unlikely
    to hold this example's answer. Deterministic."""
    n = len(groups)
    order = sorted(range(n), key=lambda i: (groups[i], i))  # grouped, then rolled by half: groups meet others
    shift = max(1, n // 2) if n > 1 else 0
    donor = [0] * n
    for j, i in enumerate(order):
        donor[i] = order[(j + shift) % n]
    return donor


def control_records(records: list[dict], control: str) -> list[dict]:
    """QA records under a control: `shuffled` gives each question the neighbours (tokens and texts alike) of a
    question of another article; `none` gives it no neighbours (RETRO then computes exactly its base model; GPT
    gets the closed-book prompt)."""
    if control == "none":
        return [{**r, "neighbour_tokens": np.full_like(np.asarray(r["neighbour_tokens"]), -1), "neighbour_texts": []}
                for r in records]
    if control != "shuffled":
        raise ValueError(f"unknown control {control!r}; choose from {CONTROLS}")
    donor = donors([str(r.get("group", i)) for i, r in enumerate(records)])
    return [{**r, "neighbour_tokens": records[d]["neighbour_tokens"], "neighbour_texts": records[d]["neighbour_texts"]}
            for r, d in zip(records, donor)]
