"""FAISS index: normalised vectors -> an inner-product index chosen from their count and a memory budget.

The choice is a `faiss.index_factory` string, so any user override is one string too:
  N <= flat_threshold                 -> "Flat" (exact)
  N above it                          -> "IVF{nlist},Flat", nlist ~ 2 sqrt(N) (a power of two)
  ... flat vectors over the budget    -> "IVF{nlist},SQ8" (4x smaller) or "IVF{nlist},PQ{M}" (M bytes a vector)
  nlist > 65536                       -> coarse quantizer "IVF{nlist}_HNSW32" (on disk only; below, exact
                                         assignment over the centroids is cheaper than a walk wide enough to match it)
nprobe is tuned after the build: the smallest power of two whose recall@10 against exact search, measured on
a sample of the indexed vectors used as queries (each ignoring itself), reaches `target_recall`. When that needs
more than 1/8 of the lists (vectors without cluster structure) the automatic choice tries a graph index,
"HNSW{M}" with efSearch tuned the same way, and keeps it if it reaches the target faster than exact search on the
tuning queries; otherwise it falls back to exact "Flat".
Past memory (`plan_index`): when the float vectors alone exceed the memory budget, the plan is IVF-PQ (OPQ
optionally) whose inverted lists live on disk, built shard by shard (ondisk.py); searching holds only the coarse
centroids and codebooks in memory.
When faiss sees GPUs the same index is cloned onto all of them for training, adding and searching.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import faiss
import numpy as np
from tqdm.auto import tqdm


@dataclass
class IndexConfig:
    factory: str = "auto"  # or any faiss.index_factory string, e.g. "Flat", "IVF4096,Flat", "IVF1024,PQ48"
    nprobe: int | None = None  # None: tune for target_recall (IVF only)
    memory_budget_gb: float = 8.0  # for the stored vectors; decides Flat/SQ8/PQ storage above flat_threshold
    flat_threshold: int = 100_000  # exact search up to this many vectors
    target_recall: float = 0.95  # recall@10 against exact search that nprobe tuning aims for
    train_size: int | None = None  # vectors used to train IVF centroids; None: 40 per list (at least 20k)
    use_gpu: bool | None = None  # None: when faiss has GPUs
    hnsw: bool = True  # automatic choice: try HNSW where IVF needs too many lists
    hnsw_m: int = 32  # HNSW graph degree
    on_disk: bool | None = None  # inverted lists on disk; None: when the float vectors exceed memory_budget_gb
    opq: bool = False  # on-disk plan: rotate with OPQ before PQ (better recall, slower training)
    pq_m: int | None = None  # on-disk plan: bytes per vector; None: the largest divisor of dim <= dim / 2
    refine: int = 4  # on-disk plan: candidates per result re-scored with their full vectors (1: none); the tuner
    # raises it (up to ondisk.MAX_REFINE) where more probes stop helping

    def __post_init__(self):
        if self.nprobe is not None and self.nprobe <= 0:
            raise ValueError(f"nprobe must be positive or None (tuned), got {self.nprobe}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb}")
        if not self.factory or not isinstance(self.factory, str):
            raise ValueError("factory must be 'auto' or a faiss.index_factory string such as 'IVF1024,Flat'")
        if self.factory != "auto":
            check_factory(self.factory)


def choose_factory(n: int, dim: int, memory_budget_gb: float = 8.0, flat_threshold: int = 100_000) -> str:
    budget = memory_budget_gb * 2 ** 30
    if n <= flat_threshold:
        return "Flat" if n * dim * 4 <= budget else "SQ8"
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    nlist = int(max(64, min(nlist, 65536, 2 ** int(math.log2(max(n // 39, 64))))))
    coarse = f"IVF{nlist}_HNSW32" if nlist > HNSW_QUANTIZER_ABOVE else f"IVF{nlist}"
    if n * (dim * 4 + 8) <= budget:
        return f"{coarse},Flat"
    if n * (dim + 8) <= budget:
        return f"{coarse},SQ8"
    for m in sorted((m for m in range(1, dim + 1) if dim % m == 0 and m <= dim // 2), reverse=True):
        if n * (m + 8) <= budget:
            return f"{coarse},PQ{m}"
    return f"{coarse},PQ{max(1, dim // 32)}"


# Lists past which the coarse quantizer is an HNSW graph rather than exact search over the centroids. Measured on 16,384
# centroids of clustered 384-d vectors (2 threads, 100k vectors assigned): exact 5.0 s; HNSW32 at efSearch 16 2.9 s but
# 0.904 of the lists right, at 64 8.7 s (0.995), at 128 16.0 s (0.999). Exact cost grows with the lists, the walk's
# about with their logarithm: the graph pays only well past that.
HNSW_QUANTIZER_ABOVE = 65536


@dataclass
class IndexPlan:
    factory: str
    on_disk: bool
    reason: str


def plan_index(n: int, dim: int, cfg: IndexConfig) -> IndexPlan:
    """Where the index will live and which factory it starts from (build_faiss_index may still trade an
    automatic IVF for HNSW or Flat once it has measured recall)."""
    budget = cfg.memory_budget_gb * 2 ** 30
    fits = n * dim * 4 <= budget
    if cfg.factory != "auto":
        return IndexPlan(cfg.factory, bool(cfg.on_disk), "given")
    if cfg.on_disk or (cfg.on_disk is None and not fits and n > cfg.flat_threshold):
        return IndexPlan(ondisk_factory(n, dim, cfg), True,
                         f"{n * dim * 4 / 2 ** 30:.1f} GiB of vectors over a {cfg.memory_budget_gb} GiB budget")
    return IndexPlan(choose_factory(n, dim, cfg.memory_budget_gb, cfg.flat_threshold), False, "fits in memory")


def ondisk_factory(n: int, dim: int, cfg: IndexConfig) -> str:
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))  # more, shorter lists: each probe reads less from disk
    nlist = int(max(64, min(nlist, 262144, 2 ** int(math.log2(max(n // 39, 64))))))
    # two dimensions a byte: the lists live on disk, so finer codes cost disk reads, not memory, and rank well enough
    # to probe few lists (1M clustered 384-d: PQ192 reaches recall 0.988 at nprobe 1 where PQ96 needs nprobe 16)
    m = cfg.pq_m or max(x for x in range(1, dim // 2 + 1) if dim % x == 0)
    coarse = f"IVF{nlist}_HNSW32" if nlist > HNSW_QUANTIZER_ABOVE else f"IVF{nlist}"
    return f"OPQ{m},{coarse},PQ{m}" if cfg.opq else f"{coarse},PQ{m}"


PROBE_DIMENSIONS = (64, 384, 768, 1024)  # widths a factory is tried at before the embedder gives the real one


def check_factory(factory: str) -> None:
    """Refuse a factory string faiss cannot parse, before anything is embedded: it must build an (empty) index at
    one of a few common widths (PQ and OPQ need a width their M divides)."""
    for dim in PROBE_DIMENSIONS:
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as error:
            reason = _faiss_reason(error)
    raise ValueError(f"factory {factory!r} is not a valid faiss.index_factory string at any of the widths "
                     f"{', '.join(map(str, PROBE_DIMENSIONS))} ({reason}); try 'Flat' or 'IVF1024,Flat'")


def _faiss_reason(error: RuntimeError) -> str:
    """The last line of a faiss error without its source location."""
    text = str(error).strip()
    return text.splitlines()[-1].split(": ", 2)[-1][:200] if text else type(error).__name__


def make_index(dim: int, factory: str):
    """faiss.index_factory with inner product, or a ValueError that says what to change."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"factory {factory!r} is not a valid faiss.index_factory string for {dim}-d vectors "
                         f"({_faiss_reason(e)}); try 'Flat' or "
                         f"'IVF1024,Flat'") from None


