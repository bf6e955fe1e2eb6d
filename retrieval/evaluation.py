"""Retrieval evaluation: a Retriever + judged queries -> quality numbers.

- BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): nDCG@10, recall@k and MRR@10 computed by
  `ir_measures`. The index holds chunks but qrels judge documents, so each document scores the max over its
  retrieved chunks, and more chunks than documents are retrieved (`chunk_depth`).
- QA JSONL (question, answers, passage_id): gold-passage recall@k over the top-k distinct documents, and answer
  recall@k (DPR style: a normalised answer string occurs in the normalised text of one of the top-k chunks).
"""
from __future__ import annotations

import csv
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


def evaluate_beir(retriever: Retriever, beir_dir: str | Path, split: str = "test", k: int = 100,
                  chunk_depth: int | None = None, limit: int | None = None, progress: bool = True) -> dict:
    """nDCG@10, R@k, RR@10 of the retriever on a BEIR folder's judged queries (those in qrels/<split>.tsv)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    d = Path(beir_dir)
    qrels_path = d / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise FileNotFoundError(f"{qrels_path}: no such qrels file; available splits: "
                                f"{sorted(p.stem for p in (d / 'qrels').glob('*.tsv'))}")
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


def evaluate_qa(retriever: Retriever, questions_path: str | Path, ks: Sequence[int] = (1, 5, 20),
                question_field: str = "question", answers_field: str = "answers", passage_field: str = "passage_id",
                limit: int | None = None, batch_size: int = 256, progress: bool = True) -> dict:
    """Gold-passage recall@k (top-k distinct documents) and answer recall@k (top-k chunks) over a QA JSONL."""
    recs = read_jsonl_records(questions_path, (question_field, answers_field, passage_field))[:limit]
    kmax = max(ks)
    gold_hits = {k: 0 for k in ks}
    answer_hits = {k: 0 for k in ks}
    depth = min(len(retriever), 10 * kmax)
    db = retriever.db
    for lo in tqdm(range(0, len(recs), batch_size), desc="searching", unit="batch", disable=not progress):
        batch = recs[lo:lo + batch_size]
        ids_b, _ = retriever.search_ids([r[question_field] for r in batch], depth)
        for rec, row in zip(batch, ids_b):
            row = row[row >= 0]
            ranked_docs = list(dict.fromkeys(db.doc_ids[db.doc[i]] for i in row))
            gold = str(rec[passage_field])
            flags = [has_answer(db.text(int(i)), rec[answers_field]) for i in row[:kmax]]
            for k in ks:
                gold_hits[k] += gold in ranked_docs[:k]
                answer_hits[k] += any(flags[:k])
    n = len(recs)
    out = {"questions": n}
    out.update({f"passage_recall@{k}": gold_hits[k] / n for k in ks})
    out.update({f"answer_recall@{k}": answer_hits[k] / n for k in ks})
    return out
