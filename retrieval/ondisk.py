"""Indexes past memory: embedding shards on disk -> an IVF-PQ index whose inverted lists live on disk.

Chosen by `index.plan_index` when the float vectors exceed the memory budget. The vectors are never all in
memory: they are read shard by shard through memory maps.
  1. train the coarse quantizer and the PQ codebook (and OPQ rotation) on a sample -> ivf_parts/trained.index
  2. add runs of consecutive embedding shards to copies of the trained, empty index -> ivf_parts/part_PPPPP.lists
     (atomic; raw inverted lists, see `write_part`); a part holds the codes of at most an eighth of the budget (and
     1M vectors), read one shard at a time
  3. merge the parts' lists into index.ivfdata, the data file of a faiss OnDiskInvertedLists, and write index.faiss,
     which refers to index.ivfdata by name (opened with IO_FLAG_ONDISK_SAME_DIR). The merge reads the parts with
     pread and writes the data file with plain writes, one list at a time, so its memory is one list's codes, not
     the corpus's (faiss' `merge_ondisk` maps every part and the data file: twice the codes resident)
  4. tune nprobe, and the re-scoring depth, against exact search computed shard by shard
PQ codes alone cap recall well below exact search, so a search takes `refine` times more candidates than asked
and re-scores them with their full vectors, read from the embedding shards through memory maps (a few hundred
random reads a query, no vectors held in memory). Where more probes stop helping, the tuner doubles `refine` (up to
MAX_REFINE) until the recall target is met.
Each step's output is written atomically and skipped on a rerun, so an interrupted build resumes; the parts are
deleted once merged. A shard's memory map is dropped as soon as it has been read, so the build's resident memory
never holds the corpus (mapped pages count as resident while they stay mapped). Searching memory-maps index.ivfdata: memory holds the centroids, codebooks and the pages
of the lists probed, not the corpus.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from tqdm.auto import tqdm

from .distributed import SINGLE, Ranks
from .index import IndexConfig, _drop_self, make_index, recall_at_k, set_nprobe, set_quantizer_ef
from .manifest import check_or_record

IVFDATA = "index.ivfdata"
MAX_REFINE = 64  # re-scored candidates per result: 640 rows read back for a top-10
PART_MAX_VECTORS = 1_000_000  # vectors per part file
PART_MAGIC = b"RTIVFPT1"  # the first bytes of a part file (write_part)
PART_FIELDS = len(PART_MAGIC) + 16  # the magic, then nlist and the code size as int64


class OnDiskBuildError(RuntimeError):
    """ivf_parts/ holds work for another factory or other vectors."""


def shard_files(emb_dir: Path) -> list[Path]:
    return sorted(Path(emb_dir).glob("shard_[0-9]*.npy"))


def iter_shards(emb_dir: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(first chunk id, (n_s, D) float32 memory map) for each embedding shard, in order."""
    lo = 0
    for p in shard_files(emb_dir):
        x = np.load(p, mmap_mode="r")
        yield lo, x
        lo += len(x)


