"""Index scale benchmark: the planner's choice under a memory budget at 1M and 10M vectors, and HNSW vs IVF vs Flat.

    python benchmarks/bench_index_scale.py                          # 1M x 384-d, 4 GB budget, + HNSW/IVF/Flat
    python benchmarks/bench_index_scale.py --n 10000000 --no-compare # 10M: 14.3 GiB of vectors, lists on disk
    python benchmarks/bench_index_scale.py --tiny                   # seconds; for the smoke test

Vectors (clustered Gaussian mixture or isotropic, L2-normalised) are generated shard by shard straight into
embedding shards on disk, as a build leaves them, so 10M never sit in memory. Each row then runs the build path of
`python -m retrieval build` from those shards (`plan_index`, then the in-memory `build_faiss_index` or the
on-disk `build_ondisk_index`) and reports:
- peak RSS of the build and of the search (sampled; the shards are read through memory maps; an on-disk index is
  searched in a fresh process, so its peak is what a search process holds),
- build time and its ratio to an encode-free add: reading the same shards into a plain IndexFlatIP (one shard at
  a time when the vectors exceed the budget), the least any index build from stored vectors costs,
- recall@10 against exact search (computed shard by shard) on held-out queries from the same distribution,
- queries/s on a batch of those queries.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import PeakSampler, fmt, md_table  # noqa: E402
from retrieval.embed import load_embeddings  # noqa: E402
from retrieval.index import IndexConfig, build_faiss_index, plan_index, search_index, set_nprobe  # noqa: E402
from retrieval.ondisk import (build_ondisk_index, exact_knn, iter_shards, load_ondisk, refine_search,  # noqa: E402
                              resident_bytes, stored_vectors)


def write_shards(folder: Path, n: int, dim: int, shard: int, data: str, centres: np.ndarray, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s, lo in enumerate(range(0, n, shard)):
        m = min(shard, n - lo)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if data == "clustered":
            x = centres[rng.integers(0, len(centres), m)] + 0.6 / np.sqrt(dim) * x
        # float32, as a build stores its embeddings (a float64 scalar above would otherwise promote the shard)
        np.save(folder / f"shard_{s:05d}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))


def queries_like(n: int, dim: int, data: str, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if data == "clustered":
        x = centres[rng.integers(0, len(centres), n)] + 0.6 / np.sqrt(dim) * x
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def flat_add_seconds(emb: Path, dim: int, fits: bool) -> float:
    index = faiss.IndexFlatIP(dim)
    t = time.perf_counter()
    for _, x in iter_shards(emb):
        if not fits:
            index.reset()
        index.add(np.ascontiguousarray(x))
    return time.perf_counter() - t


def measure(folder: Path, emb: Path, n: int, dim: int, cfg: IndexConfig, queries: np.ndarray, exact: np.ndarray,
            shard: int, label: str) -> list:
    plan = plan_index(n, dim, cfg)
    with PeakSampler() as build_mem:
        t = time.perf_counter()
        if plan.on_disk:
            factory, nprobe, refine, _ = build_ondisk_index(folder, emb, n, plan.factory, cfg, progress=False,
                                                            shard_size=shard)
            index = None
        else:
            vectors = load_embeddings(emb, n)  # what `python -m retrieval build` does
            index, factory, nprobe, _ = build_faiss_index(vectors, cfg, progress=False)
            del vectors
        build_s = time.perf_counter() - t
    gc.collect()
    base_s = flat_add_seconds(emb, dim, fits=not plan.on_disk)
    if plan.on_disk:  # searched in a fresh process, as a user's search would be: its peak is the search's own
        ids, search_s, search_peak = search_in_child(folder, emb, nprobe, refine, shard, queries)
        index = load_ondisk(folder)
    else:
        with PeakSampler() as search_mem:
            search_index(index, queries[:10], 10)
            t = time.perf_counter()
            _, ids = search_index(index, queries, 10)
            search_s = time.perf_counter() - t
        search_peak = search_mem.peak
    recall = np.mean([len(set(a[a >= 0]) & set(e)) / 10 for a, e in zip(ids, exact)])
    setting = (f"nprobe {nprobe}" + (f", refine {refine}" if plan.on_disk else "")) if nprobe else (f"efSearch {faiss.downcast_index(index).hnsw.efSearch}"
                                                if factory.startswith("HNSW") else "-")
    resident = fmt(resident_bytes(index) / 2 ** 20) if plan.on_disk else "-"
    return [label, f"{n:,}", factory + (" (on disk)" if plan.on_disk else ""), setting, fmt(build_s),
            fmt(build_s / base_s), f"{build_mem.peak / 2 ** 30:.2f}", f"{search_peak / 2 ** 30:.2f}", resident,
            f"{recall:.3f}", fmt(len(queries) / search_s)]


def search_on_disk(folder: Path, emb: Path, nprobe: int, refine: int, shard: int, queries: np.ndarray):
    """(ids (Q, 10), seconds for the batch after a 10-query warm-up) of the on-disk index in `folder`."""
    index = load_ondisk(folder)
    set_nprobe(index, nprobe)
    cache: dict = {}

    def search(q):
        return refine_search(index, q, 10, refine, lambda ids: stored_vectors(emb, shard, ids, cache))

    search(queries[:10])
    t = time.perf_counter()
    _, ids = search(queries)
    return ids, time.perf_counter() - t


def search_in_child(folder: Path, emb: Path, nprobe: int, refine: int, shard: int, queries: np.ndarray):
    """search_on_disk in a new Python process: (ids, seconds, that process's peak RSS in bytes)."""
    import json
    import subprocess

    np.save(folder / "bench_queries.npy", queries)
    spec = json.dumps({"folder": str(folder), "emb": str(emb), "nprobe": int(nprobe), "refine": int(refine),
                       "shard": int(shard)})
    done = subprocess.run([sys.executable, __file__, "--search-child", spec], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"search child failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return np.load(folder / "bench_ids.npy"), out["seconds"], out["peak"]


def search_child(spec: str) -> None:
    import json

    a = json.loads(spec)
    folder = Path(a["folder"])
    with PeakSampler() as mem:
        ids, seconds = search_on_disk(folder, Path(a["emb"]), a["nprobe"], a["refine"], a["shard"],
                                      np.load(folder / "bench_queries.npy"))
    np.save(folder / "bench_ids.npy", ids)
    print(json.dumps({"seconds": seconds, "peak": mem.peak}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="indexed vectors (several: one row each)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--data", choices=["clustered", "sphere"], default="clustered")
    p.add_argument("--budget-gb", type=float, default=4.0)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--shard", type=int, default=100_000, help="vectors per embedding shard")
    p.add_argument("--no-compare", action="store_true", help="skip HNSW vs IVF vs Flat")
    p.add_argument("--compare-n", type=int, default=None, help="vectors for HNSW vs IVF vs Flat (default: the "
                   "first --n)")
    p.add_argument("--workdir", default=None, help="where the shards go (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="5k x 16-d, 16 KiB budget (smoke test)")
    p.add_argument("--pq-m", type=int, default=None, help="on-disk plan: PQ bytes per vector (default: the "
                   "planner's)")
    p.add_argument("--opq", action="store_true", help="on-disk plan: an OPQ rotation before PQ")
    p.add_argument("--search-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.search_child:
        search_child(args.search_child)
        return 0
    flat_threshold = 100_000
    if args.tiny:
        args.n, args.dim, args.budget_gb, args.queries, args.shard = [5_000], 16, 2 ** -16, 20, 1_000
        flat_threshold = 1_000
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096 if not args.tiny else 64, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_index_scale_"))
    rows = []
    try:
        compare_n = None if args.no_compare else (args.compare_n or args.n[0])
        sizes = list(args.n) + ([compare_n] if compare_n and compare_n not in args.n else [])
        for n in sizes:
            folder = root / f"n{n}"
            emb = folder / "embeddings"
            if not emb.exists():
                write_shards(emb, n, args.dim, args.shard, args.data, centres, seed=1)
            queries = queries_like(args.queries, args.dim, args.data, centres, seed=2)
            _, exact = exact_knn(queries, emb, 10)
            cfg = IndexConfig(memory_budget_gb=args.budget_gb, flat_threshold=flat_threshold, pq_m=args.pq_m,
                              opq=args.opq)
            if n in args.n:
                rows.append(measure(folder, emb, n, args.dim, cfg, queries, exact, args.shard, "planner"))
                print(md_table(HEADERS, rows[-1:]), file=sys.stderr, flush=True)
            if n == compare_n:
                nlist = 2 ** round(np.log2(2 * np.sqrt(n)))
                for label, factory in (("Flat", "Flat"), ("IVF", f"IVF{nlist},Flat"), ("HNSW", "HNSW32")):
                    c = IndexConfig(factory=factory, memory_budget_gb=1e6, flat_threshold=flat_threshold)
                    if factory == "HNSW32":  # the planner's own HNSW: efSearch tuned to the recall target
                        c = IndexConfig(memory_budget_gb=1e6, flat_threshold=flat_threshold, hnsw=True)
                        import retrieval.index as index_mod

                        rows.append(measure_hnsw(folder, emb, n, args.dim, c, queries, exact, index_mod))
                    else:
                        rows.append(measure(folder, emb, n, args.dim, c, queries, exact, args.shard, label))
                    print(md_table(HEADERS, rows[-1:]), file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"## Index scale ({args.data} {args.dim}-d vectors, {args.budget_gb:g} GB budget, "
          f"{faiss.omp_get_max_threads()} threads)\n")
    print(md_table(HEADERS, rows))
    return 0


def measure_hnsw(folder, emb, n, dim, cfg, queries, exact, index_mod):
    """HNSW32 with efSearch tuned to the target as the planner does, whatever its cost against a scan."""
    saved = index_mod.GRAPH_DISTANCE_COST
    index_mod.GRAPH_DISTANCE_COST = 1e-12  # accept any cost: this row measures the graph, not the choice
    try:
        with PeakSampler() as build_mem:
            t = time.perf_counter()
            vectors = load_embeddings(emb, n)
            got = index_mod.build_hnsw_if_faster(vectors, cfg, progress=False)
            build_s = time.perf_counter() - t
        base_s = flat_add_seconds(emb, dim, fits=True)
        del vectors
        if got is None:
            return ["HNSW", f"{n:,}", "HNSW32", "target not reached by efSearch 4096", fmt(build_s),
                    fmt(build_s / base_s), f"{build_mem.peak / 2 ** 30:.2f}", "-", "-", "-", "-"]
        index = got[0]
        with PeakSampler() as search_mem:
            search_index(index, queries[:10], 10)
            t = time.perf_counter()
            _, ids = search_index(index, queries, 10)
            search_s = time.perf_counter() - t
        recall = np.mean([len(set(a[a >= 0]) & set(e)) / 10 for a, e in zip(ids, exact)])
        return ["HNSW", f"{n:,}", "HNSW32", f"efSearch {index.hnsw.efSearch}", fmt(build_s), fmt(build_s / base_s),
                f"{build_mem.peak / 2 ** 30:.2f}", f"{search_mem.peak / 2 ** 30:.2f}", "-", f"{recall:.3f}",
                fmt(len(queries) / search_s)]
    finally:
        index_mod.GRAPH_DISTANCE_COST = saved


HEADERS = ["index", "vectors", "factory", "search setting", "build s", "build / flat add", "build peak RSS GiB",
           "search peak RSS GiB", "resident MiB", "recall@10", "queries/s"]

if __name__ == "__main__":
    sys.exit(main())
