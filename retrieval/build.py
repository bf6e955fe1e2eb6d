"""Index build: Documents + decoder tokenizer + SentenceTransformer -> an index directory `indexes/NAME/`.

  chunks/       chunk database (see chunks.py)
  embeddings/   resumable shards of normalised chunk vectors (see embed.py)
  index.faiss   the FAISS index over all chunk vectors (+ index.ivfdata when its inverted lists live on disk)
  bm25/         optional BM25 index over the same chunks (see lexical.py)
  build.json    the settings of a build in progress (a rerun with other settings is refused, not mixed)
  manifest.json written last and atomically; without it the directory is not an index. It records the size and
                checksum of every other file (see integrity.py), checked when the index is opened.
Beside the directory, `.NAME.lock` is held while a build runs and removed when it ends: a second build of the same
directory waits for it (`wait_for_lock`) or is refused with a message naming the running one.

Rerunning an interrupted build with the same settings resumes it: a finished chunk database and every embedded
group of `batch_size * 4` chunks are reused (see embed.py), whatever the size of the corpus.

Under torchrun the ranks share one build (distributed.py): rank 0 holds the lock, chunks and writes the manifest;
the embedding shards and the parts of an on-disk index are split between the ranks.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import faiss

from .chunks import ChunkDB, chunk_documents, write_chunk_db
from .corpus import CorpusError, Document, corpus_hash
from .distributed import SINGLE, Ranks, ranks_from_env
from .embed import default_devices, embed_chunk_db, load_embeddings
from .encoders import document_encode_fn, is_default, resolve_encoding
from .index import IndexConfig, build_faiss_index, plan_index
from .integrity import files_under, stamp_verified
from .lexical import LexicalConfig, build_lexical
from .manifest import (FORMAT_VERSION, MANIFEST, IncompleteIndexError, check_or_record, embedder_dimension,
                       embedder_fingerprint, embedder_name, read_manifest, tokenizer_fingerprint, tokenizer_name,
                       write_manifest)


class BuildSettingsError(RuntimeError):
    """The directory holds a finished index or a partial build with other settings."""


class BuildLockedError(BuildSettingsError):
    """Another process is building the same directory."""


def lock_path(directory: str | Path) -> Path:
    d = Path(directory)
    return d.parent / f".{d.name}.lock"


@contextmanager
def build_lock(directory: str | Path, wait: float = 0.0):
    """Hold the build lock of `directory` (a file beside it, so --overwrite can delete the directory). `wait`:
    seconds to wait for another build to finish, negative = forever; then BuildLockedError. The lock file is
    removed when the build ends, failed or not (see `_acquire`)."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = path.with_name(path.name + ".owner")
    fd = _acquire(path, wait)
    if fd is None:
        try:
            who = owner.read_text().strip()
        except OSError:
            who = "another process"
        raise BuildLockedError(f"{directory} is being built by {who} (lock {path}); wait for that build to finish "
                               f"(or pass --wait to wait for it), then rerun: a finished index is reported, an "
                               f"interrupted one resumes")
    try:
        owner.write_text(f"process {os.getpid()} on {os.uname().nodename} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        yield
    finally:
        owner.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # while still held: a waiter then finds its file gone and opens a new one
        os.close(fd)  # releases the lock


def _acquire(path: Path, wait: float) -> int | None:
    """An open descriptor of `path` holding an exclusive flock, or None after `wait` seconds (< 0: no limit).
    The holder deletes the file before it lets go, so a lock taken on a file that is no longer at `path` is
    dropped and taken again on the new file: two builds never both hold a lock."""
    import fcntl

    deadline = None if wait < 0 else time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            continue
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the previous holder removed this file as it finished: lock the one now at `path`


@dataclass
class BuildConfig:
    chunk_size: int = 64  # decoder tokens per chunk (RETRO's m); a neighbour is 2m tokens
    batch_size: int = 64  # embedder batch size
    shard_size: int = 8192  # chunks per embedding shard: the unit of resumption
    with_title: bool = True  # embed "title\nchunk text" when documents have titles
    index: IndexConfig = field(default_factory=IndexConfig)  # how the FAISS index is chosen, trained and searched
    devices: list[str] | None = None  # embedding worker devices; None: every GPU if more than one, else in-process
    overwrite: bool = False  # delete a finished index or a partial build with other settings first
    wait_for_lock: float = 0.0  # seconds to wait while another build holds the directory (< 0: forever)
    lexical: LexicalConfig | None = None  # also build a BM25 index over the same chunks (bm25/)
    query_prompt: str | None = None  # prepended to queries; None: the query encoder's own prompt ('' if none)
    document_prompt: str | None = None  # prepended to chunks; None: the embedder's own document prompt
    normalize: bool | None = None  # L2-normalise vectors; None: as the embedder's own config does

    def __post_init__(self):
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}")
        if self.batch_size <= 0 or self.shard_size <= 0:
            raise ValueError(f"batch_size and shard_size must be positive, got {self.batch_size}, {self.shard_size}")
        if isinstance(self.index, dict):
            self.index = IndexConfig(**self.index)
        if isinstance(self.lexical, dict):
            self.lexical = LexicalConfig(**self.lexical)


