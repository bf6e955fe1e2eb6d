"""Corpus readers: formats, and bad input refused with file/line/field in the message."""
import json

import pytest

from retrieval import CorpusError, CorpusSpec, Document, load_corpus, read_beir, read_jsonl, read_txt_folder
from retrieval.corpus import corpus_hash
from retrieval.evaluation import read_qrels


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_with_custom_fields(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"pid": 7, "head": "T", "body": "hello"}), "",
                                          json.dumps({"pid": 8, "body": "world"})])
    docs = read_jsonl(p, id_field="pid", title_field="head", text_field="body")
    assert docs == [Document("7", "T", "hello"), Document("8", "", "world")]


def test_beir_folder_and_auto_format(tmp_path):
    write_lines(tmp_path / "corpus.jsonl", [json.dumps({"_id": "a", "title": "x", "text": "one"}),
                                            json.dumps({"_id": "b", "title": "y", "text": "two"})])
    assert [d.id for d in read_beir(tmp_path)] == ["a", "b"]
    assert load_corpus(CorpusSpec(str(tmp_path))) == read_beir(tmp_path)


def test_txt_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    docs = load_corpus(CorpusSpec(str(tmp_path)))
    assert [(d.id, d.title, d.text) for d in docs] == [("a.txt", "a", "first"), ("sub/b.txt", "b", "second")]


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": ["p", "q"], "text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(CorpusSpec(str(tmp_path / "ds"), format="hf"))
    assert [(d.id, d.text) for d in docs] == [("p", "alpha"), ("q", "beta")]


def test_malformed_line_names_file_and_line(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 1, "text": "ok"}), '{"id": 2, "text": '])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: malformed JSON"):
        read_jsonl(p)


def test_missing_text_field_names_field_and_line(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 1, "text": "ok"}), json.dumps({"id": 2, "body": "x"})])
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: field 'text' is missing.*--text-field"):
        read_jsonl(p)


def test_missing_id_field(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": "ok"})])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: field 'id' is missing"):
        read_jsonl(p)


def test_duplicate_ids_name_both_lines(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "x", "text": "a"}), json.dumps({"id": "y", "text": "b"}),
                                           json.dumps({"id": "x", "text": "c"})])
    with pytest.raises(CorpusError, match=r"c\.jsonl:3: duplicate document id 'x' \(first seen at .*c\.jsonl:1\)"):
        read_jsonl(p)


def test_empty_corpus_refused(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [""])
    with pytest.raises(CorpusError, match="empty"):
        read_jsonl(p)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        read_txt_folder(tmp_path / "empty_dir")


def test_non_string_text_refused(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 1, "text": ["a"]})])
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: field 'text' must be a string"):
        read_jsonl(p)


def test_unknown_format_refused():
    with pytest.raises(CorpusError, match="unknown corpus format"):
        CorpusSpec("x", format="xml")


def test_corpus_hash_sees_content_and_boundaries():
    a = [Document("1", "", "ab"), Document("2", "", "c")]
    b = [Document("1", "", "a"), Document("2", "", "bc")]
    assert corpus_hash(a) == corpus_hash(list(a))
    assert corpus_hash(a) != corpus_hash(b)


def test_qrels_header_skipped_and_short_rows_refused(tmp_path):
    p = write_lines(tmp_path / "q.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2\t2"])
    assert read_qrels(p) == {"q1": {"d1": 1, "d2": 2}}
    bad = write_lines(tmp_path / "bad.tsv", ["q1\td1\t1", "q2\td3"])
    with pytest.raises(CorpusError, match=r"bad\.tsv:2: expected 3 tab-separated columns"):
        read_qrels(bad)
