"""Embedding: a ChunkDB + a SentenceTransformer -> L2-normalised float32 vectors in resumable shards.

Shard s holds the vectors of chunks [s * shard_size, (s + 1) * shard_size) in `embeddings/shard_SSSSS.npy`, each
written through a temporary file and `os.replace`, so after an interruption every shard on disk is whole and a
rerun embeds only the missing ones. Inside a shard, every group of `batch_size * 4` chunks (`* 16` with a
multi-process pool) is saved as soon as it is embedded (`embeddings/partial/SSSSS_OFFSET.npy`), so an interrupted
build loses at most one group, whatever the size of the corpus or of its shards; the groups of a shard are
joined into the shard file when the last one is done. `embeddings/state.json` pins what the shards were made
from; a rerun with a different embedder, chunk database or shard size is refused instead of mixing vectors.

What gets embedded for a chunk: its text, prefixed with its document's title and a newline when the corpus has
titles and `with_title` is on (BEIR's convention for title + text; a 64-token chunk often lacks the subject that
the title names). Queries are embedded as they are.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .chunks import ChunkDB
from .distributed import SINGLE, Ranks
from .manifest import check_or_record


class EmbeddingStateError(RuntimeError):
    """Shards on disk were made with other settings; resuming would mix incompatible vectors."""


def encode_texts(embedder, texts: Sequence[str], batch_size: int = 64, pool=None,
                 normalize: bool = True) -> np.ndarray:
    """(N,) texts -> (N, D) float32, L2-normalised (inner product = cosine) unless `normalize` is False."""
    if not texts:
        return np.zeros((0, _dim(embedder)), np.float32)
    vecs = embedder.encode(list(texts), batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                           normalize_embeddings=normalize, pool=pool)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def _dim(embedder) -> int:
    getter = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(getter())


def default_devices() -> list[str] | None:
    """Several CUDA devices -> one worker process each; otherwise None (encode in this process)."""
    import torch

    n = torch.cuda.device_count()
    return [f"cuda:{i}" for i in range(n)] if n > 1 else None


def shard_path(directory: Path, s: int) -> Path:
    return directory / f"shard_{s:05d}.npy"


def group_size(batch_size: int, pool) -> int:
    """Chunks embedded between two saves: the unit of resumption."""
    return batch_size * (16 if pool is not None else 4)


def embed_chunk_db(db: ChunkDB, embedder, directory: str | Path, *, state: dict, shard_size: int = 8192,
                   batch_size: int = 64, with_title: bool = True, devices: list[str] | None = None,
                   progress: bool = True, encode: Callable | None = None, ranks: Ranks = SINGLE) -> int:
    """Embed every chunk of `db` into shards under `directory`, skipping shards and groups already there. Returns
    the number of chunks encoded in this call. `state` identifies the inputs (embedder and chunk fingerprints).
    With several `ranks` (distributed.py) each embeds the shards s with s % world == rank."""
    d = Path(directory)
    state = {**state, "shard_size": shard_size, "with_title": with_title, "num_chunks": len(db)}
    ranks.main_first(lambda: check_or_record(d / "state.json", state, EmbeddingStateError,
                                             "pass --overwrite (overwrite=True) to rebuild the embeddings from "
                                             "scratch"))

    n_shards = (len(db) + shard_size - 1) // shard_size
    todo = [s for s in ranks.mine(list(range(n_shards))) if not shard_path(d, s).exists()]
    encode = encode or encode_texts
    pool = embedder.start_multi_process_pool(devices) if devices else None
    group = group_size(batch_size, pool)
    partial = d / "partial"
    saved = {p.name for p in partial.glob("[0-9]*_[0-9]*.npy")} if partial.is_dir() else set()
    mine = sum(min(shard_size, len(db) - s * shard_size) for s in ranks.mine(list(range(n_shards))))
    done_chunks = mine - sum(min(shard_size, len(db) - s * shard_size) for s in todo)
    for s in todo:
        lo, hi = s * shard_size, min(len(db), (s + 1) * shard_size)
        done_chunks += sum(min(group, hi - g) for g in range(lo, hi, group) if _group_name(s, g - lo) in saved)
    bar = tqdm(total=mine, initial=done_chunks, desc="embedding", unit="chunk", disable=not progress)
    encoded = 0
    try:
        for s in todo:
            if shard_path(d, s).exists():  # finished meanwhile by another worker on the same directory
                continue
            encoded += embed_shard(db, embedder, d, s, shard_size, batch_size, with_title, encode, pool, bar.update)
    finally:
        bar.close()
        if pool is not None:
            embedder.stop_multi_process_pool(pool)
    ranks.barrier()  # every rank's shards are written
    if ranks.main and partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return encoded


def _group_name(s: int, offset: int) -> str:
    return f"{s:05d}_{offset:09d}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def embed_shard(db: ChunkDB, embedder, d: Path, s: int, shard_size: int, batch_size: int, with_title: bool,
                encode: Callable = encode_texts, pool=None, advance: Callable[[int], object] = lambda n: None) -> int:
    """Embed shard `s` of `db` group by group (each group saved as it is done, groups found on disk reused) and
    write it atomically to `d`. Returns the number of chunks encoded in this call."""
    lo, hi = s * shard_size, min(len(db), (s + 1) * shard_size)
    dim = _dim(embedder)
    group = group_size(batch_size, pool)
    partial = d / "partial"
    partial.mkdir(exist_ok=True)
    parts, encoded = [], 0
    for g in range(lo, hi, group):
        path = partial / _group_name(s, g - lo)
        n = min(group, hi - g)
        if path.exists():
            vecs = np.load(path)
            if vecs.shape != (n, dim):  # a group of another layout: embed it again
                path.unlink()
        if not path.exists():
            texts = [db.embedding_text(i, with_title) for i in range(g, g + n)]
            # length-sorted texts keep padding low (as encode does)
            order = np.argsort([-len(t) for t in texts], kind="stable")
            vecs = np.empty((n, dim), np.float32)
            vecs[order] = encode(embedder, [texts[i] for i in order], batch_size=batch_size, pool=pool)
            _save_atomic(path, vecs)
            encoded += n
            advance(n)
        parts.append(path)
    out = np.concatenate([np.load(p) for p in parts]) if parts else np.zeros((0, dim), np.float32)
    _save_atomic(shard_path(d, s), out)
    for p in partial.glob(f"{s:05d}_*.npy"):  # this shard's groups (of any group size)
        p.unlink(missing_ok=True)
    return encoded


def load_embeddings(directory: str | Path, num_chunks: int, shard_size: int | None = None) -> np.ndarray:
    """All shards concatenated: (N, D) float32."""
    d = Path(directory)
    if shard_size:
        shards = [shard_path(d, s) for s in range((num_chunks + shard_size - 1) // shard_size)]
        shards = [p for p in shards if p.exists()]
    else:
        shards = sorted(p for p in d.glob("shard_[0-9][0-9][0-9][0-9][0-9].npy"))
    if not shards:
        vecs = np.zeros((0, 0), np.float32)
    else:  # filled shard by shard from memory maps: one copy of the vectors in memory, not a list and its concatenation
        maps = [np.load(p, mmap_mode="r") for p in shards]
        vecs = np.empty((sum(len(x) for x in maps), maps[0].shape[1]), np.float32)
        lo = 0
        for x in maps:
            vecs[lo:lo + len(x)] = x
            lo += len(x)
    if len(vecs) != num_chunks:
        raise EmbeddingStateError(f"{d}: shards hold {len(vecs)} vectors but the chunk database has {num_chunks}; "
                                  f"rerun the build to finish embedding")
    return vecs
