"""Coarse assignment: how fast and how right an IVF's lists are chosen, exactly or through an HNSW graph.

    python benchmarks/bench_coarse_assignment.py               # 16,384 lists, 100k clustered 384-d vectors
    python benchmarks/bench_coarse_assignment.py --nlist 65536 # where the planner's HNSW quantizer starts
    python benchmarks/bench_coarse_assignment.py --tiny        # seconds; for the smoke test

An IVF index adds each vector to the list of its nearest centroid; a vector put in the wrong list is missed by
every search that does not probe that list too. The centroids are trained by the build's own path (`make_index`,
then `train` on 40 samples a list, spherical k-means of `--niter` iterations: faiss' 10 by default, as a build),
then the same held-out vectors are assigned to them by exact search and by an HNSW32 graph over the centroids
(what `IVF{n}_HNSW32` uses) at several efSearch. Each row reports its time as a ratio to the exact assignment and
the share of vectors that land in the list exact search picks. The planner assigns exactly up to
`HNSW_QUANTIZER_ABOVE` lists and walks the graph at `QUANTIZER_EF_SEARCH` past it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import fmt, md_table  # noqa: E402
from benchmarks.bench_index_scale import queries_like  # noqa: E402
from retrieval.index import HNSW_QUANTIZER_ABOVE, QUANTIZER_EF_SEARCH, make_index  # noqa: E402

HEADERS = ["assignment", "seconds", "time / exact", "lists right"]


def trained_centroids(nlist: int, dim: int, centres: np.ndarray, niter: int) -> np.ndarray:
    index = make_index(dim, f"IVF{nlist},Flat")
    faiss.extract_index_ivf(index).cp.niter = niter
    index.train(queries_like(40 * nlist, dim, "clustered", centres, seed=1))
    quantizer = faiss.extract_index_ivf(index).quantizer
    return quantizer.reconstruct_n(0, nlist)


def assign(quantizer, x: np.ndarray) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    _, lists = quantizer.search(x, 1)
    return lists[:, 0], time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nlist", type=int, default=16384)
    p.add_argument("--n", type=int, default=100_000, help="vectors assigned")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--ef", type=int, nargs="+", default=[16, 64, QUANTIZER_EF_SEARCH])
    p.add_argument("--niter", type=int, default=10, help="k-means iterations of the centroid training "
                   "(faiss' IVF default: 10)")
    p.add_argument("--tiny", action="store_true", help="256 lists, 2k x 16-d vectors")
    args = p.parse_args(argv)
    if args.tiny:
        args.nlist, args.n, args.dim = 256, 2_000, 16
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, args.dim), dtype=np.float32) / np.sqrt(args.dim)  # as bench_index_scale
    print(f"training {args.nlist} centroids on {40 * args.nlist:,} vectors", file=sys.stderr, flush=True)
    centroids = trained_centroids(args.nlist, args.dim, centres, args.niter)
    x = queries_like(args.n, args.dim, "clustered", centres, seed=2)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(centroids)
    exact, exact_s = assign(flat, x)
    rows = [["exact (flat)", fmt(exact_s), "1.00", "1.000"]]
    graph = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    graph.add(centroids)
    for ef in args.ef:
        graph.hnsw.efSearch = ef
        lists, seconds = assign(graph, x)
        rows.append([f"HNSW32, efSearch {ef}", fmt(seconds), f"{seconds / exact_s:.2f}",
                     f"{np.mean(lists == exact):.3f}"])
    print(f"## Coarse assignment ({args.n:,} clustered {args.dim}-d vectors to {args.nlist:,} lists, "
          f"{faiss.omp_get_max_threads()} threads)\n")
    print(md_table(HEADERS, rows))
    print(f"\nThe planner assigns exactly up to {HNSW_QUANTIZER_ABOVE:,} lists, and past that through the graph "
          f"at efSearch max({QUANTIZER_EF_SEARCH}, nprobe).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
