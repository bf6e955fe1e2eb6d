"""Asymmetric encoders, prompts and pooling recorded in the manifest; BM25 and hybrid through the Retriever; a
cross-encoder reranker. All models are tiny random BERTs built here."""
import json

import numpy as np
import pytest
import torch

from retrieval import BuildConfig, Document, IndexMismatchError, Retriever, build_index
from retrieval.encoders import pooling_mode, set_pooling
from retrieval.lexical import LexicalConfig
from retrieval.precompute import precompute_neighbours
from retrieval.rerank import RerankConfig, Reranker

TEXTS = {
    "j": ("Jupiter", "jupiter is the largest planet with a great red spot and many moons"),
    "b": ("Bread", "yeast makes bread dough rise by producing gas in the oven"),
    "v": ("Volcano", "a volcano erupts lava and ash from a magma chamber below"),
    "p": ("Penguins", "penguins swim in the cold southern ocean and eat fish"),
    "t": ("Tides", "tides are caused by the moon pulling the ocean"),
}
WORDS = sorted({w for title, text in TEXTS.values() for w in (title.lower() + " " + text).split()} |
               {"query", "passage", "largest", "which", "what", "causes"})


def write_vocab(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":"] + WORDS) + "\n")


def tiny_bert(folder, seed: int, head: bool = False):
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    write_vocab(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128, num_labels=1)
    model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    model.save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder


