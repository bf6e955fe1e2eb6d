"""Query side: an index directory + query texts (or chunk ids) -> neighbour chunk ids, scores, texts and tokens.

Neighbours are chunk + continuation, R = 2m decoder tokens, -1 padded; a neighbour whose R tokens are all -1 is
missing. Neighbours from an excluded document (the query's own, RETRO's rule against leakage) are dropped and
the search widened until k others are found or the index is exhausted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import faiss
import numpy as np

from .chunks import ChunkDB
from .embed import encode_texts
from .index import search_index, set_nprobe, to_devices
from .manifest import (IndexCorruptError, IndexMismatchError, embedder_dimension, embedder_fingerprint,
                       read_manifest, remedy, tokenizer_fingerprint, verify_directory)

ExcludeSpec = Sequence["str | int | Collection[str | int] | None"]


@dataclass
class SearchResult:
    ids: np.ndarray  # (N, K) int64 chunk ids, -1 where missing
    scores: np.ndarray  # (N, K) float32 inner products, -inf where missing
    texts: list[list[str]]  # (N, K) neighbour texts = chunk text + continuation text ("" where missing)
    tokens: np.ndarray  # (N, K, R) int64 neighbour tokens, R = 2m, -1 padded
    chunk_texts: list[list[str]]  # (N, K) the retrieved chunk's own text, without continuation
    doc_ids: list[list[str | None]]  # (N, K) corpus id of each neighbour's document


def _check_embedder(d: Path, man: dict, embedder):
    emb = man["embedder"]
    if embedder_dimension(embedder) != emb["dimension"] or embedder_fingerprint(embedder) != emb["fingerprint"]:
        raise IndexMismatchError(f"{d} was built with embedder {emb['name']!r} ({emb['dimension']}-d); the embedder "
                                 f"given has other weights, so its query vectors would not match the index. Pass the "
                                 f"same embedder or build another index")
    return embedder


def check_counts(d: Path, man: dict, db: ChunkDB, index) -> None:
    """The manifest's counts against the files: an edited manifest or mismatched files are refused."""
    n = man.get("num_chunks")
    found = {
        "chunks/tokens.npy rows": len(db.tokens), "chunks/doc.npy rows": len(db.doc), "chunks/pos.npy rows":
        len(db.pos), "chunks/text_offsets.npy entries - 1": len(db._text_offsets) - 1,
        "chunks/info.json num_chunks": db.info.get("num_chunks"), "index.faiss vectors": int(index.ntotal),
        "manifest num_vectors": man.get("num_vectors"),
    }
    problems = [f"{what} = {value}" for what, value in found.items() if value != n]
    if db.chunk_size != man.get("chunk_size") or db.info.get("chunk_size") != man.get("chunk_size"):
        problems.append(f"chunks/tokens.npy holds {db.chunk_size}-token chunks")
    if len(db.doc_ids) != man.get("num_documents") or db.info.get("num_documents") != man.get("num_documents"):
        problems.append(f"chunks/documents.jsonl lists {len(db.doc_ids)} documents, the manifest "
                        f"{man.get('num_documents')}")
    text_bytes = (d / "chunks" / "text.bin").stat().st_size
    if len(db._text_offsets) and int(db._text_offsets[-1]) != text_bytes:
        problems.append(f"chunks/text.bin holds {text_bytes} bytes, the offsets end at {int(db._text_offsets[-1])}")
    if int(index.d) != man.get("embedder", {}).get("dimension"):
        problems.append(f"index.faiss holds {index.d}-d vectors, the embedder is {man['embedder'].get('dimension')}-d")
    if problems:
        raise IndexCorruptError(f"{d / 'manifest.json'}: records {n} chunks of {man.get('chunk_size')} tokens "
                                f"and {man.get('num_documents')} documents, but {'; '.join(problems)}; the manifest "
                                f"or the files were changed after the build; {remedy(d, 'index', man)}")


