"""BM25 over a chunk database against scores computed by hand; hybrid fusion against ranks computed by hand."""
import math

import numpy as np
import pytest

from retrieval.chunks import chunk_documents, write_chunk_db
from retrieval.corpus import Document
from retrieval.fusion import FusionConfig, fuse, parse_weights, reciprocal_rank_fusion, score_fusion
from retrieval.lexical import LexicalConfig, LexicalIndex, build_lexical
from retrieval.manifest import IncompleteIndexError, IndexMismatchError

DOCS = [
    Document("a", "", "apple banana apple"),
    Document("b", "", "banana cherry"),
    Document("c", "", "cherry cherry cherry date"),
    Document("d", "", "elderberry fig grape"),
]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in DOCS for w in d.text.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def chunk_dir(tmp_path):
    records = chunk_documents(DOCS, word_tokenizer(), 16, progress=False)  # one chunk per document
    write_chunk_db(tmp_path / "chunks", records, DOCS, {"corpus_hash": "x", "tokenizer": {"fingerprint": "w"}})
    return tmp_path


def hand_bm25(query: list[str], k1: float, b: float) -> np.ndarray:
    docs = [d.text.split() for d in DOCS]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = np.zeros(n)
    for term in query:
        df = sum(term in d for d in docs)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(term)
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return out


@pytest.mark.parametrize("k1, b", [(1.2, 0.75), (0.9, 0.4)])
def test_bm25_matches_hand_computed_scores(chunk_dir, k1, b):
    cfg = LexicalConfig(k1=k1, b=b, stemmer=None, stopwords=None, with_title=False)
    build_lexical(chunk_dir, cfg, progress=False)
    lex = LexicalIndex.load(chunk_dir)
    query = ["cherry", "banana"]
    expected = hand_bm25(query, k1, b)
    np.testing.assert_allclose(lex.scores("cherry banana"), expected, rtol=1e-5)

    scores, ids = lex.search(["cherry banana", "no such words", "apple"], 4)
    order = np.argsort(-expected, kind="stable")
    matched = order[expected[order] > 0]
    assert ids[0, :len(matched)].tolist() == matched.tolist()
    # b (both terms, short) > c (three cherries, long) > a (one banana); d shares no term and is not returned
    assert ids[0].tolist() == [1, 2, 0, -1] and np.isneginf(scores[0, 3])
    np.testing.assert_allclose(scores[0, :3], expected[[1, 2, 0]], rtol=1e-5)
    assert (ids[1] == -1).all()
    assert ids[2, 0] == 0 and (ids[2, 1:] == -1).all()


def test_bm25_rebuild_rules(chunk_dir):
    with pytest.raises(IncompleteIndexError, match="python -m retrieval lexical"):
        LexicalIndex.load(chunk_dir)
    cfg = LexicalConfig(stemmer=None, stopwords=None)
    first = build_lexical(chunk_dir, cfg, progress=False)
    assert build_lexical(chunk_dir, cfg, progress=False) == first  # finished with the same settings: reused
    with pytest.raises(IndexMismatchError, match="other settings"):
        build_lexical(chunk_dir, LexicalConfig(k1=2.0, stemmer=None, stopwords=None), progress=False)
    assert build_lexical(chunk_dir, LexicalConfig(k1=2.0, stemmer=None, stopwords=None), overwrite=True,
                         progress=False)["params"]["k1"] == 2.0
    (chunk_dir / "bm25" / "manifest.json").unlink()  # an interrupted build is not an index, and is redone
    with pytest.raises(IncompleteIndexError):
        LexicalIndex.load(chunk_dir)
    build_lexical(chunk_dir, cfg, progress=False)
    assert LexicalIndex.load(chunk_dir).num_chunks == 4


def test_stemming_and_stop_words(chunk_dir):
    build_lexical(chunk_dir, LexicalConfig(), progress=False)  # English stemmer and stop words
    _, ids = LexicalIndex.load(chunk_dir).search(["the cherries"], 2)
    assert ids[0].tolist() == [2, 1]


def test_reciprocal_rank_fusion_matches_hand_computed_ranks():
    a = np.array([[1, 2, 3]])
    b = np.array([[3, 1, 4]])
    ids, scores = reciprocal_rank_fusion([a, b], [1.0, 1.0], k=4, rrf_k=60)
    # 1: 1/61 + 1/62, 3: 1/63 + 1/61, 2: 1/62, 4: 1/63
    assert ids[0].tolist() == [1, 3, 2, 4]
    np.testing.assert_allclose(scores[0], [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63], rtol=1e-6)
    ids, _ = reciprocal_rank_fusion([a, b], [1.0, 3.0], k=4, rrf_k=60)
    # 3: 1/63 + 3/61 = .0650 > 1: 1/61 + 3/62 = .0648 > 4: 3/63 = .0476 > 2: 1/62 = .0161
    assert ids[0].tolist() == [3, 1, 4, 2]
    ids, _ = reciprocal_rank_fusion([a, b], [1.0, 1.0], k=2, rrf_k=0)  # 1: 1 + 1/2, 3: 1/3 + 1 -> tie-free
    assert ids[0].tolist() == [1, 3]


def test_score_fusion_matches_hand_computed_ranks():
    a = (np.array([[1, 2, 3, -1]]), np.array([[0.9, 0.5, 0.1, -np.inf]], np.float32))
    b = (np.array([[3, 1, 4, -1]]), np.array([[10.0, 4.0, 1.0, -np.inf]], np.float32))
    # minmax: a -> 1: 1, 2: .5, 3: 0; b -> 3: 1, 1: 1/3, 4: 0; absent = the list's minimum (0)
    ids, scores = score_fusion([a, b], [1.0, 1.0], k=5)
    assert ids[0].tolist() == [1, 3, 2, 4, -1]
    np.testing.assert_allclose(scores[0, :4], [4 / 3, 1, 0.5, 0], rtol=1e-6)
    ids, _ = score_fusion([a, b], [0.2, 1.0], k=4)  # 3: 1, 1: .2 + 1/3, 2: .1, 4: 0
    assert ids[0].tolist() == [3, 1, 2, 4]
    ids, _ = score_fusion([a, b], [1.0, 1.0], k=4, normalisation="zscore")
    assert ids[0, 0] == 1


def test_fusion_config_and_weights():
    lists = {"dense": (np.array([[5, 6]]), np.array([[0.9, 0.8]], np.float32)),
             "bm25": (np.array([[6, 7]]), np.array([[3.0, 2.0]], np.float32))}
    ids, _ = fuse(FusionConfig(weights={"dense": 1.0, "bm25": 0.0}), lists, 2)
    assert ids[0].tolist() == [5, 6]  # weight 0 leaves bm25 out
    ids, _ = fuse(FusionConfig(), lists, 3)
    assert ids[0].tolist() == [6, 5, 7]
    assert parse_weights("dense=0.7, bm25=0.3") == {"dense": 0.7, "bm25": 0.3}
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        parse_weights("dense:1")
    with pytest.raises(ValueError, match="fusion method"):
        FusionConfig(method="max")
