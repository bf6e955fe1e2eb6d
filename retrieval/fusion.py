"""Hybrid fusion: ranked lists of chunk ids from several retrievers (dense, BM25) -> one ranked list.

Two rules, each with a weight per retriever:
- reciprocal-rank fusion (Cormack et al. 2009): score(c) = sum_r w_r / (rrf_k + rank_r(c)), ranks from 1; a chunk
  missing from a list adds nothing. Needs no score calibration.
- normalised score combination: each list's scores are rescaled per query ("minmax" to [0, 1], or "zscore"),
  then score(c) = sum_r w_r * norm_r(c); a chunk missing from a list gets that list's minimum normalised score
  (0 for minmax) so that it is not rewarded for being absent.
Inputs and outputs follow the retriever's convention: ids (N, K) int64 with -1 where missing, scores (N, K)
float32 with -inf where missing, best first. Ties break on the smaller chunk id, so fusion is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

METHODS = ("rrf", "score")
NORMALISATIONS = ("minmax", "zscore")


@dataclass
class FusionConfig:
    method: str = "rrf"  # "rrf" or "score"
    weights: dict[str, float] = field(default_factory=lambda: {"dense": 1.0, "bm25": 1.0})  # per retriever
    rrf_k: int = 60  # RRF's rank offset (60 in the original paper)
    normalisation: str = "minmax"  # for method "score"
    depth: int = 100  # candidates taken from each retriever before fusing (at least k)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"fusion method {self.method!r} is unknown; choose one of {METHODS}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"fusion normalisation {self.normalisation!r} is unknown; choose one of {NORMALISATIONS}")
        if self.rrf_k < 0 or self.depth <= 0:
            raise ValueError(f"rrf_k must be >= 0 and depth > 0, got {self.rrf_k}, {self.depth}")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"fusion weights must be >= 0 with at least one > 0, got {self.weights}")

    def to_dict(self) -> dict:
        return {"method": self.method, "weights": dict(sorted(self.weights.items())), "rrf_k": self.rrf_k,
                "normalisation": self.normalisation, "depth": self.depth}


def parse_weights(text: str) -> dict[str, float]:
    """'dense=0.7,bm25=0.3' -> {'dense': 0.7, 'bm25': 0.3} (the CLI's --fusion-weights)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or name.strip() not in ("dense", "bm25"):
            raise ValueError(f"fusion weights {text!r}: expected NAME=NUMBER pairs with NAME dense or bm25, "
                             f"e.g. dense=0.7,bm25=0.3")
    return out


def reciprocal_rank_fusion(ranked: Sequence[np.ndarray], weights: Sequence[float], k: int, rrf_k: int = 60):
    """ranked[r]: (N, K_r) ids best first, -1 padded -> fused (ids (N, k), scores (N, k))."""
    def contributions(ids_row, _scores_row, w):
        return {int(c): w / (rrf_k + rank) for rank, c in enumerate(ids_row, 1) if c >= 0}

    return _fuse([(r, None) for r in ranked], weights, k, contributions)


def score_fusion(ranked: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float], k: int,
                 normalisation: str = "minmax"):
    """ranked[r]: (ids (N, K_r), scores (N, K_r)) best first -> fused (ids (N, k), scores (N, k))."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation {normalisation!r} is unknown; choose one of {NORMALISATIONS}")

    def contributions(ids_row, scores_row, w):
        ok = ids_row >= 0
        s = scores_row[ok].astype(np.float64)
        if not len(s):
            return {}, 0.0
        if normalisation == "minmax":
            span = s.max() - s.min()
            z = (s - s.min()) / span if span > 0 else np.ones_like(s)
        else:
            sd = s.std()
            z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
        return {int(c): w * float(v) for c, v in zip(ids_row[ok], z)}, w * float(z.min())

    return _fuse(ranked, weights, k, contributions, absent_floor=True)


def _fuse(ranked, weights, k, contributions, absent_floor: bool = False):
    if len(ranked) != len(weights):
        raise ValueError(f"{len(ranked)} ranked lists but {len(weights)} weights")
    n = len(ranked[0][0])
    out_ids = np.full((n, k), -1, np.int64)
    out_scores = np.full((n, k), -np.inf, np.float32)
    for q in range(n):
        total: dict[int, float] = {}
        floors = []
        parts = []
        for (ids, scores), w in zip(ranked, weights):
            got = contributions(ids[q], None if scores is None else scores[q], w)
            part, floor = got if absent_floor else (got, 0.0)
            parts.append(part)
            floors.append(floor)
        for c in set().union(*parts):
            total[c] = sum(p.get(c, f) for p, f in zip(parts, floors))
        best = sorted(total.items(), key=lambda cs: (-cs[1], cs[0]))[:k]
        for j, (c, s) in enumerate(best):
            out_ids[q, j], out_scores[q, j] = c, s
    return out_ids, out_scores


def fuse(config: FusionConfig, lists: dict[str, tuple[np.ndarray, np.ndarray]], k: int):
    """Fuse {retriever name: (ids, scores)} by `config`; retrievers with weight 0 are left out."""
    names = [n for n in sorted(lists) if config.weights.get(n, 0) > 0]
    if not names:
        raise ValueError(f"no retriever among {sorted(lists)} has a positive fusion weight ({config.weights})")
    weights = [config.weights[n] for n in names]
    if config.method == "rrf":
        return reciprocal_rank_fusion([lists[n][0] for n in names], weights, k, config.rrf_k)
    return score_fusion([lists[n] for n in names], weights, k, config.normalisation)