def gpu_count(use_gpu: bool | None) -> int:
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return n if use_gpu in (None, True) else 0


def to_devices(index, use_gpu: bool | None):
    """The same index on all GPUs faiss sees (or unchanged without GPUs)."""
    return faiss.index_cpu_to_all_gpus(index) if gpu_count(use_gpu) else index


def to_cpu(index):
    return faiss.index_gpu_to_cpu(index) if gpu_count(None) else index


def is_ivf(index) -> bool:
    """True for a CPU index with inverted lists."""
    try:
        return faiss.extract_index_ivf(index) is not None
    except (RuntimeError, AttributeError):
        return False


# An HNSW coarse quantizer (IVF{n}_HNSW32, n >= 16384) walks its graph at efSearch 16 by default: too narrow to
# find the nearest lists of a vector. Measured on 1M clustered 384-d vectors in IVF16384_HNSW32,Flat: recall@10
# stays at 0.87 from nprobe 16 to 256 at efSearch 16, and reaches 0.94-0.96 at 128.
QUANTIZER_EF_SEARCH = 128


def set_quantizer_ef(index, nprobe: int = 0) -> None:
    """Widen the graph walk of a CPU IVF index's HNSW coarse quantizer to max(QUANTIZER_EF_SEARCH, nprobe);
    other indexes are left as they are."""
    if not is_ivf(index):
        return
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(QUANTIZER_EF_SEARCH, int(nprobe))


