"""Indexes past memory: the plan, an IVF-PQ index built shard by shard with its lists on disk (same results as the
same index in memory, searched within its budget, resumable), and the HNSW choice where IVF needs too many lists."""
import faiss
import numpy as np
import pytest

import retrieval.index as index_mod
from retrieval import IndexConfig
from retrieval.index import build_faiss_index, make_index, plan_index, set_nprobe
from retrieval.ondisk import (build_ondisk_index, exact_knn, load_ondisk, part_ranges, refine_search,
                              resident_bytes, stored_vectors)

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
    assert plan.on_disk and plan.factory == "IVF16384,PQ192"
    # past 65,536 lists the coarse quantizer is a graph: 2^32 vectors on disk -> 262,144 lists
    assert plan_index(2 ** 32, 384, cfg).factory == "IVF262144_HNSW32,PQ192"
    assert plan_index(10_000_000, 384, IndexConfig(memory_budget_gb=4, opq=True)).factory.startswith("OPQ192,")
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
    real = ondisk._write_atomic
    written = []

    def dies_on_second_part(path, write):
        if path.name == "part_00001.lists":
            raise KeyboardInterrupt
        written.append(path.name)
        real(path, write)

    monkeypatch.setattr(ondisk, "_write_atomic", dies_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False,
                           part_vectors=SHARD)
    assert written == ["trained.index", "part_00000.lists"] and not (tmp_path / "index.faiss").exists()
    with pytest.raises(ondisk.OnDiskBuildError, match="other settings"):  # unfinished work is never mixed
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF32,PQ4", cfg, progress=False,
                           part_vectors=SHARD)
    with pytest.raises(ondisk.OnDiskBuildError, match="other settings"):  # nor parts grouped another way
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False,
                           part_vectors=2 * SHARD)
    written.clear()
    monkeypatch.setattr(ondisk, "_write_atomic", lambda p, w: (written.append(p.name), real(p, w)))
    build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False, part_vectors=SHARD)
    assert written == ["part_00001.lists", "part_00002.lists", "index.faiss"]  # training and part 0 reused
    assert load_ondisk(tmp_path).ntotal == N and not (tmp_path / "ivf_parts").exists()


def test_a_damaged_part_is_refused_by_name_and_not_merged(tmp_path, monkeypatch):
    import retrieval.ondisk as ondisk

    write_shards(tmp_path / "embeddings", clustered(seed=2))
    cfg = IndexConfig(nprobe=4)
    real = ondisk._write_atomic

    def dies_at_the_merge(path, write):
        if path.name == "index.faiss":
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ondisk, "_write_atomic", dies_at_the_merge)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False,
                           part_vectors=SHARD)
    monkeypatch.setattr(ondisk, "_write_atomic", real)
    part = tmp_path / "ivf_parts" / "part_00001.lists"
    part.write_bytes(part.read_bytes()[:-5])
    with pytest.raises(ondisk.OnDiskBuildError, match="part_00001.lists: not a complete part"):
        build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False,
                           part_vectors=SHARD)
    assert not (tmp_path / "index.faiss").exists()
    part.unlink()  # as the message says: the rerun adds it again
    build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16,PQ4", cfg, progress=False, part_vectors=SHARD)
    assert load_ondisk(tmp_path).ntotal == N


def test_parts_group_consecutive_shards_up_to_their_size():
    assert part_ranges([1000, 1000, 1000], 1000) == [(0, 1), (1, 2), (2, 3)]
    assert part_ranges([1000, 1000, 1000], 2500) == [(0, 2), (2, 3)]
    assert part_ranges([1000, 1000, 500], 2500) == [(0, 3)]
    assert part_ranges([3000, 10], 1000) == [(0, 1), (1, 2)]  # a shard larger than a part is a part of its own
    assert part_ranges([], 1000) == []


def test_grouped_parts_give_the_same_index_as_one_part_per_shard(tmp_path):
    faiss.omp_set_num_threads(1)
    x = clustered(seed=3)
    results = []
    for part_vectors in (SHARD, 2 * SHARD, N):
        d = tmp_path / f"p{part_vectors}"
        write_shards(d / "embeddings", x)
        build_ondisk_index(d, d / "embeddings", N, "IVF16,PQ4", IndexConfig(nprobe=4), progress=False,
                           part_vectors=part_vectors)
        index = load_ondisk(d)
        set_nprobe(index, 4)
        assert index.ntotal == N
        results.append(index.search(clustered(seed=4, n=30), 10))
    for scores, ids in results[1:]:
        np.testing.assert_array_equal(ids, results[0][1])
        np.testing.assert_allclose(scores, results[0][0], rtol=1e-6)


