"""Retrieval evaluation: a Retriever + judged queries -> quality numbers.

- BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): nDCG@10, recall@k and MRR@10 computed by
  `ir_measures`. The index holds chunks but qrels judge documents, so each document scores the max over its
  retrieved chunks, and more chunks than documents are retrieved (`chunk_depth`).
- QA JSONL (question, answers, gold passage id or list of ids; field names configurable): passage recall@k counts
  *documents* (passages): the retrieved chunks are reduced to their documents in rank order, each document once,
  and a question is a hit when one of its gold passages is among the first k documents. Answer recall@k counts
  *chunks* (DPR style): a normalised answer string occurs in the normalised text of one of the top-k chunks.
"""
from __future__ import annotations

import csv
import json
import re
import string
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .corpus import CorpusError, jsonl_records
from .retriever import Retriever


def read_jsonl_records(path: str | Path, required: Sequence[str]) -> list[dict]:
    out = []
    for where, rec in jsonl_records(Path(path)):
        for field in required:
            if field not in rec:
                raise CorpusError(f"{where}: field {field!r} is missing (fields present: {sorted(rec)})")
        out.append(rec)
    if not out:
        raise CorpusError(f"{path}: no records")
    return out


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (query-id, corpus-id, score; header line optional) -> {qid: {docid: relevance}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (lineno == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue
            if len(row) < 3:
                raise CorpusError(f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score)")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    if not qrels:
        raise CorpusError(f"{path}: no judgements")
    return qrels


def documents_by_max(retriever: Retriever, texts: Sequence[str], chunk_depth: int, batch_size: int = 256,
                     progress: bool = True) -> list[dict[str, float]]:
    """For each query, {document id: max chunk score} over its top `chunk_depth` chunks."""
    runs = []
    for lo in tqdm(range(0, len(texts), batch_size), desc="searching", unit="batch", disable=not progress):
        ids_b, scores_b = retriever.search_ids(texts[lo:lo + batch_size], min(chunk_depth, len(retriever)))
        for ids, scores in zip(ids_b, scores_b):
            docs: dict[str, float] = {}
            for i, s in zip(ids, scores):
                if i >= 0:
                    doc = retriever.db.doc_ids[retriever.db.doc[i]]
                    docs[doc] = max(docs.get(doc, -np.inf), float(s))
            runs.append(docs)
    return runs


def check_beir_folder(beir_dir: str | Path, split: str = "test") -> Path:
    """The qrels file of `split` in a BEIR folder, once the folder is known to hold queries.jsonl too (checked
    before an index is opened or a model loaded)."""
    d = Path(beir_dir)
    layout = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
    if not d.is_dir():
        raise CorpusError(f"{d}: no such BEIR folder; {layout}: give the folder of an unpacked BEIR dataset")
    if not (d / "queries.jsonl").is_file():
        raise CorpusError(f"{d}: no queries.jsonl; {layout}: give the folder of the whole unpacked dataset, or add "
                          f"its queries.jsonl ({{\"_id\", \"text\"}} per line)")
    qrels_path = d / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise CorpusError(f"{qrels_path}: no such qrels file; available splits: "
                          f"{sorted(p.stem for p in (d / 'qrels').glob('*.tsv'))}; pick one with --split")
    return qrels_path


def evaluate_beir(retriever: Retriever, beir_dir: str | Path, split: str = "test", k: int = 100,
                  chunk_depth: int | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """nDCG@10, R@k, RR@10 of the retriever on a BEIR folder's judged queries (those in qrels/<split>.tsv)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    d = Path(beir_dir)
    qrels_path = check_beir_folder(d, split)
    qrels = read_qrels(qrels_path)
    queries = {str(r["_id"]): r["text"] for r in read_jsonl_records(d / "queries.jsonl", ("_id", "text"))}
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise CorpusError(f"{qrels_path}: {len(missing)} query ids have no text in queries.jsonl (e.g. {missing[0]})")
    qids = sorted(qrels)[:limit] if limit else sorted(qrels)
    depth = chunk_depth or 10 * k
    runs = documents_by_max(retriever, [queries[q] for q in qids], depth, progress=progress)
    run = {q: docs for q, docs in zip(qids, runs)}
    measures = [nDCG @ 10, R @ k, RR @ 10]
    agg = ir_measures.calc_aggregate(measures, {q: qrels[q] for q in qids}, run)
    return {"queries": len(qids), "nDCG@10": agg[nDCG @ 10], f"recall@{k}": agg[R @ k], "MRR@10": agg[RR @ 10],
            "chunk_depth": depth}


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_NO_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def has_answer(text: str, answers: Sequence[str]) -> bool:
    padded = f" {normalize_answer(text)} "
    return any(f" {a} " in padded for a in (normalize_answer(x) for x in answers) if a)


def _gold_ids(rec: dict, field: str, where: str) -> list[str]:
    value = rec[field]
    values = value if isinstance(value, list) else [value]
    if not values or any(not isinstance(v, (str, int)) or isinstance(v, bool) for v in values):
        raise CorpusError(f"{where}: field {field!r} must be a passage id or a non-empty list of ids, got "
                          f"{json.dumps(value)[:80]}; pass --passage-field to name the gold passage field")
    return [str(v) for v in values]


def _answers(rec: dict, field: str, where: str) -> list[str]:
    value = rec[field]
    if isinstance(value, dict):  # SQuAD / Hugging Face layout {"text": [...], "answer_start": [...]}
        value = value.get("text", [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or any(not isinstance(v, str) for v in values):
        raise CorpusError(f"{where}: field {field!r} must be an answer string or a non-empty list of strings, got "
                          f"{json.dumps(value)[:80]}; pass --answers-field to name the answers field")
    return values


def evaluate_qa(retriever: Retriever, questions_path: str | Path, ks: Sequence[int] = (1, 5, 20),
                question_field: str = "question", answers_field: str = "answers", passage_field: str = "passage_id",
                limit: int | None = None, batch_size: int = 256, progress: bool = True) -> dict:
    """Passage recall@k (a gold passage among the top-k distinct documents; a record may list several gold
    passages, a hit on any counts) and answer recall@k (an answer in one of the top-k chunks) over a QA JSONL.
    Gold passage ids that are not documents of the index are counted in `gold_not_in_index`; when none is, the
    evaluation is refused (wrong field or another corpus)."""
    fields = (question_field, answers_field, passage_field)
    items = []
    for where, rec in jsonl_records(Path(questions_path)):
        if not isinstance(rec, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for field in fields:
            if field not in rec:
                raise CorpusError(f"{where}: field {field!r} is missing (fields present: {sorted(rec)}); name the "
                                  f"fields with --question-field, --answers-field and --passage-field")
        if not isinstance(rec[question_field], str):
            raise CorpusError(f"{where}: field {question_field!r} must be a string")
        items.append((rec[question_field], _answers(rec, answers_field, where), _gold_ids(rec, passage_field, where)))
        if limit and len(items) >= limit:
            break
    if not items:
        raise CorpusError(f"{questions_path}: no records")
    db = retriever.db
    known = set(db.doc_ids)
    missing = sorted({g for _, _, golds in items for g in golds if g not in known})
    if all(g not in known for _, _, golds in items for g in golds):
        raise CorpusError(f"{questions_path}: none of the gold passage ids in field {passage_field!r} (e.g. "
                          f"{items[0][2][0]!r}) is a document id of the index {retriever.directory} (e.g. "
                          f"{db.doc_ids[0]!r}); name the right field with --passage-field, or evaluate the index "
                          f"built from the matching corpus")
    kmax = max(ks)
    gold_hits = {k: 0 for k in ks}
    answer_hits = {k: 0 for k in ks}
    depth = min(len(retriever), 10 * kmax)
    for lo in tqdm(range(0, len(items), batch_size), desc="searching", unit="batch", disable=not progress):
        batch = items[lo:lo + batch_size]
        ids_b, _ = retriever.search_ids([q for q, _, _ in batch], depth)
        for (_, answers, golds), row in zip(batch, ids_b):
            row = row[row >= 0]
            ranked_docs = list(dict.fromkeys(db.doc_ids[db.doc[i]] for i in row))
            gold = set(golds)
            first = next((rank for rank, doc in enumerate(ranked_docs) if doc in gold), None)
            flags = [has_answer(db.text(int(i)), answers) for i in row[:kmax]]
            for k in ks:
                gold_hits[k] += first is not None and first < k
                answer_hits[k] += any(flags[:k])
    n = len(items)
    out = {"questions": n}
    out.update({f"passage_recall@{k}": gold_hits[k] / n for k in ks})
    out.update({f"answer_recall@{k}": answer_hits[k] / n for k in ks})
    out["gold_not_in_index"] = len(missing)
    return out