def build_index(docs: Sequence[Document], directory: str | Path, *, tokenizer, embedder,
                config: BuildConfig | None = None, tokenizer_alias: str | None = None,
                embedder_alias: str | None = None, progress: bool = True, source: str | None = None,
                query_embedder=None, query_embedder_alias: str | None = None) -> dict:
    """Build (or resume) an index of `docs` in `directory`; returns the manifest. The aliases are the names the
    CLI resolved (e.g. 'smollm2-135m'), recorded so `search`/`eval` can load the same models again; `source` (the
    corpus path) is recorded to name the rebuild command in error messages. `query_embedder`: a separate query
    encoder (DPR, Dragon+); `embedder` then encodes the documents."""
    cfg = config or BuildConfig()
    ranks = ranks_from_env()
    if not ranks.main:  # rank 0 holds the lock for the whole group
        return _build_locked(docs, Path(directory), tokenizer, embedder, cfg, tokenizer_alias, embedder_alias,
                             False, source, query_embedder, query_embedder_alias, ranks)  # bars: rank 0's
    with build_lock(directory, cfg.wait_for_lock):
        return _build_locked(docs, Path(directory), tokenizer, embedder, cfg, tokenizer_alias, embedder_alias,
                             progress, source, query_embedder, query_embedder_alias, ranks)


