"""Precomputed neighbours: a dataset of texts + a Retriever -> memmaps of neighbours, so that no training or
evaluation step calls FAISS or the embedder.

Layout of the output directory:
  ids.npy      (Q, K) int64 chunk ids in the index, -1 where missing
  scores.npy   (Q, K) float32
  tokens.npy   (Q, K, R) int32 neighbour tokens (R = 2m), -1 padded
  offsets.npy  (E + 1,) int64: example e owns query rows offsets[e]:offsets[e + 1]
  manifest.json  written last: the index it came from (fingerprints), k, counts, and the size and checksum of
                 each file above (checked when loaded)
With `chunked=True` each example is cut into m-token chunks of the decoder's tokenizer and every chunk is a query
(RETRO: chunk l of an example retrieves with its own text), so example e has L_e = ceil(T_e / m) rows; with
`chunked=False` each example is a single query (one row).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .chunks import chunk_documents
from .corpus import Document
from .manifest import FORMAT_VERSION, IndexMismatchError, read_manifest, verify_directory, write_manifest
from .retriever import ExcludeSpec, Retriever


def precompute_neighbours(retriever: Retriever, examples: Sequence[str], directory: str | Path, k: int, *,
                          chunked: bool = True, exclude_doc_ids: ExcludeSpec | None = None, batch_size: int = 256,
                          progress: bool = True) -> "PrecomputedNeighbours":
    """Search neighbours for every example (or every chunk of every example) and store them under `directory`.
    `exclude_doc_ids[e]` (a corpus id, several, or None) is dropped from all of example e's neighbours."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if exclude_doc_ids is not None and len(exclude_doc_ids) != len(examples):
        raise ValueError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {len(examples)} examples")
    if chunked:
        if retriever.tokenizer is None:
            raise ValueError("chunked=True cuts examples with the decoder's tokenizer: pass tokenizer= to "
                             "Retriever.load")
        recs = chunk_documents([Document(str(i), "", t) for i, t in enumerate(examples)], retriever.tokenizer,
                               retriever.chunk_size, progress=False)
        queries, owner = recs.texts, recs.doc
    else:
        queries, owner = list(examples), np.arange(len(examples), dtype=np.int64)
    offsets = np.zeros(len(examples) + 1, np.int64)
    np.add.at(offsets, owner + 1, 1)
    offsets = np.cumsum(offsets)

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").unlink(missing_ok=True)
    R = retriever.neighbour_length
    ids = np.lib.format.open_memmap(d / "ids.npy", mode="w+", dtype=np.int64, shape=(len(queries), k))
    scores = np.lib.format.open_memmap(d / "scores.npy", mode="w+", dtype=np.float32, shape=(len(queries), k))
    tokens = np.lib.format.open_memmap(d / "tokens.npy", mode="w+", dtype=np.int32, shape=(len(queries), k, R))
    for lo in tqdm(range(0, len(queries), batch_size), desc="neighbours", unit="batch", disable=not progress):
        hi = min(len(queries), lo + batch_size)
        excl = None if exclude_doc_ids is None else [exclude_doc_ids[int(e)] for e in owner[lo:hi]]
        res = retriever.search(queries[lo:hi], k, excl)
        ids[lo:hi], scores[lo:hi], tokens[lo:hi] = res.ids, res.scores, res.tokens
    for arr in (ids, scores, tokens):
        arr.flush()
    np.save(d / "offsets.npy", offsets)
    man = retriever.manifest
    h = hashlib.sha256()
    for t in examples:
        h.update(t.encode("utf-8") + b"\0")
    write_manifest(d, {
        "kind": "neighbours", "format_version": FORMAT_VERSION, "index": str(retriever.directory),
        "index_corpus_hash": man["corpus_hash"], "tokenizer": man["tokenizer"], "embedder": man["embedder"],
        "chunk_size": retriever.chunk_size, "k": k, "chunked": chunked, "num_examples": len(examples),
        "num_queries": len(queries), "examples_hash": h.hexdigest(), "excluded_docs": exclude_doc_ids is not None,
        "retriever": retriever.describe(),
    }, ["ids.npy", "scores.npy", "tokens.npy", "offsets.npy"])
    return PrecomputedNeighbours.load(d)


class PrecomputedNeighbours:
    """Memory-mapped neighbours from `precompute_neighbours`; `pn[e]` -> (L_e, K, R) int64 tokens of example e."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.ids = np.load(directory / "ids.npy", mmap_mode="r")  # (Q, K)
        self.scores = np.load(directory / "scores.npy", mmap_mode="r")  # (Q, K)
        self.tokens = np.load(directory / "tokens.npy", mmap_mode="r")  # (Q, K, R)
        self.offsets = np.load(directory / "offsets.npy")  # (E + 1,)

    @classmethod
    def load(cls, directory: str | Path, *, tokenizer=None, chunk_size: int | None = None) -> "PrecomputedNeighbours":
        """Open precomputed neighbours; refuses other chunk sizes or tokenizers than the caller's."""
        from .manifest import tokenizer_fingerprint

        d = Path(directory)
        man = read_manifest(d, kind="neighbours")
        verify_directory(d, man, "auto", kind="neighbours")
        if chunk_size is not None and chunk_size != man["chunk_size"]:
            raise IndexMismatchError(f"{d}: neighbours were computed with chunk size {man['chunk_size']}, "
                                     f"not {chunk_size}; recompute them")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != man["tokenizer"]["fingerprint"]:
            raise IndexMismatchError(f"{d}: neighbours hold token ids of tokenizer {man['tokenizer']['name']!r}, "
                                     f"not of the tokenizer passed; recompute them with an index of this tokenizer")
        return cls(d, man)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, example: int) -> np.ndarray:
        lo, hi = self.offsets[example], self.offsets[example + 1]
        return np.asarray(self.tokens[lo:hi], np.int64)  # (L_e, K, R)
