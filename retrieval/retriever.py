"""Query side: an index directory + query texts (or chunk ids) -> neighbour chunk ids, scores, texts and tokens.

Neighbours are chunk + continuation, R = 2m decoder tokens, -1 padded; a neighbour whose R tokens are all -1 is
missing. Neighbours from an excluded document (the query's own, RETRO's rule against leakage) are dropped and
the search widened until k others are found or the index is exhausted.

Three kinds of first stage over the same chunk ids: "dense" (the FAISS index of the embedder's vectors), "bm25"
(lexical.py) and "hybrid" (both, fused by fusion.py); any of them may be followed by a cross-encoder reranking of
its top-N (rerank.py). Queries are encoded as the index recorded (encoders.py: query encoder, prompt, pooling,
normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import faiss
import numpy as np

from .chunks import ChunkDB
from .encoders import Encoding, encode, pooling_mode
from .fusion import FusionConfig, fuse
from .index import search_index, set_nprobe, to_devices
from .lexical import LexicalIndex
from .manifest import (IndexCorruptError, IndexMismatchError, embedder_dimension, embedder_fingerprint,
                       read_manifest, remedy, tokenizer_fingerprint, verify_directory)
from .rerank import RerankConfig, Reranker

KINDS = ("dense", "bm25", "hybrid")

ExcludeSpec = Sequence["str | int | Collection[str | int] | None"]


@dataclass
class SearchResult:
    ids: np.ndarray  # (N, K) int64 chunk ids, -1 where missing
    scores: np.ndarray  # (N, K) float32 inner products, -inf where missing
    texts: list[list[str]]  # (N, K) neighbour texts = chunk text + continuation text ("" where missing)
    tokens: np.ndarray  # (N, K, R) int64 neighbour tokens, R = 2m, -1 padded
    chunk_texts: list[list[str]]  # (N, K) the retrieved chunk's own text, without continuation
    doc_ids: list[list[str | None]]  # (N, K) corpus id of each neighbour's document


def query_encoder_record(man: dict) -> dict:
    """{name, fingerprint, dimension} of the model that encodes queries (the embedder unless asymmetric)."""
    return man.get("query_encoder") or man["embedder"]


def _check_embedder(d: Path, man: dict, embedder):
    emb = query_encoder_record(man)
    asymmetric = man.get("query_encoder", man["embedder"]) != man["embedder"]
    role = f"query encoder {emb['name']!r} (documents: {man['embedder']['name']!r})" if asymmetric \
        else f"embedder {emb['name']!r}"
    if embedder_dimension(embedder) != emb["dimension"] or embedder_fingerprint(embedder) != emb["fingerprint"]:
        raise IndexMismatchError(f"{d} was built with {role} ({emb['dimension']}-d); the embedder "
                                 f"given has other weights, so its query vectors would not match the index. Pass the "
                                 f"same {'query encoder' if asymmetric else 'embedder'} or build another index")
    recorded_pooling = Encoding.from_manifest(man).query_pooling
    if recorded_pooling and pooling_mode(embedder) != recorded_pooling:
        raise IndexMismatchError(f"{d} encodes queries with {recorded_pooling!r} pooling; the model given pools with "
                                 f"{pooling_mode(embedder)!r}. Pass --pooling {recorded_pooling} (or the same model)")
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

    def __init__(self, directory: Path, manifest: dict, db: ChunkDB, index, embedder=None, tokenizer=None, *,
                 kind: str = "dense", lexical: LexicalIndex | None = None, fusion: FusionConfig | None = None,
                 reranker: Reranker | None = None):
        self.directory, self.manifest, self.db, self.index = directory, manifest, db, index
        self._embedder, self.tokenizer = embedder, tokenizer
        self._shards: dict[int, np.ndarray] = {}
        self.kind, self.lexical, self.reranker = kind, lexical, reranker
        self.fusion = fusion or FusionConfig()
        self.encoding = Encoding.from_manifest(manifest)
        self.with_title = bool(manifest.get("with_title", True))

    @classmethod
    def load(cls, directory: str | Path, *, tokenizer=None, chunk_size: int | None = None, embedder=None,
             nprobe: int | None = None, use_gpu: bool | None = None, verify="auto", retriever: str = "dense",
             fusion: FusionConfig | None = None, reranker: "Reranker | RerankConfig | str | None" = None,
             ) -> "Retriever":
        """Open a finished index. Whatever is passed is checked against what the index was built with, and a
        mismatch raises IndexMismatchError: `tokenizer` (vocab fingerprint), `chunk_size`, `embedder` (the query
        encoder: a SentenceTransformer or a path to one; weight fingerprint and pooling). `nprobe` overrides the
        tuned value. Every file is checked against the manifest first (IndexCorruptError): sizes always, checksums
        per `verify` ("auto": files up to 1 GiB each time, bigger ones when they changed; True: all; False: none);
        then the counts the manifest records are checked against the files. `retriever`: "dense", "bm25" (needs
        the index's bm25/) or "hybrid" (both, fused by `fusion`); `reranker`: a cross-encoder (id, path,
        RerankConfig or Reranker) that reorders the first stage's top-N."""
        if retriever not in KINDS:
            raise ValueError(f"retriever {retriever!r} is unknown; choose one of {KINDS}")
        d = Path(directory)
        man = read_manifest(d)
        verify_directory(d, man, verify, retriever=retriever)  # dense search does not read bm25/
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
            # an index whose inverted lists live on disk (ondisk.py) finds them next to index.faiss
            index = faiss.read_index(str(d / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR if man.get("on_disk")
                                     else 0)
        except RuntimeError as e:
            raise IndexCorruptError(f"{d / 'index.faiss'}: FAISS cannot read it ({str(e).strip().splitlines()[-1]})"
                                    f"; {remedy(d, 'index', man)}") from None
        db = ChunkDB(d / "chunks")
        check_counts(d, man, db, index)
        if retriever == "bm25":
            index = None
        else:
            index = to_devices(index, use_gpu) if not man.get("on_disk") else index
            if nprobe or man.get("nprobe"):
                set_nprobe(index, nprobe or man["nprobe"])
            if man.get("ef_search"):
                faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(man["ef_search"]))
        lexical = LexicalIndex.load(d, db) if retriever != "dense" else None
        if isinstance(reranker, (str, Path)):
            reranker = RerankConfig(str(reranker))
        if isinstance(reranker, RerankConfig):
            reranker = Reranker.load(reranker)
        return cls(d, man, db, index, embedder, tokenizer, kind=retriever, lexical=lexical, fusion=fusion,
                   reranker=reranker)

    def describe(self) -> dict:
        """What produces the rankings (recorded with precomputed neighbours; part of a run's identity)."""
        out: dict = {"kind": self.kind}
        if self.kind == "hybrid":
            out["fusion"] = self.fusion.to_dict()
        if self.reranker is not None:
            out["reranker"] = {"model": self.reranker.name, "depth": self.reranker.config.depth}
        return out

    # ---- properties
    @property
    def chunk_size(self) -> int:
        return int(self.manifest["chunk_size"])

    @property
    def neighbour_length(self) -> int:
        return 2 * self.chunk_size

    @property
    def embedder(self):
        recorded = Path(query_encoder_record(self.manifest)["name"])
        if self._embedder is None and recorded.is_dir():  # built from a local folder: that folder is the embedder
            from sentence_transformers import SentenceTransformer

            self._embedder = _check_embedder(self.directory, self.manifest, SentenceTransformer(str(recorded)))
        if self._embedder is None:
            raise RuntimeError(f"no embedder: pass embedder= to Retriever.load (this index encodes queries with "
                               f"{query_encoder_record(self.manifest)['name']!r}) to search by text")
        return self._embedder

    def __len__(self) -> int:
        return len(self.db)

    # ---- search
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N,) query texts -> (N, D) float32 query vectors (the recorded prompt and normalisation)."""
        _check_texts(texts)
        return encode(self.embedder, list(texts), prompt=self.encoding.query_prompt,
                      normalize=self.encoding.normalize, batch_size=batch_size)

    def search(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None) -> SearchResult:
        """Top-k chunks for each query text, best first."""
        return self._result(*self.search_ids(texts, k, exclude_doc_ids))

    def search_ids(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None):
        """Only chunk ids (N, K) int64 and scores (N, K) float32: for deep searches (evaluation) that need no
        tokens or texts."""
        _check_texts(texts)
        vectors = self.encode(texts) if self.kind != "bm25" else None
        return self._search_ids(vectors, k, exclude_doc_ids, texts=list(texts))

    def neighbour_tokens(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None) -> np.ndarray:
        """(N,) texts -> (N, K, R) int64 neighbour tokens, -1 padded, the query's own documents excluded."""
        return self.search(texts, k, exclude_doc_ids).tokens

    def neighbour_texts(self, texts: Sequence[str], k: int, exclude_doc_ids: ExcludeSpec | None = None):
        """The same neighbours as `neighbour_tokens`, as text (chunk + continuation): (N, K) strings."""
        return self.search(texts, k, exclude_doc_ids).texts

    def search_vectors(self, vectors: np.ndarray, k: int, exclude_doc_ids: ExcludeSpec | None = None) -> SearchResult:
        """As `search`, for query vectors (N, D) encoded as `encode` does (dense retrieval only)."""
        if self.kind != "dense" or self.reranker is not None:
            raise ValueError(f"search_vectors serves dense retrieval without reranking; this retriever is "
                             f"{self.describe()}: search by text with `search`")
        return self._result(*self._search_ids(vectors, k, exclude_doc_ids))

    def chunk_neighbours(self, chunk_ids: Sequence[int], k: int) -> SearchResult:
        """Neighbours of the index's own chunks (by stored vector, no re-encoding), never from the same document."""
        ids = np.asarray(chunk_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.db)):
            raise IndexError(f"chunk ids must lie in [0, {len(self.db)})")
        vecs = None
        if self.kind != "bm25":
            vecs = np.stack([self._stored_vector(int(i)) for i in ids]) if ids.size else np.zeros((0, 1), np.float32)
        texts = [self.db.embedding_text(int(i), self.with_title) for i in ids] \
            if self.kind != "dense" or self.reranker is not None else None
        excluded = [{int(self.db.doc[i])} for i in ids]
        nids, scores = self._search_ids(vecs, k, excluded, texts=texts, resolved=True)
        return self._result(nids, scores)

    def _search_ids(self, vectors: np.ndarray | None, k: int, exclude_doc_ids, texts: list[str] | None = None,
                    resolved: bool = False):
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        n = len(vectors) if vectors is not None else len(texts)
        if exclude_doc_ids is not None and len(exclude_doc_ids) != n:
            raise ValueError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {n} queries")
        excluded = exclude_doc_ids if resolved or exclude_doc_ids is None \
            else [self._doc_set(e) for e in exclude_doc_ids]
        depth = max(k, self.reranker.config.depth) if self.reranker is not None else k
        scores, ids = self._search_excluding(n, depth, excluded, self._first_stage(vectors, texts))
        if self.reranker is not None:
            ids, scores = self.reranker.rerank(texts, ids, lambda i: self.db.embedding_text(i, self.with_title), k)
        return ids, scores

    def _first_stage(self, vectors: np.ndarray | None, texts: list[str] | None):
        """rows, width -> (scores, ids) (len(rows), width) of this retriever's kind, before exclusions."""
        def dense(rows, width):
            if self.manifest.get("refine", 1) > 1:  # compressed codes on disk: re-score with the full vectors
                from .ondisk import refine_search, stored_vectors

                return refine_search(self.index, vectors[rows], width, int(self.manifest["refine"]),
                                     lambda ids: stored_vectors(self.directory / "embeddings",
                                                                int(self.manifest["shard_size"]), ids, self._shards))
            return search_index(self.index, vectors[rows], width)

        def bm25(rows, width):
            return self.lexical.search([texts[r] for r in rows], width)

        def hybrid(rows, width):
            depth = max(width, self.fusion.depth)
            d_scores, d_ids = dense(rows, depth)
            l_scores, l_ids = bm25(rows, depth)
            ids, scores = fuse(self.fusion, {"dense": (d_ids, d_scores), "bm25": (l_ids, l_scores)}, width)
            return scores, ids

        return {"dense": dense, "bm25": bm25, "hybrid": hybrid}[self.kind]

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

    def _search_excluding(self, n_queries: int, k: int, excluded: list[set[int]] | None, first_stage):
        n_total = len(self.db)
        out_ids = np.full((n_queries, k), -1, np.int64)
        out_scores = np.full((n_queries, k), -np.inf, np.float32)
        rows = np.arange(n_queries)
        width = min(n_total, k + (2 * k + 8 if excluded else 0))
        cap = min(n_total, k + 4096)
        while len(rows) and width > 0:
            scores, ids = first_stage(rows, width)
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


def _check_texts(texts) -> None:
    if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings (wrap a single query in a list)")