def _build_locked(docs, d: Path, tokenizer, embedder, cfg: BuildConfig, tokenizer_alias, embedder_alias, progress,
                  source, query_embedder=None, query_embedder_alias=None, ranks: Ranks = SINGLE) -> dict:
    if ranks.main and cfg.overwrite and d.exists():
        shutil.rmtree(d)
    ranks.barrier()
    if (d / MANIFEST).exists():
        raise BuildSettingsError(f"{d} already holds a finished index; pass --overwrite (overwrite=True) to "
                                 f"rebuild it, or pick another name")
    if not docs:
        raise CorpusError("the corpus is empty: nothing to index")
    started = time.time()
    settings = {
        "corpus_hash": corpus_hash(docs), "num_documents": len(docs), "chunk_size": cfg.chunk_size,
        "tokenizer": {"name": tokenizer_alias or tokenizer_name(tokenizer),
                      "fingerprint": tokenizer_fingerprint(tokenizer)},
        "embedder": {"name": embedder_alias or embedder_name(embedder), "fingerprint": embedder_fingerprint(embedder),
                     "dimension": embedder_dimension(embedder)},
        "with_title": cfg.with_title, "shard_size": cfg.shard_size,
    }
    encoding = resolve_encoding(embedder, query_embedder, query_prompt=cfg.query_prompt,
                                document_prompt=cfg.document_prompt, normalize=cfg.normalize)
    query_record = settings["embedder"] if query_embedder is None else {
        "name": query_embedder_alias or embedder_name(query_embedder),
        "fingerprint": embedder_fingerprint(query_embedder), "dimension": embedder_dimension(query_embedder)}
    if query_record["dimension"] != settings["embedder"]["dimension"]:
        raise ValueError(f"the query encoder gives {query_record['dimension']}-d vectors and the document encoder "
                         f"{settings['embedder']['dimension']}-d; they must match")
    if not is_default(encoding, query_embedder is not None):  # recorded only when it differs from older builds
        settings["encoding"] = {**encoding.to_dict(), "query_encoder": query_record["fingerprint"]}
    records = None
    if ranks.main and not (d / "chunks" / "info.json").exists():
        # chunk before anything is written: a corpus that yields no chunk leaves no folder behind
        records = chunk_documents(docs, tokenizer, cfg.chunk_size, progress=progress)
    if ranks.main and (d / "build.json").exists() and not any((d / sub).exists() for sub in ("chunks", "embeddings")):
        (d / "build.json").unlink()  # a record of settings without any work done: nothing to protect
    def write_chunks():
        if records is not None:
            write_chunk_db(d / "chunks", records, docs, {"corpus_hash": settings["corpus_hash"],
                                                        "tokenizer": settings["tokenizer"]})

    # after the barrier the chunk database is complete
    ranks.main_first(lambda: check_or_record(d / "build.json", settings, BuildSettingsError,
                                             "rerun with the original settings to resume, or pass --overwrite"),
                     then=write_chunks)
    del records
    db = ChunkDB(d / "chunks")
    encoded = embed_chunk_db(db, embedder, d / "embeddings", shard_size=cfg.shard_size, batch_size=cfg.batch_size,
                   with_title=cfg.with_title, progress=progress,
                   # under torchrun each rank embeds on its own device; otherwise a pool over every GPU
                   devices=cfg.devices if cfg.devices is not None else (default_devices() if ranks.world == 1
                                                                        else None),
                   state={"embedder": settings["embedder"]["fingerprint"], "corpus_hash": settings["corpus_hash"],
                          "tokenizer": settings["tokenizer"]["fingerprint"], "chunk_size": cfg.chunk_size,
                          **({"encoding": settings["encoding"]} if "encoding" in settings else {})},
                   encode=document_encode_fn(encoding), ranks=ranks)  # returns once every rank's shards are in
    if ranks.world > 1:
        print(f"rank {ranks.rank}/{ranks.world}: embedded {encoded} chunks", file=sys.stderr, flush=True)
    plan = plan_index(len(db), settings["embedder"]["dimension"], cfg.index)
    extra: dict = {}
    if plan.on_disk:  # the vectors exceed the memory budget: never hold them all, keep the lists on disk
        from .ondisk import build_ondisk_index

        factory, nprobe, refine, recall = build_ondisk_index(d, d / "embeddings", len(db), plan.factory,
                                                             cfg.index, progress=progress, shard_size=cfg.shard_size,
                                                             ranks=ranks)
        extra.update(on_disk=True, refine=refine)
        num_vectors = len(db)
    if not ranks.main:  # the in-memory index, BM25 and the manifest are rank 0's; wait for them
        ranks.barrier()
        return read_manifest(d)
    if not plan.on_disk:
        vectors = load_embeddings(d / "embeddings", len(db), cfg.shard_size)
        index, factory, nprobe, recall = build_faiss_index(vectors, cfg.index, progress=progress)
        if factory.startswith("HNSW"):
            extra["ef_search"] = int(faiss.downcast_index(index).hnsw.efSearch)
        tmp = d / "index.faiss.tmp"
        faiss.write_index(index, str(tmp))
        tmp.replace(d / "index.faiss")
        num_vectors = int(index.ntotal)
    if cfg.lexical is not None:
        extra["lexical"] = build_lexical(d, cfg.lexical, progress=progress)["params"]

    manifest = {
        "kind": "index", "format_version": FORMAT_VERSION, **settings,
        "factory": factory, "nprobe": nprobe, "tuned_recall_at_10": recall,
        "num_chunks": len(db), "num_vectors": num_vectors,
        "query_encoder": query_record, "encoding": encoding.to_dict(), **extra,
        "last_run_seconds": round(time.time() - started, 2),  # of the final run only, when a build was resumed
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"corpus": str(source)} if source else {}),
    }
    files = files_under(d, exclude=(MANIFEST, "build.json"))
    manifest = write_manifest(d, manifest, files)
    stamp_verified(d, files, manifest["files"])
    ranks.barrier()  # the other ranks read the manifest now
    return manifest


def is_index(directory: str | Path) -> bool:
    try:
        read_manifest(directory)
        return True
    except IncompleteIndexError:
        return False


__all__ = ["BuildConfig", "BuildLockedError", "BuildSettingsError", "build_index", "build_lock", "is_index"]
