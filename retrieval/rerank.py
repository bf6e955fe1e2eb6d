"""Reranking: a query + its first-stage top-N chunks -> the same chunks reordered by a cross-encoder.

The cross-encoder (sentence-transformers `CrossEncoder`: any Hugging Face id or local folder, e.g.
cross-encoder/ms-marco-MiniLM-L-6-v2 or BAAI/bge-reranker-base) reads each (query, chunk text) pair jointly and
gives one relevance score; the chunks are sorted by it, ties kept in first-stage order. The chunk text is the one
the first stage indexed ("title\\nchunk"). Returned scores are the cross-encoder's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class RerankConfig:
    model: str  # CrossEncoder id or path
    depth: int = 100  # first-stage candidates reranked per query (at least k)
    batch_size: int = 32  # query-chunk pairs scored together
    max_length: int | None = 512  # tokens of a query-chunk pair; None: the model's own

    def __post_init__(self):
        if self.depth <= 0 or self.batch_size <= 0:
            raise ValueError(f"rerank depth and batch_size must be positive, got {self.depth}, {self.batch_size}")


class Reranker:
    def __init__(self, model, config: RerankConfig):
        self.model, self.config = model, config

    @classmethod
    def load(cls, config: RerankConfig, device: str | None = None) -> "Reranker":
        from sentence_transformers import CrossEncoder

        try:
            model = CrossEncoder(config.model, device=device, max_length=config.max_length)
        except OSError as e:
            raise FileNotFoundError(f"cross-encoder {config.model!r} could not be loaded ({str(e)[:200]}); pass a "
                                    f"local folder or a Hugging Face id available offline") from None
        return cls(model, config)

    @property
    def name(self) -> str:
        return self.config.model

    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Cross-encoder score of each (query, candidate text): one (K_q,) float32 array per query."""
        pairs = [(q, t) for q, cands in zip(queries, candidates) for t in cands]
        flat = np.asarray(self.model.predict(pairs, batch_size=self.config.batch_size, show_progress_bar=False,
                                             convert_to_numpy=True), np.float32).reshape(len(pairs), -1)[:, 0] \
            if pairs else np.zeros(0, np.float32)
        out, lo = [], 0
        for cands in candidates:
            out.append(flat[lo:lo + len(cands)])
            lo += len(cands)
        return out

    def rerank(self, queries: Sequence[str], ids: np.ndarray, text_of: Callable[[int], str], k: int):
        """ids (N, K') first-stage chunk ids (-1 padded) -> (ids (N, k), scores (N, k)) reordered."""
        out_ids = np.full((len(queries), k), -1, np.int64)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = [row[row >= 0] for row in ids]
        scores = self.score(queries, [[text_of(int(i)) for i in row] for row in rows])
        for q, (row, s) in enumerate(zip(rows, scores)):
            order = np.argsort(-s, kind="stable")[:k]
            out_ids[q, :len(order)], out_scores[q, :len(order)] = row[order], s[order]
        return out_ids, out_scores
