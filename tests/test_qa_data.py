"""QA data loading, article-disjoint splits and data scales."""
import json

import pytest

from retrotune.qa import QADataError, load_qa, split_by_group, take


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_with_passage_ids_groups_by_article(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [
        {"id": "1", "question": "q1?", "answers": ["a"], "passage_id": "Rhine#0"},
        {"id": "2", "question": "q2?", "answers": ["b", "c"], "passage_id": "Rhine#3"},
        {"id": "3", "question": "q3?", "answers": ["d"], "passage_id": "Oxygen#1"},
    ])
    examples = load_qa(str(path))
    assert [e.group for e in examples] == ["Rhine", "Rhine", "Oxygen"]
    assert examples[1].answers == ("b", "c")
    split = split_by_group(examples, validation_groups=["Oxygen"])
    assert [e.id for e in split.validation] == ["3"]
    assert {e.group for e in split.train}.isdisjoint({e.group for e in split.validation})


def test_squad_json_layout(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "Normans", "paragraphs": [
        {"context": "...", "qas": [{"id": "x", "question": "Who?", "answers": [{"text": "Rollo", "answer_start": 0}]}]}]}]}))
    (example,) = load_qa(str(path))
    assert example.answers == ("Rollo",) and example.group == "Normans" and example.passage_id == "Normans#0"


def test_missing_answers_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "ok?", "answers": ["y"]}, {"question": "no answers?"}])
    with pytest.raises(QADataError, match=r"q\.jsonl, line 2: field 'answers' is missing"):
        load_qa(str(path))


def test_malformed_line_and_empty_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answers": ["b"]}\n{not json\n')
    with pytest.raises(QADataError, match="line 2: not valid JSON"):
        load_qa(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(QADataError, match="no QA examples"):
        load_qa(str(empty))


def test_random_split_is_seeded_and_article_disjoint():
    from retrotune.qa import QAExample

    examples = [QAExample(str(i), f"q{i}", ("a",), group=f"g{i % 8}") for i in range(80)]
    first, second = split_by_group(examples, seed=3), split_by_group(examples, seed=3)
    assert first.validation_groups == second.validation_groups and len(first.validation_groups) == 2
    assert {e.group for e in first.train}.isdisjoint(first.validation_groups)
    assert len(first.train) + len(first.validation) == 80


def test_data_scale_takes_a_seeded_subset():
    from retrotune.qa import QAExample

    examples = [QAExample(str(i), f"q{i}", ("a",), group="g") for i in range(50)]
    assert take(examples, 10, seed=1) == take(examples, 10, seed=1)
    assert len(take(examples, 10)) == 10 and take(examples, None) == examples
