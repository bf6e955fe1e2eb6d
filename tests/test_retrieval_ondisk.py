"""Indexes past memory: the plan, an IVF-PQ index built shard by shard with its lists on disk (same results as the
same index in memory, searched within its budget, resumable), and the HNSW choice where IVF needs too many lists."""
import faiss
import numpy as np
import pytest

import retrieval.index as index_mod
from retrieval import IndexConfig
from retrieval.index import build_faiss_index, make_index, plan_index, set_nprobe
from retrieval.ondisk import (build_ondisk_index, exact_knn, load_ondisk, refine_search, resident_bytes,
                              stored_vectors)

N, D, SHARD = 3000, 16, 1000


def clustered(seed=0, n=N, d=D):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shards(folder, x):
    folder.mkdir(parents=True)
    for s in range(0, len(x), SHARD):
        np.save(folder / f"shard_{s // SHARD:05d}.npy", x[s:s + SHARD])


def test_plan_moves_to_disk_only_past_the_budget():
    cfg = IndexConfig(memory_budget_gb=4)
    assert plan_index(1_000_000, 384, cfg).on_disk is False  # 1.4 GiB of vectors fit
    plan = plan_index(10_000_000, 384, cfg)  # 14.3 GiB do not
    assert plan.on_disk and plan.factory == "IVF16384_HNSW32,PQ96"
    assert plan_index(10_000_000, 384, IndexConfig(memory_budget_gb=4, opq=True)).factory.startswith("OPQ96,")
    assert not plan_index(50_000, 384, IndexConfig(memory_budget_gb=0.01)).on_disk  # small: never on disk
    faiss.index_factory(384, plan.factory, faiss.METRIC_INNER_PRODUCT)


@pytest.mark.parametrize("factory", ["IVF16,PQ4", "OPQ4,IVF16,PQ4"])
def test_ondisk_index_returns_the_in_memory_top10_within_its_budget(tmp_path, factory):
    faiss.omp_set_num_threads(1)  # k-means is then bit-for-bit repeatable
    x = clustered()
    write_shards(tmp_path / "embeddings", x)
    budget_gb = 64 * 2 ** 10 / 2 ** 30  # 64 KiB, a third of the 188 KiB of vectors
    cfg = IndexConfig(memory_budget_gb=budget_gb, flat_threshold=100, nprobe=4)
    assert plan_index(N, D, cfg).on_disk
    build_ondisk_index(tmp_path, tmp_path / "embeddings", N, factory, cfg, progress=False)
    assert not (tmp_path / "ivf_parts").exists()
    disk = load_ondisk(tmp_path)
    assert "OnDisk" in type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(disk).invlists)).__name__
    assert resident_bytes(disk) <= budget_gb * 2 ** 30 < x.nbytes

    memory = make_index(D, factory)
    memory.train(x)
    memory.add(x)
    queries = clustered(seed=1, n=50)
    set_nprobe(disk, 4)
    set_nprobe(memory, 4)
    _, ids_disk = disk.search(queries, 10)
    _, ids_memory = memory.search(queries, 10)
    np.testing.assert_array_equal(ids_disk, ids_memory)

    # refined with the full vectors read back from the shards: exactly the exact scores of those candidates
    s, ids = refine_search(disk, queries, 10, 4, lambda i: stored_vectors(tmp_path / "embeddings", SHARD, i))
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", queries, x[ids]), rtol=1e-5)
    _, exact = exact_knn(queries, tmp_path / "embeddings", 10)
    _, exact_ref = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(exact, exact_ref)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact)])
    recall_codes = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids_disk, exact)])
    assert recall >= recall_codes


def test_ondisk_build_resumes_after_an_interruption(tmp_path, monkeypatch):
    import retrieval.ondisk as ondisk

    x = clustered(seed=2)
    write_shards(tmp_path / "embeddings", x)
    cfg = IndexConfig(nprobe=4)
    real = ondisk._write_index_atomic
    written = []

    def dies_on_second_part(index, path):
        if path.name == "part_00001.index":
            raise KeyboardInterrupt
        written.append(path.name)
        real(index, path)

    monkeypatch.setattr(ondisk, "_write_index_atomic", dies_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False)
    assert written == ["trained.index", "part_00000.index"] and not (tmp_path / "index.faiss").exists()
    with pytest.raises(ondisk.OnDiskBuildError, match="other settings"):  # unfinished work is never mixed
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF32,PQ4", cfg, progress=False)
    written.clear()
    monkeypatch.setattr(ondisk, "_write_index_atomic", lambda i, p: (written.append(p.name), real(i, p)))
    build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False)
    assert written == ["part_00001.index", "part_00002.index", "index.faiss"]  # training and part 0 reused
    assert load_ondisk(tmp_path).ntotal == N and not (tmp_path / "ivf_parts").exists()


def test_auto_choice_takes_hnsw_when_its_graph_is_cheap_enough(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # isotropic: IVF would scan most lists
    cfg = IndexConfig(flat_threshold=1000, target_recall=0.9)
    _, factory, _, _ = build_faiss_index(x, cfg, progress=False)
    assert factory == "Flat"  # at 6,000 vectors the graph walk costs more than a scan
    monkeypatch.setattr(index_mod, "GRAPH_DISTANCE_COST", 1)  # as if scans were as dear as graph steps
    index, factory, nprobe, recall = build_faiss_index(x, cfg, progress=False)
    assert factory == "HNSW32" and nprobe is None and recall >= 0.9
    _, ids = index.search(x[:5], 1)
    assert ids[:, 0].tolist() == list(range(5))
    assert build_faiss_index(x, IndexConfig(flat_threshold=1000, target_recall=0.9, hnsw=False),
                             progress=False)[1] == "Flat"
