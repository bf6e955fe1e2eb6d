"""Document-scoped retrieval: one long document + query texts -> neighbours drawn from that document's chunks only.

For tasks whose evidence is the example's own document (a book, a paper, an article, a meeting transcript) rather
than a shared corpus. The document is cut into m-token chunks of the decoder's tokenizer and its chunks are embedded
exactly as `build_index` embeds a corpus ("title\\nchunk", the document prompt and normalisation of the encoding);
queries are encoded as the index encodes them and searched exhaustively (inner product, as a flat FAISS index
would: a document holds tens to a few thousand chunks). A neighbour is a chunk and its continuation, R = 2m tokens,
-1 padded, as in the corpus index.

Each document's chunks and vectors are cached under `cache_dir/<key>/` (key: the text, title, tokenizer, embedder,
chunk size and encoding), so a document shared by many questions is embedded once, and once per run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .chunks import PAD, chunk_documents
from .corpus import Document
from .encoders import Encoding, document_encode_fn, encode, resolve_encoding
from .manifest import embedder_fingerprint, tokenizer_fingerprint, write_json_atomic
from .retriever import SearchResult


class DocumentChunks:
    """One document's chunks in memory: tokens (N, m) -1 padded, texts (N,), vectors (N, D)."""

    def __init__(self, doc_id: str, tokens: np.ndarray, texts: list[str], vectors: np.ndarray):
        self.doc_id, self.tokens, self.texts, self.vectors = doc_id, tokens, texts, vectors

    def __len__(self) -> int:
        return len(self.tokens)

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(...,) chunk positions, -1 missing -> (..., 2m) chunk + continuation tokens, -1 padded."""
        ids = np.asarray(ids, np.int64)
        flat, m = ids.reshape(-1), self.tokens.shape[1]
        out = np.full((len(flat), 2 * m), PAD, np.int64)
        present = flat >= 0
        out[present, :m] = self.tokens[flat[present]]
        cont = present & (flat + 1 < len(self))
        out[cont, m:] = self.tokens[flat[cont] + 1]
        return out.reshape(*ids.shape, 2 * m)

    def neighbour_text(self, i: int) -> str:
        if i < 0:
            return ""
        return self.texts[i] + (self.texts[i + 1] if i + 1 < len(self) else "")


class DocumentIndex:
    """Search within one document at a time. `encoding`: the main index's (`Encoding.from_manifest`), so that
    document-scoped neighbours are embedded like corpus neighbours; None: the embedder's own prompts and
    normalisation, as `build_index` would record them."""

    def __init__(self, tokenizer, embedder, chunk_size: int, cache_dir: str | Path | None = None,
                 encoding: Encoding | None = None, with_title: bool = True):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        self.tokenizer, self.embedder, self.chunk_size = tokenizer, embedder, chunk_size
        self.encoding = encoding or resolve_encoding(embedder)
        self.with_title = with_title
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, DocumentChunks] = {}
        self._settings = json.dumps({"tokenizer": tokenizer_fingerprint(tokenizer),
                                     "embedder": embedder_fingerprint(embedder), "chunk_size": chunk_size,
                                     "encoding": self.encoding.to_dict(), "with_title": with_title}, sort_keys=True)

    @property
    def neighbour_length(self) -> int:
        return 2 * self.chunk_size

    def _key(self, doc: Document) -> str:
        h = hashlib.sha256(self._settings.encode())
        for part in (doc.id, doc.title, doc.text):
            h.update(b"\0" + part.encode("utf-8"))
        return h.hexdigest()[:20]

    def chunks(self, doc: Document) -> DocumentChunks:
        """The document's chunks and vectors: from memory, from the cache, or computed (and cached)."""
        key = self._key(doc)
        if key in self._memory:
            return self._memory[key]
        folder = self.cache_dir / key if self.cache_dir is not None else None
        found = self._read(folder, doc.id) if folder is not None else None
        if found is None:
            found = self._compute(doc)
            if folder is not None:
                self._write(folder, found)
        self._memory[key] = found
        return found

    def _compute(self, doc: Document) -> DocumentChunks:
        records = chunk_documents([doc], self.tokenizer, self.chunk_size, progress=False)
        title = doc.title if self.with_title else ""
        texts = [f"{title}\n{t}" if title else t for t in records.texts]
        vectors = document_encode_fn(self.encoding)(self.embedder, texts)
        return DocumentChunks(doc.id, records.tokens.astype(np.int32), list(records.texts),
                              np.asarray(vectors, np.float32))

    @staticmethod
    def _read(folder: Path, doc_id: str) -> DocumentChunks | None:
        if not (folder / "done.json").is_file():
            return None
        try:
            texts = json.loads((folder / "texts.json").read_text(encoding="utf-8"))
            tokens, vectors = np.load(folder / "tokens.npy"), np.load(folder / "vectors.npy")
        except (OSError, ValueError):
            return None  # a damaged cache entry is recomputed
        if not (len(texts) == len(tokens) == len(vectors)):
            return None
        return DocumentChunks(doc_id, tokens, texts, vectors)

    @staticmethod
    def _write(folder: Path, chunks: DocumentChunks) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        np.save(folder / "tokens.npy", chunks.tokens)
        np.save(folder / "vectors.npy", chunks.vectors)
        (folder / "texts.json").write_text(json.dumps(chunks.texts), encoding="utf-8")
        write_json_atomic(folder / "done.json", {"num_chunks": len(chunks)})  # last: the entry is complete

    def search(self, doc: Document, queries: Sequence[str], k: int) -> SearchResult:
        """Top-k chunks of `doc` for each query, best first; missing neighbours (a document of fewer than k chunks)
        are -1 with empty text. ids are chunk positions within the document."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        chunks = self.chunks(doc)
        q = encode(self.embedder, list(queries), prompt=self.encoding.query_prompt, normalize=self.encoding.normalize)
        scores_all = np.asarray(q, np.float32) @ chunks.vectors.T  # (N, chunks)
        n, take = len(queries), min(k, len(chunks))
        ids = np.full((n, k), -1, np.int64)
        scores = np.full((n, k), -np.inf, np.float32)
        order = np.argsort(-scores_all, axis=1, kind="stable")[:, :take]
        ids[:, :take] = order
        scores[:, :take] = np.take_along_axis(scores_all, order, axis=1)
        texts = [[chunks.neighbour_text(int(i)) for i in row] for row in ids]
        chunk_texts = [[chunks.texts[int(i)] if i >= 0 else "" for i in row] for row in ids]
        doc_ids = [[doc.id if i >= 0 else None for i in row] for row in ids]
        return SearchResult(ids=ids, scores=scores, texts=texts, tokens=chunks.neighbour_tokens(ids),
                            chunk_texts=chunk_texts, doc_ids=doc_ids)