def sample_vectors(emb_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (sorted or not) of the concatenated shards, read through memory maps: (len(ids), D)."""
    ids = np.asarray(ids, np.int64)
    out = None
    for lo, x in iter_shards(emb_dir):
        sel = np.nonzero((ids >= lo) & (ids < lo + len(x)))[0]
        if out is None:
            out = np.empty((len(ids), x.shape[1]), np.float32)
        if len(sel):
            out[sel] = x[np.sort(ids[sel]) - lo][np.argsort(np.argsort(ids[sel]))]
    return out


def exact_knn(queries: np.ndarray, emb_dir: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over all shards, one shard in memory at a time: (scores, ids) (Q, k)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for lo, x in iter_shards(emb_dir):
        s, i = faiss.knn(queries, np.ascontiguousarray(x), min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([best_s, s], 1)
        all_i = np.concatenate([best_i, np.where(i >= 0, i + lo, -1)], 1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return best_s, best_i


def stored_vectors(emb_dir: Path, shard_size: int, ids: np.ndarray, cache: dict | None = None) -> np.ndarray:
    """Full vectors of chunk ids (any shape, -1 = missing -> zeros) from the embedding shards: (..., D).
    Rows are read with pread, not through memory maps: a mapped page (and the pages the kernel maps around it)
    would stay in the process's resident set, and a few hundred random rows a query would soon map gigabytes.
    `cache` keeps each shard's header (data offset, shape, dtype)."""
    cache = {} if cache is None else cache
    flat = np.asarray(ids, np.int64).reshape(-1)
    out = None
    for s in np.unique(flat[flat >= 0] // shard_size):
        path = Path(emb_dir) / f"shard_{s:05d}.npy"
        key = ("rows", int(s))
        if key not in cache:
            header = np.load(path, mmap_mode="r")  # the header only; the map is dropped at once
            if header.ndim != 2 or not header.flags.c_contiguous:
                raise ValueError(f"{path}: expected a C-ordered (rows, dim) array, got shape {header.shape}")
            cache[key] = (int(header.offset), header.shape, header.dtype)
            del header
        offset, shape, dtype = cache[key]
        if out is None:
            out = np.zeros((len(flat), shape[1]), np.float32)
        sel = np.nonzero((flat >= 0) & (flat // shard_size == s))[0]
        rows = flat[sel] - s * shard_size
        width = shape[1] * dtype.itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, row in zip(sel, rows):
                out[i] = np.frombuffer(os.pread(fd, width, offset + int(row) * width), dtype)
        finally:
            os.close(fd)
    if out is None:
        return np.zeros((*np.shape(ids), 0), np.float32)
    return out.reshape(*np.shape(ids), -1)


def refine_search(index, queries: np.ndarray, k: int, refine: int, vectors_of) -> tuple[np.ndarray, np.ndarray]:
    """Top `refine * k` by the compressed codes, re-scored exactly: (scores, ids) (Q, k), best first.
    `vectors_of(ids)` gives the full vectors of an id array."""
    s, ids = index.search(np.ascontiguousarray(queries, np.float32), k * max(1, refine))
    ids = ids.astype(np.int64)
    if refine > 1 and ids.size:
        exact = np.einsum("qd,qkd->qk", queries, vectors_of(ids))
        s = np.where(ids >= 0, exact, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")
        s, ids = np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)
    s, ids = s[:, :k], ids[:, :k]
    return np.where(ids >= 0, s, -np.inf).astype(np.float32), ids


def _write_atomic(path: Path, write) -> None:
    """`write(temporary path)`, then renamed onto `path`: the file is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_index_atomic(index, path: Path) -> None:
    _write_atomic(path, lambda tmp: faiss.write_index(index, str(tmp)))


def write_part(index, path: Path) -> None:
    """The inverted lists of an in-memory IVF index as one raw file: PART_MAGIC, nlist and code size (int64), the
    nlist list sizes (int64), then each non-empty list's codes followed by its ids (int64), in list order."""
    inv = faiss.extract_index_ivf(index).invlists
    nlist, code_size = int(inv.nlist), int(inv.code_size)
    sizes = np.array([inv.list_size(j) for j in range(nlist)], np.int64)
    with open(path, "wb") as f:
        f.write(PART_MAGIC)
        f.write(np.array([nlist, code_size], np.int64).tobytes())
        f.write(sizes.tobytes())
        for j in np.flatnonzero(sizes).tolist():
            n = int(sizes[j])
            f.write(memoryview(faiss.rev_swig_ptr(inv.get_codes(j), n * code_size)))
            f.write(memoryview(faiss.rev_swig_ptr(inv.get_ids(j), n)))


def part_header_bytes(nlist: int) -> int:
    """Where a part file's first list starts: after its fields and the nlist list sizes."""
    return PART_FIELDS + 8 * nlist


def read_part_sizes(path: Path, nlist: int, code_size: int) -> np.ndarray:
    """The list sizes (nlist,) of a part file, checked against the trained index and the file's length."""
    with open(path, "rb") as f:
        head = f.read(PART_FIELDS)
        sizes = np.frombuffer(f.read(8 * nlist), np.int64) if len(head) == PART_FIELDS else None
    fields = np.frombuffer(head[len(PART_MAGIC):], np.int64) if len(head) == PART_FIELDS else None
    if (fields is None or head[:len(PART_MAGIC)] != PART_MAGIC or fields.tolist() != [nlist, code_size]
            or len(sizes) != nlist or (sizes < 0).any()
            or Path(path).stat().st_size != part_header_bytes(nlist) + int(sizes.sum()) * (code_size + 8)):
        raise OnDiskBuildError(f"{path}: not a complete part of this index ({nlist} lists of {code_size}-byte "
                               f"codes); delete it and rerun the build to add it again")
    return sizes


def part_ranges(shard_rows: list[int], part_vectors: int) -> list[tuple[int, int]]:
    """Consecutive shards grouped into parts of at most `part_vectors` vectors (at least one shard each):
    [(first shard, end shard)]."""
    ranges, start, rows = [], 0, 0
    for s, m in enumerate(shard_rows):
        if s > start and rows + m > part_vectors:
            ranges.append((start, s))
            start, rows = s, 0
        rows += m
    return ranges + [(start, len(shard_rows))] if shard_rows else ranges


def build_ondisk_index(d: Path, emb_dir: Path, n: int, factory: str, cfg: IndexConfig, seed: int = 0,
                       progress: bool = True, shard_size: int | None = None,
                       part_vectors: int | None = None, ranks: Ranks = SINGLE) -> tuple[str, int, int, float | None]:
    """Build `d/index.faiss` + `d/index.ivfdata` from the shards in `emb_dir` (steps above); returns
    (factory, nprobe, refine, measured recall@10 or None when nprobe was given). `part_vectors`: vectors per part
    file (default: from the memory budget). With several `ranks` (distributed.py), rank 0 trains, every rank adds
    its share of the parts, rank 0 merges and tunes; the other ranks return (factory, None, None, None)."""
    d = Path(d)
    parts = d / "ivf_parts"
    shards = shard_files(emb_dir)
    rows = [int(np.load(p, mmap_mode="r").shape[0]) for p in shards]
    dim = int(np.load(shards[0], mmap_mode="r").shape[1])
    if not (d / "index.faiss").exists():
        if part_vectors is None:
            code_size = faiss.extract_index_ivf(make_index(dim, factory)).code_size
            part_vectors = int(min(PART_MAX_VECTORS, cfg.memory_budget_gb * 2 ** 30 / 8 / (code_size + 8)))
        ranges = part_ranges(rows, max(1, part_vectors))
        settings = {"factory": factory, "num_vectors": n, "shards": len(shards), "train_size": cfg.train_size,
                    "seed": seed, "parts": [list(r) for r in ranges], "part_format": PART_MAGIC.decode()}
        trained_path = parts / "trained.index"

        def train():
            if not ranks.main or trained_path.exists():
                return
            index = make_index(dim, factory)
            ivf = faiss.extract_index_ivf(index)
            size = min(n, cfg.train_size or max(40 * ivf.nlist, 20_000))
            rng = np.random.default_rng(seed)
            sample = sample_vectors(emb_dir, rng.choice(n, size, replace=False) if size < n else np.arange(n))
            index.train(sample)
            del sample
            set_quantizer_ef(index)  # vectors are assigned to their lists through this walk too
            _write_index_atomic(index, trained_path)

        # after the barrier the trained index exists
        ranks.main_first(lambda: check_or_record(parts / "settings.json", settings, OnDiskBuildError,
                                                 "pass --overwrite to rebuild the index"), then=train)
        starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        part_paths = [parts / f"part_{p:05d}.lists" for p in range(len(ranges))]
        mine = ranks.mine(list(range(len(ranges))))
        with tqdm(total=sum(ranges[p][1] - ranges[p][0] for p in mine), desc="IVF-PQ parts", unit="shard",
                  disable=not progress) as bar:
            for p in mine:
                first, end = ranges[p]
                path = part_paths[p]
                if not path.exists():
                    index = faiss.read_index(str(trained_path))
                    set_quantizer_ef(index)
                    for s in range(first, end):
                        x = np.load(shards[s], mmap_mode="r")  # dropped after the add: its pages leave the RSS
                        index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32),
                                           np.arange(starts[s], starts[s + 1], dtype=np.int64))
                        del x
                        bar.update()
                    _write_atomic(path, lambda tmp: write_part(index, tmp))
                    del index
                else:
                    bar.update(end - first)
        if ranks.world > 1:
            print(f"rank {ranks.rank}/{ranks.world}: added {len(mine)} of {len(ranges)} index parts", file=sys.stderr,
                  flush=True)
        ranks.barrier()  # every part is written
        if not ranks.main:
            return factory, None, None, None
        missing = [p for p in part_paths if not p.exists()]
        if missing:
            raise OnDiskBuildError(f"{parts}: {len(missing)} parts missing after the add step (first {missing[0]}); "
                                   f"rerun the build to add them")
        index = faiss.read_index(str(trained_path))
        (d / IVFDATA).unlink(missing_ok=True)
        merge_parts(index, part_paths, d / IVFDATA, progress=progress)
        if index.ntotal != n:
            raise OnDiskBuildError(f"{parts}: merged {index.ntotal} vectors, expected {n}; pass --overwrite")
        _write_index_atomic(index, d / "index.faiss")
        del index
        shutil.rmtree(parts)
    elif not ranks.main:
        return factory, None, None, None
    index = load_ondisk(d)
    nlist = faiss.extract_index_ivf(index).nlist
    if cfg.nprobe:
        return factory, cfg.nprobe, cfg.refine, None
    size = shard_size or rows[0]
    nprobe, refine, recall = tune_nprobe_streaming(index, emb_dir, n, nlist, cfg.target_recall, seed=seed,
                                                   refine=cfg.refine, shard_size=size)
    return factory, nprobe, refine, recall


def merge_parts(trained, part_paths: list[Path], ivfdata: Path, progress: bool = False) -> None:
    """The parts' lists (write_part files) written list by list into `ivfdata`, which becomes the data file of an
    OnDiskInvertedLists that replaces `trained`'s empty lists: list j holds every part's codes for j, then their
    ids, parts in order. Memory holds one list of one part at a time."""
    ivf = faiss.extract_index_ivf(trained)
    if ivf.ntotal:
        raise OnDiskBuildError(f"{ivfdata}: the trained index already holds {ivf.ntotal} vectors")
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    entry = code_size + 8
    sizes = np.stack([read_part_sizes(p, nlist, code_size) for p in part_paths])  # (parts, nlist)
    starts = part_header_bytes(nlist) + np.concatenate([np.zeros((len(part_paths), 1), np.int64),
                                                        np.cumsum(sizes * entry, 1)], 1)
    total = sizes.sum(0)
    offsets = np.concatenate([[0], np.cumsum(total * entry)])
    fds = [os.open(p, os.O_RDONLY) for p in part_paths]
    try:
        with open(ivfdata, "wb") as out:
            for j in tqdm(range(nlist), desc="merging lists", unit="list", disable=not progress, miniters=1024):
                blocks = [os.pread(fd, int(sizes[p, j]) * entry, int(starts[p, j])) for p, fd in enumerate(fds)]
                for p, block in enumerate(blocks):
                    out.write(memoryview(block)[:int(sizes[p, j]) * code_size])
                for p, block in enumerate(blocks):
                    out.write(memoryview(block)[int(sizes[p, j]) * code_size:])
    finally:
        for fd in fds:
            os.close(fd)
    lists = faiss.OnDiskOneListVector()
    for j in range(nlist):
        one = faiss.OnDiskOneList()
        one.size = one.capacity = int(total[j])
        one.offset = int(offsets[j])
        lists.push_back(one)
    merged = faiss.OnDiskInvertedLists(nlist, code_size, str(ivfdata))
    merged.lists = lists
    merged.totsize = int(offsets[-1])
    if merged.totsize:
        merged.do_mmap()  # searchable now, as when read back from index.faiss
    trained.ntotal = ivf.ntotal = int(total.sum())
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # owned by `trained` now


def load_ondisk(d: Path):
    """index.faiss with its lists mapped from index.ivfdata in the same directory."""
    return faiss.read_index(str(Path(d) / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)


def tune_nprobe_streaming(index, emb_dir: Path, n: int, nlist: int, target: float, k: int = 10,
                          n_queries: int = 200, seed: int = 0, refine: int = 1,
                          shard_size: int = 8192) -> tuple[int, int, float]:
    """As index.tune_nprobe, with the exact neighbours computed shard by shard and candidates refined:
    (nprobe, refine, recall@k). nprobe doubles until the target is met or doubling gains less than 0.002 recall
    (the codes' own ceiling); then, when re-scoring is on (`refine` > 1), `refine` doubles up to MAX_REFINE and
    nprobe resumes doubling from where it stood."""
    qid = np.random.default_rng(seed + 1).choice(n, min(n_queries, n), replace=False)
    queries = sample_vectors(emb_dir, qid)
    _, exact = exact_knn(queries, emb_dir, k + 1)
    exact = _drop_self(exact, qid, k)
    cache: dict = {}
    nprobe, last = 1, -1.0
    while True:
        set_nprobe(index, nprobe)
        _, approx = refine_search(index, queries, k + 1, refine,
                                  lambda ids: stored_vectors(emb_dir, shard_size, ids, cache))
        recall = recall_at_k(_drop_self(approx, qid, k), exact)
        if recall >= target:
            return nprobe, refine, recall
        if nprobe >= nlist or (nprobe >= 16 and recall - last < 0.002):
            if not 1 < refine < MAX_REFINE:
                return nprobe, refine, recall
            refine, last = min(MAX_REFINE, refine * 2), -1.0  # more probes no longer help: re-score deeper
            continue
        nprobe, last = min(nlist, nprobe * 2), recall


def resident_bytes(index) -> int:
    """Bytes an IVF index holds in memory apart from its inverted lists' contents: coarse quantizer, PQ codebook,
    OPQ rotation and per-list bookkeeping (what searching an on-disk index needs besides mapped pages)."""
    ivf = faiss.extract_index_ivf(index)
    total = int(faiss.serialize_index(ivf.quantizer).size) + ivf.nlist * 3 * 8
    if hasattr(ivf, "pq"):
        total += ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4
    if isinstance(index, faiss.IndexPreTransform):
        total += sum(index.chain.at(i).d_in * index.chain.at(i).d_out * 4 for i in range(index.chain.size()))
    return total
