"""FAISS layer on random vectors: exact search equals numpy brute force; automatic factory choice; nprobe tuning."""
import faiss
import numpy as np
import pytest

from retrieval import IndexConfig, choose_factory
from retrieval.index import build_faiss_index, recall_at_k, search_index


def normalised(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_equals_numpy_brute_force():
    rng = np.random.default_rng(0)
    base, queries = normalised(rng, 2000, 48), normalised(rng, 50, 48)
    index, factory, nprobe, _ = build_faiss_index(base, IndexConfig(), progress=False)
    assert factory == "Flat" and nprobe is None
    scores, ids = search_index(index, queries, 10)

    ref_scores = queries @ base.T  # (Q, N)
    ref_ids = np.argsort(-ref_scores, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(ref_scores, ref_ids, 1), rtol=1e-5, atol=1e-5)
    # same ids in the same order, except where two scores tie to float precision
    mismatch = ids != ref_ids
    tied = np.isclose(np.take_along_axis(ref_scores, ids, 1), np.take_along_axis(ref_scores, ref_ids, 1), atol=1e-6)
    assert not (mismatch & ~tied).any()


def test_missing_results_are_padded():
    rng = np.random.default_rng(1)
    index, *_ = build_faiss_index(normalised(rng, 3, 8), IndexConfig(), progress=False)
    scores, ids = search_index(index, normalised(rng, 2, 8), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert (ids[:, :3] >= 0).all()


@pytest.mark.parametrize("n, budget_gb, expected", [
    (50_000, 8, "Flat"),
    (1_000_000, 8, "IVF2048,Flat"),
    (1_000_000, 1, "IVF2048,SQ8"),
    (1_000_000, 0.1, "IVF2048,PQ96"),
    (100_000_000, 1000, "IVF16384,Flat"),
])
def test_factory_choice_follows_size_and_budget(n, budget_gb, expected):
    factory = choose_factory(n, 384, memory_budget_gb=budget_gb)
    assert factory == expected
    faiss.index_factory(384, factory, faiss.METRIC_INNER_PRODUCT)  # a string faiss accepts


def test_ivf_tuned_nprobe_reaches_target_recall_on_clustered_data():
    rng = np.random.default_rng(2)
    centres = normalised(rng, 64, 32)
    x = centres[rng.integers(0, 64, 20_000)] + 0.15 * rng.standard_normal((20_000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = IndexConfig(flat_threshold=1000, target_recall=0.9)
    index, factory, nprobe, recall = build_faiss_index(x, cfg, progress=False)
    assert factory.startswith("IVF") and nprobe >= 1 and recall >= 0.9

    queries = x[rng.choice(len(x), 100, replace=False)] + 0.01 * rng.standard_normal((100, 32)).astype(np.float32)
    _, approx = search_index(index, queries, 10)
    _, exact = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert recall_at_k(approx, exact) >= 0.85


def test_invalid_configs_refused():
    with pytest.raises(ValueError, match="factory 'IVFx,Flat' is not a valid faiss.index_factory string"):
        IndexConfig(factory="IVFx,Flat")  # refused when the config is built, before anything is embedded
    # parses, and fits 384-d vectors, but not these 8-d ones: refused at build time, naming the width
    with pytest.raises(ValueError, match="factory 'PQ3' is not a valid faiss.index_factory string for 8-d"):
        build_faiss_index(np.zeros((4, 8), np.float32), IndexConfig(factory="PQ3"), progress=False)
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)


def test_trained_non_ivf_factory_builds_without_nprobe():
    rng = np.random.default_rng(3)
    x = normalised(rng, 3000, 16)
    index, factory, nprobe, recall = build_faiss_index(x, IndexConfig(factory="SQ8"), progress=False)
    assert factory == "SQ8" and nprobe is None and recall is None and index.ntotal == 3000
    _, ids = search_index(index, x[:20], 1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9  # a vector's own code is (almost always) its best match


def test_auto_choice_falls_back_to_exact_without_cluster_structure():
    rng = np.random.default_rng(4)
    x = normalised(rng, 6000, 64)  # isotropic: IVF would have to scan most lists
    index, factory, nprobe, _ = build_faiss_index(x, IndexConfig(flat_threshold=1000), progress=False)
    assert factory == "Flat" and nprobe is None
    _, ids = search_index(index, x[:5], 1)
    assert ids[:, 0].tolist() == list(range(5))