def set_nprobe(index, nprobe: int | None) -> None:
    """Set nprobe on an IVF index, CPU or GPU (ParameterSpace reaches through GPU clones and replicas), and the
    matching graph width of an HNSW coarse quantizer."""
    if nprobe:
        space = faiss.GpuParameterSpace() if gpu_count(None) else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", int(nprobe))
        set_quantizer_ef(index, nprobe)


def build_faiss_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0, progress: bool = True):
    """(N, D) float32 normalised -> (CPU index, factory string, nprobe or None, measured recall@10 or None)."""
    n, dim = vectors.shape
    factory = cfg.factory if cfg.factory != "auto" else choose_factory(n, dim, cfg.memory_budget_gb,
                                                                       cfg.flat_threshold)
    cpu_index = make_index(dim, factory)
    nlist = faiss.extract_index_ivf(cpu_index).nlist if is_ivf(cpu_index) else None
    index = to_devices(cpu_index, cfg.use_gpu)
    if not index.is_trained:
        # ~40 training points per list is where faiss stops warning; flat codecs (SQ/PQ) need far fewer
        size = min(n, cfg.train_size or max(40 * (nlist or 256), 20_000))
        sample = vectors[np.random.default_rng(seed).choice(n, size, replace=False)] if size < n else vectors
        index.train(np.ascontiguousarray(sample))
    set_quantizer_ef(index)  # an HNSW coarse quantizer: assign vectors through a wide enough walk
    step = 65536
    for lo in tqdm(range(0, n, step), desc="indexing", unit="block", disable=not progress or n <= step):
        index.add(np.ascontiguousarray(vectors[lo:lo + step]))
    nprobe, recall = cfg.nprobe, None
    if nlist:
        if nprobe is None:
            replaceable = cfg.factory == "auto" and n * dim * 4 <= cfg.memory_budget_gb * 2 ** 30
            # an automatic IVF that needs more than an eighth of its lists is replaced: stop tuning past that
            nprobe, recall = tune_nprobe(index, vectors, nlist, cfg.target_recall, seed=seed,
                                         max_nprobe=2 * max(1, nlist // 8) if replaceable else None)
            if replaceable and nprobe > nlist // 8:
                # data without cluster structure (e.g. isotropic): scanning this many lists costs more than
                # exact search, which also gives recall 1; a graph index may still beat both
                del index, cpu_index  # its copy of the vectors goes before the replacement makes another
                if cfg.hnsw and n * (dim * 4 + cfg.hnsw_m * 2 * 4 * 1.1) <= cfg.memory_budget_gb * 2 ** 30:
                    graph = build_hnsw_if_faster(vectors, cfg, seed, progress)
                    if graph is not None:
                        return graph
                return build_faiss_index(vectors, replace(cfg, factory="Flat"), seed, progress)
        set_nprobe(index, nprobe)
    return to_cpu(index), factory, nprobe, recall


# A graph step computes one distance at a random address; exact search streams all vectors through BLAS, a batch of
# queries at a time. On CPU one graph distance costs about as much as this many streamed ones, so HNSW wins when it
# computes fewer than N / this distances a query.
GRAPH_DISTANCE_COST = 32


# Past this many vectors the graph is first tried on a random tenth (at least PILOT_MIN_VECTORS): a graph over more
# vectors needs at least the pilot's efSearch for the same recall and computes more distances there, so a pilot that
# cannot reach the target within the full index's distance allowance rules the full graph out without building it.
PILOT_ABOVE = 200_000
PILOT_MIN_VECTORS = 50_000


def build_hnsw_if_faster(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0, progress: bool = True):
    """An HNSW index with efSearch tuned to `target_recall` (smallest power of two from 16), if it computes fewer
    than N / GRAPH_DISTANCE_COST distances a query there (counted by faiss, so the choice does not depend on the
    machine's load); else None. Returns build_faiss_index's tuple (nprobe None, measured recall). Large inputs are
    first tried on a pilot sample (see PILOT_ABOVE)."""
    n = len(vectors)
    affordable = n / GRAPH_DISTANCE_COST
    ef = 16
    if n > PILOT_ABOVE:
        size = max(PILOT_MIN_VECTORS, n // 10)
        ids = np.sort(np.random.default_rng(seed + 2).choice(n, size, replace=False))
        pilot = _tuned_hnsw(np.ascontiguousarray(vectors[ids]), cfg, seed, progress, affordable, ef)
        if pilot is None:
            return None
        ef = pilot[1]  # the full graph needs at least the pilot's efSearch
    got = _tuned_hnsw(vectors, cfg, seed, progress, affordable, ef)
    if got is None:
        return None
    index, _, recall = got
    return index, f"HNSW{cfg.hnsw_m}", None, recall


def _tuned_hnsw(vectors: np.ndarray, cfg: IndexConfig, seed: int, progress: bool, affordable: float, ef: int):
    """(HNSW index, efSearch, recall) at the smallest power-of-two efSearch from `ef` that reaches the target while
    computing fewer than `affordable` distances a query, or None."""
    n, dim = vectors.shape
    index = make_index(dim, f"HNSW{cfg.hnsw_m}")
    index.hnsw.efConstruction = 80
    step = 65536
    for lo in tqdm(range(0, n, step), desc="HNSW graph", unit="block", disable=not progress or n <= step):
        index.add(np.ascontiguousarray(vectors[lo:lo + step]))
    qid = np.random.default_rng(seed + 1).choice(n, min(1000, n), replace=False)
    queries = np.ascontiguousarray(vectors[qid])
    _, exact = faiss.knn(queries, vectors, 11, metric=faiss.METRIC_INNER_PRODUCT)
    exact = _drop_self(exact, qid, 10)
    while ef <= 4096:
        index.hnsw.efSearch = ef
        faiss.cvar.hnsw_stats.reset()
        _, approx = index.search(queries, 11)
        if faiss.cvar.hnsw_stats.ndis / len(queries) >= affordable:
            return None
        recall = recall_at_k(_drop_self(approx, qid, 10), exact)
        if recall >= cfg.target_recall:
            return index, ef, recall
        ef *= 2
    return None


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each row of exact_ids found anywhere in the same row of approx_ids."""
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, (e >= 0).sum())
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))


def tune_nprobe(index, vectors: np.ndarray, nlist: int, target: float, k: int = 10, n_queries: int = 200,
                seed: int = 0, max_nprobe: int | None = None):
    """Smallest power-of-two nprobe whose recall@k against exact search reaches `target` (queries are indexed
    vectors, each ignoring itself), or `max_nprobe` (default nlist) if none below does. Returns (nprobe, measured
    recall)."""
    nlist = min(nlist, max_nprobe or nlist)
    n = len(vectors)
    rng = np.random.default_rng(seed + 1)
    qid = rng.choice(n, min(n_queries, n), replace=False)
    queries = np.ascontiguousarray(vectors[qid])
    _, exact = faiss.knn(queries, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    exact = _drop_self(exact, qid, k)
    nprobe, recall = 1, 0.0
    while True:
        set_nprobe(index, nprobe)
        _, approx = index.search(queries, k + 1)
        recall = recall_at_k(_drop_self(approx, qid, k), exact)
        if recall >= target or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nlist, nprobe * 2)


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, me) in enumerate(zip(ids, self_ids)):
        keep = row[row != me][:k]
        out[r, :len(keep)] = keep
    return out


def search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> scores (N, k) float32 (-inf where missing), ids (N, k) int64 (-1 where missing)."""
    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    ids = ids.astype(np.int64)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    return scores, ids