def test_tuner_rescores_deeper_where_more_probes_stop_helping(tmp_path):
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, 32)).astype(np.float32)  # isotropic 32-d in 4-byte codes: a low ceiling
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_shards(tmp_path / "a" / "embeddings", x)
    write_shards(tmp_path / "b" / "embeddings", x)
    fixed = build_ondisk_index(tmp_path / "a", tmp_path / "a" / "embeddings", N, "IVF16,PQ4",
                               IndexConfig(refine=1, target_recall=0.95), progress=False, shard_size=SHARD)
    _, _, refine_fixed, recall_fixed = fixed
    assert refine_fixed == 1 and recall_fixed < 0.6  # without re-scoring the codes cap recall
    _, nprobe, refine, recall = build_ondisk_index(tmp_path / "b", tmp_path / "b" / "embeddings", N, "IVF16,PQ4",
                                                   IndexConfig(refine=2, target_recall=0.95), progress=False,
                                                   shard_size=SHARD)
    assert refine > 2 and recall >= 0.95 and nprobe <= 16


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


def test_a_pilot_graph_rules_hnsw_out_before_the_full_graph_is_built(monkeypatch):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(index_mod, "PILOT_ABOVE", 3000)
    monkeypatch.setattr(index_mod, "PILOT_MIN_VECTORS", 1500)
    real, calls = index_mod._tuned_hnsw, []

    def recorded(vectors, cfg, seed, progress, affordable, ef):
        got = real(vectors, cfg, seed, progress, affordable, ef)
        calls.append((len(vectors), affordable, ef, None if got is None else got[1]))
        return got

    monkeypatch.setattr(index_mod, "_tuned_hnsw", recorded)
    cfg = IndexConfig(flat_threshold=1000, target_recall=0.9)
    assert index_mod.build_hnsw_if_faster(x, cfg, progress=False) is None
    assert calls == [(1500, 6000 / index_mod.GRAPH_DISTANCE_COST, 16, None)]  # the 6,000-vector graph never built
    calls.clear()
    monkeypatch.setattr(index_mod, "GRAPH_DISTANCE_COST", 1)
    index, factory, _, recall = index_mod.build_hnsw_if_faster(x, cfg, progress=False)
    assert [c[0] for c in calls] == [1500, 6000] and recall >= 0.9 and factory == "HNSW32"
    assert calls[1][2] == calls[0][3] and index.hnsw.efSearch >= calls[0][3]  # the full graph starts at the pilot's


def test_an_automatic_ivf_stops_tuning_once_exact_search_is_cheaper(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    probes = []
    real = index_mod.set_nprobe
    monkeypatch.setattr(index_mod, "set_nprobe", lambda index, nprobe: (probes.append(nprobe), real(index, nprobe)))
    cfg = IndexConfig(flat_threshold=1000, target_recall=0.99, hnsw=False)
    assert build_faiss_index(x, cfg, progress=False)[1] == "Flat"
    nlist = int(index_mod.choose_factory(6000, 64, cfg.memory_budget_gb, 1000).split(",")[0][3:])
    assert max(probes) == 2 * (nlist // 8) < nlist  # never scanned every list to find that out


def test_an_hnsw_coarse_quantizer_walks_wide_enough_to_find_the_lists(tmp_path):
    faiss.omp_set_num_threads(1)
    x = clustered(seed=8)
    index = make_index(D, "IVF16_HNSW32,Flat")
    index.train(x)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    assert quantizer.hnsw.efSearch == 16  # faiss' default
    set_nprobe(index, 4)
    assert quantizer.hnsw.efSearch == index_mod.QUANTIZER_EF_SEARCH
    set_nprobe(index, 300)
    assert quantizer.hnsw.efSearch == 300  # never narrower than the lists asked for
    flat = make_index(D, "IVF16,Flat")
    flat.train(x)
    set_nprobe(flat, 4)  # a flat quantizer has no walk to widen
    assert faiss.extract_index_ivf(flat).nprobe == 4
    write_shards(tmp_path / "embeddings", x)
    build_ondisk_index(tmp_path, tmp_path / "embeddings", N, "IVF16_HNSW32,PQ4", IndexConfig(nprobe=4), progress=False)
    disk = load_ondisk(tmp_path)  # held: the quantizer below belongs to it
    stored = faiss.downcast_index(faiss.extract_index_ivf(disk).quantizer)
    assert stored.hnsw.efSearch == index_mod.QUANTIZER_EF_SEARCH  # vectors were assigned with the wide walk
