"""Search benchmark: the automatically chosen FAISS index against exact search on generated vectors.

    python benchmarks/bench_search.py                 # 1M x 384-d: uniform on the sphere (hard case), then clustered
    python benchmarks/bench_search.py --data clustered # only the Gaussian mixture, closer to real embeddings
    python benchmarks/bench_search.py --tiny          # seconds; for the smoke test

Prints one markdown row per kind of data: the chosen factory string and nprobe (tuned by the build for recall@10 >= target),
per-query latency of exact and approximate search on the same query batch, the speed-up and the recall@10 of the
approximate results against the exact ones. Vectors are generated in memory, never stored.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.index import IndexConfig, build_faiss_index, recall_at_k, search_index  # noqa: E402


def generate(n: int, dim: int, kind: str, rng: np.random.Generator, centres: np.ndarray | None = None,
             spread: float = 0.6) -> np.ndarray:
    """`sphere`: isotropic Gaussian directions; `clustered`: a Gaussian mixture around unit-norm `centres` whose
    noise has norm ~`spread`; both L2-normalised, as sentence embeddings are."""
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for lo in range(0, n, step):
        m = min(step, n - lo)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            x = centres[rng.integers(0, len(centres), m)] + spread / np.sqrt(dim) * x
        out[lo:lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int, repeats: int = 3):
    best, result = float("inf"), search_index(index, queries[:10], k)  # warm-up, untimed
    for _ in range(repeats):
        t = time.perf_counter()
        result = search_index(index, queries, k)
        best = min(best, time.perf_counter() - t)
    return best, result


def run(args, data: str, flat_threshold: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) / np.sqrt(args.dim) * 1.0
    base = generate(args.n, args.dim, data, rng, centres, args.spread)
    queries = generate(args.queries, args.dim, data, rng, centres, args.spread)

    t = time.perf_counter()
    cfg = IndexConfig(factory=args.factory, target_recall=args.target_recall, memory_budget_gb=args.memory_budget_gb,
                      flat_threshold=flat_threshold)
    index, factory, nprobe, tuned = build_faiss_index(base, cfg, progress=False)
    build_s = time.perf_counter() - t

    exact_index = faiss.IndexFlatIP(args.dim)
    exact_index.add(base)
    exact_s, (_, exact_ids) = timed_search(exact_index, queries, args.k)
    approx_s, (_, approx_ids) = timed_search(index, queries, args.k)
    recall = recall_at_k(approx_ids, exact_ids)
    speedup = exact_s / approx_s
    spread = args.spread if data == "clustered" else "-"
    print(f"| {args.n:,} | {args.dim} | {data} | {spread} | {faiss.omp_get_max_threads()} | {factory} | {nprobe} | "
          f"{build_s:.1f} | {1e3 * exact_s / args.queries:.3f} | {1e3 * approx_s / args.queries:.3f} | "
          f"{speedup:.1f}x | {recall:.3f} |")
    ok = recall >= args.target_recall and speedup >= 10
    print(f"target (recall@{args.k} >= {args.target_recall} and >= 10x faster): {'met' if ok else 'NOT met'} "
          f"(recall measured during tuning: {tuned})", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=["sphere", "clustered"], nargs="+", default=["sphere", "clustered"])
    p.add_argument("--clusters", type=int, default=4096, help="mixture components for --data clustered")
    p.add_argument("--spread", type=float, default=0.6, help="noise norm relative to the centres' (clustered)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--factory", default="auto", help="override the automatic choice")
    p.add_argument("--memory-budget-gb", type=float, default=8.0)
    p.add_argument("--tiny", action="store_true", help="10k vectors, 32-d, 100 queries (smoke test)")
    p.add_argument("--header", action="store_true", help="print the markdown table header first")
    args = p.parse_args(argv)
    if args.tiny:
        args.n, args.dim, args.queries, args.clusters = 10_000, 32, 100, 64
    flat_threshold = 2_000 if args.tiny else 100_000

    if args.header:
        print("| vectors | dim | data | spread | threads | factory | nprobe | build s | exact ms/q | auto ms/q | speed-up | "
              "recall@10 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for data in args.data:
        run(args, data, flat_threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
