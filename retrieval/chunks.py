"""Chunk database: Documents + the decoder's tokenizer -> non-overlapping m-token chunks stored as memmaps.

Layout of `chunks/` (all arrays indexed by chunk id, chunks of one document are contiguous and in order):
  tokens.npy       (N, m) int32, decoder token ids, -1 after the end of a document's last (short) chunk
  doc.npy          (N,)   int64, index of the chunk's document in documents.jsonl
  pos.npy          (N,)   int32, position of the chunk inside its document (0, 1, ...)
  text.bin + text_offsets.npy   utf-8 text of every chunk (the exact source span, so chunk texts of a
                                document concatenate back to the document)
  documents.jsonl  one {"id", "title"} line per document
  info.json        written last: counts, chunk size and the tokenizer fingerprint
A RETRO neighbour is a chunk followed by its continuation (the next chunk of the same document): R = 2m tokens.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .corpus import Document
from .manifest import write_json_atomic

PAD = -1


@dataclass
class ChunkRecords:
    """Chunks of a list of documents, in memory, before they are written."""

    tokens: np.ndarray  # (N, m) int32, -1 padded
    doc: np.ndarray  # (N,) int64
    pos: np.ndarray  # (N,) int32
    texts: list[str]
    empty_documents: int = 0  # documents that are empty or only whitespace: they have no chunks


def chunk_documents(docs: Sequence[Document], tokenizer, chunk_size: int, batch_size: int = 256,
                    progress: bool = True) -> ChunkRecords:
    """Tokenise each document (no special tokens) and cut it into chunks of `chunk_size` tokens. A document that is
    empty or only whitespace gets no chunk (a chunk of blanks would be retrieved for nothing); their number is
    reported on stderr and kept in `empty_documents`."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    rows, doc_ix, pos, texts = [], [], [], []
    empty = [d.id for d in docs if not d.text.strip()]
    for start in tqdm(range(0, len(docs), batch_size), desc="chunking", unit="batch", disable=not progress):
        batch = docs[start:start + batch_size]
        ids_list, spans_list = tokenize_with_spans(tokenizer, [d.text if d.text.strip() else "" for d in batch])
        for j, (doc, ids, spans) in enumerate(zip(batch, ids_list, spans_list)):
            for c, lo in enumerate(range(0, len(ids), chunk_size)):
                piece = ids[lo:lo + chunk_size]
                row = np.full(chunk_size, PAD, dtype=np.int32)
                row[:len(piece)] = piece
                rows.append(row)
                doc_ix.append(start + j)
                pos.append(c)
                if spans is None:
                    texts.append(tokenizer.decode(piece))
                else:
                    # the span runs from this chunk's first character to the next chunk's first character
                    begin = 0 if lo == 0 else spans[lo][0]
                    end = spans[lo + chunk_size][0] if lo + chunk_size < len(ids) else len(doc.text)
                    texts.append(doc.text[begin:end])
    if not rows:
        from .corpus import CorpusError

        raise CorpusError(f"none of the {len(docs)} documents produced a token: every text is empty or only "
                          f"whitespace (e.g. document {docs[0].id!r}); check the text field (--text-field) and the "
                          f"corpus file")
    if empty:
        print(f"chunking: {len(empty)} of {len(docs)} documents are empty or only whitespace and get no chunk "
              f"(e.g. document {empty[0]!r})", file=sys.stderr)
    return ChunkRecords(np.stack(rows), np.asarray(doc_ix, np.int64), np.asarray(pos, np.int32), texts, len(empty))


def tokenize_with_spans(tokenizer, texts: list[str]):
    """Token ids of each text and, for fast tokenizers, each token's (start, end) character span."""
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc = tokenizer(texts, add_special_tokens=False, verbose=False)
        return enc["input_ids"], [None] * len(texts)


def write_chunk_db(directory: str | Path, records: ChunkRecords, docs: Sequence[Document], info: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "tokens.npy", records.tokens)
    np.save(d / "doc.npy", records.doc)
    np.save(d / "pos.npy", records.pos)
    encoded = [t.encode("utf-8") for t in records.texts]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    with open(d / "text.bin", "wb") as f:
        for b in encoded:
            f.write(b)
    np.save(d / "text_offsets.npy", offsets)
    with open(d / "documents.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "title": doc.title}, ensure_ascii=False) + "\n")
    write_json_atomic(d / "info.json", {**info, "num_chunks": int(len(records.tokens)), "num_documents": len(docs),
                                        "empty_documents": records.empty_documents,
                                        "chunk_size": int(records.tokens.shape[1])})


class ChunkDB:
    """Read-only view of a `chunks/` directory (memory-mapped; opening is cheap)."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        info_path = d / "info.json"
        if not info_path.exists():
            raise FileNotFoundError(f"{d}: no info.json, the chunk database was not finished")
        self.info = json.loads(info_path.read_text())
        self.tokens = np.load(d / "tokens.npy", mmap_mode="r")  # (N, m) int32
        self.doc = np.load(d / "doc.npy", mmap_mode="r")  # (N,) int64
        self.pos = np.load(d / "pos.npy", mmap_mode="r")  # (N,) int32
        self._text_offsets = np.load(d / "text_offsets.npy")
        self._text = np.memmap(d / "text.bin", dtype=np.uint8, mode="r") if self._text_offsets[-1] > 0 else b""
        with open(d / "documents.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        self.doc_ids = [r["id"] for r in rows]
        self.titles = [r["title"] for r in rows]
        self._doc_index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def chunk_size(self) -> int:
        return int(self.tokens.shape[1])

    def doc_index(self, doc_id: str) -> int:
        if self._doc_index is None:
            self._doc_index = {d: i for i, d in enumerate(self.doc_ids)}
        if doc_id not in self._doc_index:
            raise KeyError(f"document id {doc_id!r} is not in this index")
        return self._doc_index[doc_id]

    def text(self, chunk_id: int) -> str:
        lo, hi = self._text_offsets[chunk_id], self._text_offsets[chunk_id + 1]
        return bytes(self._text[lo:hi]).decode("utf-8")

    def has_continuation(self, chunk_ids: np.ndarray) -> np.ndarray:
        nxt = np.minimum(chunk_ids + 1, len(self) - 1)
        return (chunk_ids >= 0) & (chunk_ids + 1 < len(self)) & (self.doc[nxt] == self.doc[np.maximum(chunk_ids, 0)])

    def neighbour_tokens(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Chunk + continuation tokens for any array of chunk ids (-1 = missing): (...,) -> (..., 2m) int64."""
        ids = np.asarray(chunk_ids, np.int64)
        flat = ids.reshape(-1)
        m = self.chunk_size
        out = np.full((len(flat), 2 * m), PAD, np.int64)
        present = flat >= 0
        out[present, :m] = self.tokens[flat[present]]
        cont = self.has_continuation(flat)
        out[cont, m:] = self.tokens[flat[cont] + 1]
        return out.reshape(*ids.shape, 2 * m)

    def neighbour_text(self, chunk_id: int) -> str:
        """The text RETRO sees as tokens: the chunk's text followed by its continuation's text ('' if missing)."""
        if chunk_id < 0:
            return ""
        cont = self.text(chunk_id + 1) if self.has_continuation(np.array([chunk_id]))[0] else ""
        return self.text(chunk_id) + cont

    def embedding_text(self, chunk_id: int, with_title: bool) -> str:
        title = self.titles[self.doc[chunk_id]] if with_title else ""
        return f"{title}\n{self.text(chunk_id)}" if title else self.text(chunk_id)