class Retriever:
    """Search one index directory. Build it with `retrieval.build_index` or `python -m retrieval build`."""

    def __init__(self, directory: Path, manifest: dict, db: ChunkDB, index, embedder=None, tokenizer=None):
        self.directory, self.manifest, self.db, self.index = directory, manifest, db, index
        self._embedder, self.tokenizer = embedder, tokenizer
        self._shards: dict[int, np.ndarray] = {}

    @classmethod
    def load(cls, directory: str | Path, *, tokenizer=None, chunk_size: int | None = None, embedder=None,
             nprobe: int | None = None, use_gpu: bool | None = None, verify="auto") -> "Retriever":
        """Open a finished index. Whatever is passed is checked against what the index was built with, and a
        mismatch raises IndexMismatchError: `tokenizer` (vocab fingerprint), `chunk_size`, `embedder` (a
        SentenceTransformer or a path to one; weight fingerprint). `nprobe` overrides the tuned value.
        Every file is checked against the manifest first (IndexCorruptError): sizes always, checksums per `verify`
        ("auto": files up to 1 GiB each time, bigger ones when they changed; True: all; False: none); then the
        counts the manifest records are checked against the files."""
        d = Path(directory)
        man = read_manifest(d)
        verify_directory(d, man, verify)
        if chunk_size is not None and chunk_size != man["chunk_size"]:
            raise IndexMismatchError(f"{d} was built with chunk size {man['chunk_size']}, not {chunk_size}; use a "
                                     f"chunk size of {man['chunk_size']} or build another index")
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != man["tokenizer"]["fingerprint"]:
            raise IndexMismatchError(f"{d} was built with tokenizer {man['tokenizer']['name']!r}, whose vocabulary "
                                     f"differs from the tokenizer passed ({getattr(tokenizer, 'name_or_path', '?')!r})"
                                     f"; its neighbour token ids would be wrong for this model. Build an index with "
                                     f"this model's tokenizer")
        if isinstance(embedder, (str, Path)):
            from sentence_transformers import SentenceTransformer

            embedder = SentenceTransformer(str(embedder))
        if embedder is not None:
            _check_embedder(d, man, embedder)
        try:
            index = faiss.read_index(str(d / "index.faiss"))
        except RuntimeError as e:
            raise IndexCorruptError(f"{d / 'index.faiss'}: FAISS cannot read it ({str(e).strip().splitlines()[-1]})"
                                    f"; {remedy(d, 'index', man)}") from None
        db = ChunkDB(d / "chunks")
        check_counts(d, man, db, index)
        index = to_devices(index, use_gpu)
        if nprobe or man.get("nprobe"):
            set_nprobe(index, nprobe or man["nprobe"])
        return cls(d, man, db, index, embedder, tokenizer)

    # ---- properties
    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def neighbour_length(self) -> int:
        return 2 * self.chunk_size

    @property
    def embedder(self):
        recorded = Path(self.manifest["embedder"]["name"])
        if self._embedder is None and recorded.is_dir():  # built from a local folder: that folder is the embedder
            from sentence_transformers import SentenceTransformer

            self._embedder = _check_embedder(self.directory, self.manifest, SentenceTransformer(str(recorded)))
        if self._embedder is None:
            raise RuntimeError(f"no embedder: pass embedder= to Retriever.load (this index was built with "
                               f"{self.manifest['embedder']['name']!r}) to search by text")
        return self._embedder

    def __len__(self) -> int:
        return len(self.db)

    # ---- search
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N,) query texts -> (N, D) float32 normalised."""
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings (wrap a single query in a list)")
        return encode_texts(self.embedder, list(texts), batch_size=batch_size)

    def search(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None) -> SearchResult:
        """Top-k chunks for each query text, best first."""
        return self.search_vectors(self.encode(texts), k, exclude_doc_ids)

    def search_ids(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None):
        """Only chunk ids (N, K) int64 and scores (N, K) float32: for deep searches (evaluation) that need no
        tokens or texts."""
        return self._search_ids(self.encode(texts), k, exclude_doc_ids)

    def neighbour_tokens(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None) -> np.ndarray:
        """(N,) texts -> (N, K, R) int64 neighbour tokens, -1 padded, the query's own documents excluded."""
        return self.search(texts, k, exclude_doc_ids).tokens

    def neighbour_texts(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None):
        """The same neighbours as `neighbour_tokens`, as text (chunk + continuation): (N, K) strings."""
        return self.search(texts, k, exclude_doc_ids).texts

    def search_vectors(self, vectors: np.ndarray, k: int, exclude_doc_ids: ExcludeSpec | None = None) -> SearchResult:
        """As `search`, for query vectors (N, D) that are already L2-normalised."""
        return self._result(*self._search_ids(vectors, k, exclude_doc_ids))

    def chunk_neighbours(self, chunk_ids: Sequence[int], k: int) -> SearchResult:
        """Neighbours of the index's own chunks (by stored vector, no re-encoding), never from the same document."""
        ids = np.asarray(chunk_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.db)):
            raise IndexError(f"chunk ids must lie in [0, {len(self.db)})")
        vecs = np.stack([self._stored_vector(int(i)) for i in ids]) if ids.size else np.zeros((0, 1), np.float32)
        excluded = [{int(self.db.doc[i])} for i in ids]
        scores, nids = self._search_excluding(vecs, k, excluded)
        return self._result(nids, scores)

    def _search_ids(self, vectors: np.ndarray, k: int, exclude_doc_ids: ExcludeSpec | None):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if exclude_doc_ids is not None and len(exclude_doc_ids) != len(vectors):
            raise ValueError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {len(vectors)} queries")
        excluded = None if exclude_doc_ids is None else [self._doc_set(e) for e in exclude_doc_ids]
        scores, ids = self._search_excluding(vectors, k, excluded)
        return ids, scores

    # ---- internals
    def _doc_set(self, spec) -> set[int]:
        if spec is None:
            return set()
        items = [spec] if isinstance(spec, (str, int, np.integer)) else list(spec)
        out = set()
        for item in items:
            if isinstance(item, str):
                try:  # a document absent from this index cannot leak from it, so there is nothing to exclude
                    out.add(self.db.doc_index(item))
                except KeyError:
                    pass
            else:
                out.add(int(item))
        return out

    def _search_excluding(self, vectors: np.ndarray, k: int, excluded: list[set[int]] | None):
        n_total = int(self.index.ntotal)
        out_ids = np.full((len(vectors), k), -1, np.int64)
        out_scores = np.full((len(vectors), k), -np.inf, np.float32)
        rows = np.arange(len(vectors))
        width = min(n_total, k + (2 * k + 8 if excluded else 0))
        cap = min(n_total, k + 4096)
        while len(rows) and width > 0:
            scores, ids = search_index(self.index, vectors[rows], width)
            short = []
            for r, s_row, i_row in zip(rows, scores, ids):
                keep = i_row >= 0
                if excluded and excluded[r]:
                    keep &= ~np.isin(self.db.doc[np.maximum(i_row, 0)], list(excluded[r]))
                got_i, got_s = i_row[keep][:k], s_row[keep][:k]
                out_ids[r, :len(got_i)], out_scores[r, :len(got_s)] = got_i, got_s
                if len(got_i) < k and width < cap:
                    short.append(r)
            rows, width = np.asarray(short, np.int64), min(cap, width * 4)
        return out_scores, out_ids

    def _result(self, ids: np.ndarray, scores: np.ndarray) -> SearchResult:
        texts = [[self.db.neighbour_text(int(i)) for i in row] for row in ids]
        chunk_texts = [[self.db.text(int(i)) if i >= 0 else "" for i in row] for row in ids]
        doc_ids = [[self.db.doc_ids[self.db.doc[i]] if i >= 0 else None for i in row] for row in ids]
        return SearchResult(ids, scores, texts, self.db.neighbour_tokens(ids), chunk_texts, doc_ids)

    def _stored_vector(self, chunk_id: int) -> np.ndarray:
        size = int(self.manifest["shard_size"])
        s = chunk_id // size
        if s not in self._shards:
            self._shards[s] = np.load(self.directory / "embeddings" / f"shard_{s:05d}.npy", mmap_mode="r")
        return np.asarray(self._shards[s][chunk_id - s * size], np.float32)
