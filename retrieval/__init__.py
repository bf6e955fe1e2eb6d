"""Retrieval: corpus -> RETRO chunk database -> embeddings -> FAISS index -> neighbours (and their evaluation).

Knows only text, tokens and vectors: callers pass a decoder tokenizer and a SentenceTransformer. Command line:
`python -m retrieval --help`.
"""
from .build import BuildConfig, BuildLockedError, BuildSettingsError, build_index, is_index
from .chunks import PAD, ChunkDB, chunk_documents
from .corpus import CorpusError, CorpusSpec, Document, load_corpus, read_beir, read_jsonl, read_txt_folder
from .document import DocumentIndex
from .embed import EmbeddingStateError
from .evaluation import evaluate_beir, evaluate_qa, has_answer, normalize_answer
from .index import IndexConfig, choose_factory
from .integrity import IntegrityError
from .manifest import IncompleteIndexError, IndexCorruptError, IndexMismatchError
from .precompute import PrecomputedNeighbours, precompute_neighbours
from .retriever import Retriever, SearchResult

__all__ = [
    "BuildConfig", "BuildLockedError", "BuildSettingsError", "ChunkDB", "CorpusError", "CorpusSpec", "Document",
    "DocumentIndex",
    "EmbeddingStateError", "IncompleteIndexError", "IndexConfig", "IndexCorruptError", "IndexMismatchError",
    "IntegrityError", "PAD", "PrecomputedNeighbours", "Retriever",
    "SearchResult", "build_index", "choose_factory", "chunk_documents", "evaluate_beir", "evaluate_qa", "has_answer",
    "is_index", "load_corpus", "normalize_answer", "precompute_neighbours", "read_beir", "read_jsonl",
    "read_txt_folder",
]
