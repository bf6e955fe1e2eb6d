"""FAISS index: normalised vectors -> an inner-product index chosen from their count and a memory budget.

The choice is a `faiss.index_factory` string, so any user override is one string too:
  N <= flat_threshold                 -> "Flat" (exact)
  N above it                          -> "IVF{nlist},Flat", nlist ~ 2 sqrt(N) (a power of two)
  ... flat vectors over the budget    -> "IVF{nlist},SQ8" (4x smaller) or "IVF{nlist},PQ{M}" (M bytes a vector)
  nlist >= 16384                      -> coarse quantizer "IVF{nlist}_HNSW32" (assigning to lists stays fast)
nprobe is tuned after the build: the smallest power of two whose recall@10 against exact search, measured on
a sample of the indexed vectors used as queries (each ignoring itself), reaches `target_recall`. When that needs
more than 1/8 of the lists (vectors without cluster structure) the automatic choice falls back to exact "Flat".
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

    def __post_init__(self):
        if self.nprobe is not None and self.nprobe <= 0:
            raise ValueError(f"nprobe must be positive or None (tuned), got {self.nprobe}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb must be positive, got {self.memory_budget_gb}")
        if not self.factory or not isinstance(self.factory, str):
            raise ValueError("factory must be 'auto' or a faiss.index_factory string such as 'IVF1024,Flat'")


def choose_factory(n: int, dim: int, memory_budget_gb: float = 8.0, flat_threshold: int = 100_000) -> str:
    budget = memory_budget_gb * 2 ** 30
    if n <= flat_threshold:
        return "Flat" if n * dim * 4 <= budget else "SQ8"
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    nlist = int(max(64, min(nlist, 65536, 2 ** int(math.log2(max(n // 39, 64))))))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 16384 else f"IVF{nlist}"
    if n * (dim * 4 + 8) <= budget:
        return f"{coarse},Flat"
    if n * (dim + 8) <= budget:
        return f"{coarse},SQ8"
    for m in sorted((m for m in range(1, dim + 1) if dim % m == 0 and m <= dim // 2), reverse=True):
        if n * (m + 8) <= budget:
            return f"{coarse},PQ{m}"
    return f"{coarse},PQ{max(1, dim // 32)}"


def make_index(dim: int, factory: str):
    """faiss.index_factory with inner product, or a ValueError that says what to change."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"factory {factory!r} is not a valid faiss.index_factory string for {dim}-d vectors "
                         f"({str(e).strip().splitlines()[-1][:200]}); try 'Flat' or 'IVF1024,Flat'") from None


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


def set_nprobe(index, nprobe: int | None) -> None:
    """Set nprobe on an IVF index, CPU or GPU (ParameterSpace reaches through GPU clones and replicas)."""
    if nprobe:
        space = faiss.GpuParameterSpace() if gpu_count(None) else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", int(nprobe))


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
    step = 65536
    for lo in tqdm(range(0, n, step), desc="indexing", unit="block", disable=not progress or n <= step):
        index.add(np.ascontiguousarray(vectors[lo:lo + step]))
    nprobe, recall = cfg.nprobe, None
    if nlist:
        if nprobe is None:
            nprobe, recall = tune_nprobe(index, vectors, nlist, cfg.target_recall, seed=seed)
            if cfg.factory == "auto" and nprobe > nlist // 8 and n * dim * 4 <= cfg.memory_budget_gb * 2 ** 30:
                # data without cluster structure (e.g. isotropic): scanning this many lists costs more than
                # exact search, which also gives recall 1
                return build_faiss_index(vectors, replace(cfg, factory="Flat"), seed, progress)
        set_nprobe(index, nprobe)
    return to_cpu(index), factory, nprobe, recall


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each row of exact_ids found anywhere in the same row of approx_ids."""
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, (e >= 0).sum())
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))


def tune_nprobe(index, vectors: np.ndarray, nlist: int, target: float, k: int = 10, n_queries: int = 200,
                seed: int = 0):
    """Smallest power-of-two nprobe whose recall@k against exact search reaches `target` (queries are indexed
    vectors, each ignoring itself). Returns (nprobe, measured recall)."""
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