def tiny_encoder(folder, seed: int, pooling: str = "mean", prompts: dict | None = None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tiny_bert(folder / "hf", seed)
    word = Transformer(str(folder / "hf"))
    model = SentenceTransformer(modules=[word, Pooling(16, pooling_mode=pooling)], device="cpu",
                                prompts=prompts or {})
    model.save(str(folder / "st"))
    return SentenceTransformer(str(folder / "st"), device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(tiny_bert(root / "tok", 0)))
    return root, tok, tiny_encoder(root / "query", 1, pooling="cls"), tiny_encoder(root / "doc", 2, pooling="cls")


def docs():
    return [Document(i, title, text) for i, (title, text) in TEXTS.items()]


@pytest.fixture(scope="module")
def asymmetric(models):
    root, tok, q, d = models
    cfg = BuildConfig(chunk_size=6, query_prompt="query: ", document_prompt="passage: ",
                      lexical=LexicalConfig())
    out = root / "index"
    build_index(docs(), out, tokenizer=tok, embedder=d, query_embedder=q, config=cfg, progress=False)
    return out


def test_asymmetric_index_uses_both_encoders_and_prompts(models, asymmetric):
    root, tok, q, d = models
    man = json.loads((asymmetric / "manifest.json").read_text())
    assert man["encoding"]["query_prompt"] == "query: " and man["encoding"]["document_prompt"] == "passage: "
    assert man["encoding"]["normalize"] is False  # neither tiny model has a Normalize module: the model decides
    assert man["encoding"]["query_pooling"] == "cls" and man["query_encoder"] != man["embedder"]

    r = Retriever.load(asymmetric, embedder=q)
    stored = np.load(asymmetric / "embeddings" / "shard_00000.npy")
    texts = [r.db.embedding_text(i, True) for i in range(len(r.db))]
    np.testing.assert_allclose(stored, d.encode(["passage: " + t for t in texts]), atol=1e-5)  # document side
    assert not np.allclose(stored, q.encode(["passage: " + t for t in texts]), atol=1e-3)
    qv = r.encode(["which planet is largest"])
    np.testing.assert_allclose(qv, q.encode(["query: which planet is largest"]), atol=1e-5)  # query side

    ids, scores = r.search_ids(["which planet is largest"], 3)
    ref = (stored @ qv[0])  # the tiny random encoders score some chunks within float noise of each other
    np.testing.assert_allclose(scores[0], np.sort(ref)[::-1][:3], rtol=1e-4)  # the top three scores ...
    np.testing.assert_allclose(ref[ids[0]], scores[0], rtol=1e-4)  # ... of the chunks returned


def test_mismatched_query_encoder_is_refused(models, asymmetric, tmp_path):
    root, tok, q, d = models
    with pytest.raises(IndexMismatchError, match="query encoder"):
        Retriever.load(asymmetric, embedder=d)  # the document encoder is not the query encoder
    other_pooling = tiny_encoder(tmp_path / "q2", 1, pooling="cls")
    set_pooling(other_pooling, "mean")
    assert pooling_mode(other_pooling) == "mean"
    with pytest.raises(IndexMismatchError, match="'cls' pooling"):
        Retriever.load(asymmetric, embedder=other_pooling)  # same weights, other pooling


def test_model_prompts_are_used_when_none_given(models, tmp_path):
    root, tok, q, d = models
    e5 = tiny_encoder(tmp_path / "e5", 3, prompts={"query": "query: ", "passage": "passage: "})
    build_index(docs(), tmp_path / "i", tokenizer=tok, embedder=e5, config=BuildConfig(chunk_size=6),
                progress=False)
    man = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert man["encoding"]["query_prompt"] == "query: " and man["encoding"]["document_prompt"] == "passage: "
    assert man["query_encoder"] == man["embedder"]


def test_bm25_and_hybrid_through_the_retriever(models, asymmetric, tmp_path):
    root, tok, q, d = models
    bm25 = Retriever.load(asymmetric, retriever="bm25")
    res = bm25.search(["what causes the tides"], 2)
    assert res.doc_ids[0][0] == "t"  # lexical match on "causes"/"tides"
    dense = Retriever.load(asymmetric, embedder=q)
    hybrid = Retriever.load(asymmetric, embedder=q, retriever="hybrid")
    query = ["penguins swim in the ocean"]
    d_ids, _ = dense.search_ids(query, 50)
    l_ids, _ = bm25.search_ids(query, 50)
    h_ids, _ = hybrid.search_ids(query, 5)
    ranks = {}
    for row in (d_ids[0], l_ids[0]):
        for rank, c in enumerate(row[row >= 0], 1):
            ranks[int(c)] = ranks.get(int(c), 0) + 1 / (60 + rank)
    assert h_ids[0].tolist() == [c for c, _ in sorted(ranks.items(), key=lambda x: (-x[1], x[0]))][:5]

    # exclusion still holds, and the neighbours store records how they were found
    res = hybrid.search(query, 3, exclude_doc_ids=["p"])
    assert "p" not in res.doc_ids[0]
    store = precompute_neighbours(hybrid, query, tmp_path / "nb", 2, chunked=False, progress=False)
    assert store.manifest["retriever"]["kind"] == "hybrid"
    with pytest.raises(ValueError, match="search by text"):
        hybrid.search_vectors(np.zeros((1, 16), np.float32), 2)


def test_cross_encoder_reranks_first_stage(models, asymmetric, tmp_path):
    from sentence_transformers import CrossEncoder

    root, tok, q, d = models
    path = tiny_bert(tmp_path / "ce", 7, head=True)
    reranker = Reranker(CrossEncoder(str(path), device="cpu"), RerankConfig(str(path), depth=8))
    plain = Retriever.load(asymmetric, embedder=q)
    reranked = Retriever.load(asymmetric, embedder=q, reranker=reranker)
    query = "what causes the tides"
    first, _ = plain.search_ids([query], 8)
    ids, scores = reranked.search_ids([query], 8)
    texts = [plain.db.embedding_text(int(i), True) for i in first[0]]
    ce = CrossEncoder(str(path), device="cpu").predict([(query, t) for t in texts])
    expected = first[0][np.argsort(-ce, kind="stable")]
    assert ids[0].tolist() == expected.tolist()  # the cross-encoder's order of the first stage's top 8
    assert ids[0].tolist() != first[0].tolist()  # ... which differs from the first stage's
    np.testing.assert_allclose(scores[0], np.sort(ce)[::-1], rtol=1e-4, atol=1e-5)
    top3, _ = reranked.search_ids([query], 3)
    assert top3[0].tolist() == expected[:3].tolist()
    assert reranked.describe()["reranker"]["depth"] == 8


def test_run_config_and_run_identity_follow_the_retriever(models, asymmetric):
    from retrotune.config import ConfigError, RunConfig
    from retrotune.neighbours import index_hash

    assert RunConfig(retriever="hybrid").retriever == "hybrid" and RunConfig().retriever == "dense"
    with pytest.raises(ConfigError, match="retriever 'sparse' is unknown"):
        RunConfig(retriever="sparse")
    root, tok, q, d = models
    dense = Retriever.load(asymmetric, embedder=q)
    bm25 = Retriever.load(asymmetric, retriever="bm25")
    assert index_hash(dense) == index_hash(Retriever.load(asymmetric))  # dense: as before
    assert index_hash(dense) != index_hash(bm25)  # a run trained on BM25 neighbours is refused with dense ones


def test_cli_eval_one_table_over_datasets_and_retrievers(models, tmp_path, capsys):
    from retrieval.__main__ import main
    from retrieval.evaluation import evaluate_beir

    root, tok, q, d = models
    folders = []
    for name, ids, queries in (("one", "jbv", {"q1": ("which planet is largest", "j"),
                                               "q2": ("yeast bread oven", "b")}),
                               ("two", "ptv", {"q1": ("what causes the tides", "t"),
                                               "q2": ("lava and ash", "v")})):
        f = tmp_path / name
        (f / "qrels").mkdir(parents=True)
        (f / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": TEXTS[i][0], "text": TEXTS[i][1]})
                                                + "\n" for i in ids))
        (f / "queries.jsonl").write_text("".join(json.dumps({"_id": qid, "text": t}) + "\n"
                                                 for qid, (t, _) in queries.items()))
        (f / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{qid}\t{doc}\t1\n" for qid, (_, doc) in queries.items()))
        assert main(["build", "--corpus", str(f), "--out", str(f / "index"), "--tokenizer", str(root / "tok"),
                     "--embedder", str(root / "doc" / "st"), "--chunk-size", "6", "--retriever", "hybrid"]) == 0
        folders.append(f)
    capsys.readouterr()
    assert main(["eval", "--index", *(str(f / "index") for f in folders), "--beir", *map(str, folders),
                 "--split", "test", "--k", "3", "--retriever", "dense", "bm25", "hybrid", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["dataset"], r["retriever"]) for r in rows] == [(n, k) for n in ("one", "two")
                                                             for k in ("dense", "bm25", "hybrid")]
    direct = evaluate_beir(Retriever.load(folders[1] / "index", retriever="bm25"), folders[1], split="test", k=3,
                           progress=False)
    assert rows[4]["nDCG@10"] == direct["nDCG@10"] and rows[4]["recall@3"] == direct["recall@3"]
    assert main(["eval", "--index", str(folders[0] / "index"), "--beir", *map(str, folders)]) == 2
    assert "give one index per dataset" in capsys.readouterr().err
