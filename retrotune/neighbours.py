"""Stage 2, index and neighbours: a run's task examples -> records that both models read (prompt, answer, neighbour
tokens for RETRO and the text of exactly the same chunks for the GPT baseline).

Two kinds of retrieval, by task: `corpus` tasks search the run's index (one search per question, stored once per
run under `neighbours/` and reused); `document` tasks search the chunks of the example's own document
(`retrieval.DocumentIndex`: chunked with the decoder's tokenizer at the run's chunk size and embedded with the run's
embedder, as the index is; each document cached once under `neighbours/documents/`).
Legend: N examples, K neighbours, R neighbour length (2m), m chunk size.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrotune.config import RunConfig
from retrotune.models import load_embedder
from retrotune.qa import QAExample


def open_index(config: RunConfig, tokenizer, embedder=None):
    """The run's corpus index, refused if it was built with another tokenizer (or chunk size, for RETRO)."""
    from retrieval import Retriever, is_index
    from retrieval.manifest import build_command
    from retrotune.preflight import shipped_corpus

    if not is_index(config.index):
        raise FileNotFoundError(f"{config.index} is not a finished index (no valid manifest.json). Build it with: "
                                f"{build_command(shipped_corpus(config.index), config.index)}")
    chunk_size = config.retro.get("chunk_size") if config.model == "retro" else None
    if embedder is None and config.retriever != "bm25":
        embedder = load_embedder(config.embedder)
    return Retriever.load(config.index, tokenizer=tokenizer, chunk_size=chunk_size, embedder=embedder,
                          retriever=config.retriever)


def open_documents(config: RunConfig, tokenizer, embedder=None):
    """Document-scoped retrieval at the run's chunk size, with the run's embedder (and the index's encoding, when
    the run names an index that exists)."""
    from retrieval import DocumentIndex, is_index
    from retrieval.encoders import Encoding
    from retrieval.manifest import read_manifest

    encoding, with_title = None, True
    if config.index and is_index(config.index):
        manifest = read_manifest(config.index)
        encoding, with_title = Encoding.from_manifest(manifest), bool(manifest.get("with_title", True))
    return DocumentIndex(tokenizer, embedder if embedder is not None else load_embedder(config.embedder),
                         config.retro.get("chunk_size", 64), Path(neighbours_cache(config)) / "documents",
                         encoding=encoding, with_title=with_title)


def open_retrieval(config: RunConfig, task, tokenizer):
    return open_documents(config, tokenizer) if task.retrieval == "document" else open_index(config, tokenizer)


def neighbours_cache(config: RunConfig) -> Path:
    return Path(config.neighbours_cache or Path(config.output_dir) / "neighbours")


def index_hash(retriever) -> str:
    """What the neighbours depend on: the index manifest and how it is searched, or a document index's settings."""
    if not hasattr(retriever, "directory"):  # DocumentIndex
        return hashlib.sha256(retriever._settings.encode()).hexdigest()[:16]
    data = (Path(retriever.directory) / "manifest.json").read_bytes()
    how = retriever.describe() if hasattr(retriever, "describe") else {"kind": "dense"}
    if how != {"kind": "dense"}:  # the same index searched another way gives other neighbours
        data += json.dumps(how, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def retrieval_identity(retriever) -> dict:
    """What a checkpoint needs of the neighbours it reads (tokenizer, chunk size, neighbour length), and which
    corpus they came from."""
    from retrieval.manifest import tokenizer_fingerprint

    if hasattr(retriever, "directory"):
        corpus, tokenizer = str(retriever.directory), retriever.manifest["tokenizer"]["fingerprint"]
    else:
        corpus, tokenizer = "document-scoped", tokenizer_fingerprint(retriever.tokenizer)
    return {"corpus": corpus, "index_hash": index_hash(retriever), "tokenizer": tokenizer,
            "chunk_size": retriever.chunk_size, "neighbour_length": retriever.neighbour_length}


@dataclass
class Neighbours:
    ids: np.ndarray  # (N, K) chunk ids, -1 where missing
    tokens: np.ndarray  # (N, K, R) RETRO's view, -1 padded
    texts: list[list[str]]  # (N, K) the GPT baseline's view of the same chunks


def question_neighbours(retriever, examples: list[QAExample], k: int, cache_dir: Path) -> Neighbours:
    """Top-k corpus chunks for each question (the question is the query), stored under `cache_dir` and reused."""
    from retrieval import IncompleteIndexError, IndexCorruptError, PrecomputedNeighbours, precompute_neighbours

    questions = [e.question for e in examples]
    key = hashlib.sha256(json.dumps([index_hash(retriever), k, questions]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / key
    try:
        store = PrecomputedNeighbours.load(path)
    except (IncompleteIndexError, IndexCorruptError) as error:
        if isinstance(error, IndexCorruptError):  # a cache: say so, and compute it again
            print(f"warning: {error}; recomputing these neighbours", file=sys.stderr)
        store = precompute_neighbours(retriever, questions, path, k, chunked=False)
    ids = np.asarray(store.ids)
    texts = [[retriever.db.neighbour_text(int(i)) if i >= 0 else "" for i in row] for row in ids]
    return Neighbours(ids=ids, tokens=np.asarray(store.tokens).astype(np.int64), texts=texts)


def document_neighbours(documents, examples: list[QAExample], k: int) -> Neighbours:
    """Top-k chunks of each example's own document for its question (never another document's)."""
    from retrieval import Document

    N, R = len(examples), documents.neighbour_length
    ids, tokens, texts = np.full((N, k), -1, np.int64), np.full((N, k, R), -1, np.int64), [[] for _ in examples]
    by_document: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        if e.document is None:
            raise ValueError(f"example {e.id}: no document to retrieve from; a document-scoped task needs each "
                             f"example's document text")
        by_document.setdefault(e.document_id or e.group, []).append(i)
    for doc_id, rows in by_document.items():
        first = examples[rows[0]]
        found = documents.search(Document(doc_id, first.document_title, first.document),
                                 [examples[i].question for i in rows], k)
        for j, i in enumerate(rows):
            ids[i], tokens[i], texts[i] = found.ids[j], found.tokens[j], found.texts[j]
    return Neighbours(ids=ids, tokens=tokens, texts=texts)


def records(task, examples: list[QAExample], neighbours: Neighbours, with_answers: bool) -> list[dict]:
    """What the QA contract encodes: the task's prompt, neighbour tokens and texts, the gold answers and (for
    training) the answer the model learns to give; multiple choice also carries its options and label."""
    out = []
    for i, e in enumerate(examples):
        record = {"id": e.id, "question": e.question, "prompt": task.prompt(e), "answers": list(e.answers),
                  "group": e.group, "neighbour_tokens": neighbours.tokens[i], "neighbour_texts": neighbours.texts[i]}
        if e.options:
            record.update(options=list(e.options), label=e.label)
        if with_answers:
            record["answer"] = task.answer(e)
        out.append(record)
    return out


def attach(config: RunConfig, task, retriever, examples: list[QAExample], with_answers: bool = True,
           cache_dir: Path | None = None) -> list[dict]:
    """Examples -> records with their neighbours, by the task's kind of retrieval."""
    if task.retrieval == "document":
        found = document_neighbours(retriever, examples, config.neighbours)
    else:
        found = question_neighbours(retriever, examples, config.neighbours, cache_dir or neighbours_cache(config))
    return records(task, examples, found, with_answers)
