"""Lexical retrieval: the chunk database of an index -> a BM25 index (bm25s) over the same chunks and chunk ids.

Stored beside the dense index in `bm25/` of the same index directory:
  bm25/index/      the bm25s sparse score matrix and vocabulary (`BM25.save`), memory-mapped on load
  bm25/manifest.json  written last and atomically: the BM25 parameters, the text analysis and the identity of
                   the chunk database it indexes; without it there is no BM25 index (a rerun rebuilds it)
A chunk is indexed as the dense embedder sees it ("title\\nchunk text" when the corpus has titles), analysed as
lower-case words of two or more characters, English stop words removed, Snowball-stemmed. Scores are Lucene's
BM25: sum over query terms t of idf(t) * tf / (tf + k1 (1 - b + b |d| / avgdl)), idf = ln(1 + (N - df + .5) /
(df + .5)), with bm25s's defaults replaced by Elasticsearch's k1 = 1.2, b = 0.75 (BEIR's BM25 baseline).
"""
from __future__ import annotations

import shlex
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .chunks import ChunkDB
from .integrity import files_under
from .manifest import (FORMAT_VERSION, LEXICAL_DIR, MANIFEST, IncompleteIndexError, IndexMismatchError,
                       lexical_command, read_manifest, write_manifest)


@dataclass
class LexicalConfig:
    k1: float = 1.2  # BM25 term-frequency saturation
    b: float = 0.75  # BM25 document-length normalisation
    method: str = "lucene"  # bm25s variant: lucene, robertson, atire, bm25l, bm25+
    stemmer: str | None = "english"  # a PyStemmer language, or None
    stopwords: str | None = "en"  # a bm25s stop-word list name, or None
    with_title: bool = True  # index "title\nchunk", as the embedder sees it

    def __post_init__(self):
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")
        if self.method not in ("lucene", "robertson", "atire", "bm25l", "bm25+"):
            raise ValueError(f"BM25 method {self.method!r} is unknown; choose lucene, robertson, atire, bm25l, bm25+")


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    try:
        return Stemmer.Stemmer(language)
    except KeyError:
        raise ValueError(f"no Snowball stemmer for {language!r}; choose one of {Stemmer.algorithms()}") from None


class Analyzer:
    """Text -> list of terms, the same for chunks and queries."""

    def __init__(self, stemmer: str | None, stopwords: str | None):
        import bm25s.tokenization

        self._tok = bm25s.tokenization.Tokenizer(lower=True, stopwords=stopwords or [], stemmer=_stemmer(stemmer))

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        self._tok.reset_vocab()  # terms are returned as strings; the ids bm25s assigns are not used
        return self._tok.tokenize(list(texts), update_vocab=True, return_as="string", show_progress=False)


def chunk_identity(db: ChunkDB) -> dict:
    """What makes two chunk databases the same chunks with the same ids."""
    info = db.info
    return {"corpus_hash": info.get("corpus_hash"), "tokenizer": (info.get("tokenizer") or {}).get("fingerprint"),
            "chunk_size": db.chunk_size, "num_chunks": len(db)}


def build_lexical(index_dir: str | Path, config: LexicalConfig | None = None, *, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Index every chunk of `index_dir/chunks` with BM25 into `index_dir/bm25/`; returns its manifest. A finished
    BM25 index with the same settings is reused; one with other settings is refused unless `overwrite`."""
    import bm25s

    cfg = config or LexicalConfig()
    d = Path(index_dir)
    out = d / LEXICAL_DIR
    db = ChunkDB(d / "chunks")
    settings = {"params": asdict(cfg), "chunks": chunk_identity(db)}
    if (out / MANIFEST).exists() and not overwrite:
        man = read_manifest(out, kind="bm25")
        if {k: man.get(k) for k in settings} == settings:
            return man
        raise IndexMismatchError(f"{out} holds a BM25 index with other settings ({man['params']}); pass "
                                 f"--overwrite to rebuild it")
    if out.exists():  # an unfinished build (no manifest) or --overwrite: BM25 indexing is one step, redo it
        shutil.rmtree(out)
    out.mkdir(parents=True)
    analyse = Analyzer(cfg.stemmer, cfg.stopwords)
    terms: list[list[str]] = []
    step = 8192
    for lo in range(0, len(db), step):
        terms.extend(analyse([db.embedding_text(i, cfg.with_title) for i in range(lo, min(len(db), lo + step))]))
    model = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    model.index(terms, show_progress=progress)
    model.save(str(out / "index"))
    manifest = {"kind": "bm25", "format_version": FORMAT_VERSION, **settings,
                "vocabulary": len(model.vocab_dict), "num_chunks": len(db)}
    # with the size and checksum of its files, so a damaged BM25 index is found and rebuilt on its own
    return write_manifest(out, manifest, files_under(out, exclude=(MANIFEST,)))


def has_lexical(index_dir: str | Path) -> bool:
    return (Path(index_dir) / LEXICAL_DIR / MANIFEST).exists()


class LexicalIndex:
    """BM25 search over the chunks of one index directory; chunk ids are the dense index's ids."""

    def __init__(self, directory: Path, manifest: dict, model):
        self.directory, self.manifest, self.model = directory, manifest, model
        p = manifest["params"]
        self.analyse = Analyzer(p["stemmer"], p["stopwords"])
        self.num_chunks = int(manifest["num_chunks"])

    @classmethod
    def load(cls, index_dir: str | Path, db: ChunkDB | None = None) -> "LexicalIndex":
        import bm25s

        d = Path(index_dir)
        out = d / LEXICAL_DIR
        try:
            man = read_manifest(out, kind="bm25")
        except IncompleteIndexError:
            raise IncompleteIndexError(f"{d} has no finished BM25 index: add one with `python -m retrieval lexical "
                                       f"--index {shlex.quote(str(d))}` (or build with --retriever bm25 / hybrid)") from None
        db = db or ChunkDB(d / "chunks")
        if man["chunks"] != chunk_identity(db):
            raise IndexMismatchError(f"{out} indexes other chunks than {d / 'chunks'} (built before the chunk "
                                     f"database changed); rebuild it with `{lexical_command(d)}`")
        model = bm25s.BM25.load(str(out / "index"), mmap=True)
        return cls(out, man, model)

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(N,) query texts -> scores (N, k) float32 (-inf where missing), ids (N, k) int64 (-1 where missing).
        Chunks sharing no term with the query are not returned."""
        k = int(min(k, self.num_chunks))
        scores = np.full((len(texts), k), -np.inf, np.float32)
        ids = np.full((len(texts), k), -1, np.int64)
        vocab = self.model.vocab_dict
        queries = [[t for t in q if t and t in vocab] for q in self.analyse(texts)]
        rows = [r for r, q in enumerate(queries) if q]
        if rows and k > 0:
            got_ids, got_scores = self.model.retrieve([queries[r] for r in rows], k=k, show_progress=False,
                                                      n_threads=0)
            for r, i_row, s_row in zip(rows, got_ids, got_scores):
                keep = s_row > 0
                n = int(keep.sum())
                ids[r, :n], scores[r, :n] = i_row[keep], s_row[keep]
        return scores, ids

    def scores(self, text: str) -> np.ndarray:
        """BM25 score of every chunk for one query: (num_chunks,) float32."""
        q = [t for t in self.analyse([text])[0] if t and t in self.model.vocab_dict]
        if not q:
            return np.zeros(self.num_chunks, np.float32)
        return np.asarray(self.model.get_scores(q), np.float32)
