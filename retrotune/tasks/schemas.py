"""Task adapters: rows in each task's public schema -> `QAExample`s.

- NQ-open (`google-research-datasets/nq_open`): {question, answer: [aliases]}.
- TriviaQA (`mandarjoshi/trivia_qa`, `rc.nocontext`): {question, question_id, answer: {value, aliases, ...}};
  the original release's JSON ({Data: [{Question, QuestionId, Answer: {Value, Aliases}}]}) too.
- SCROLLS (`tau/scrolls`: narrative_qa, qasper, quality, qmsum): {id, pid, input, output}, one row per reference
  answer; `input` is the query, a blank line, then the document (QuALITY: the question, its options "(A) ..." one a
  line, a blank line, the article). Rows of one id are one example whose answers are all their outputs.
- The original releases, where their fields differ from SCROLLS:
  NarrativeQA (`deepmind/narrativeqa`): {document: {id, text, summary: {title}}, question: {text}, answers: [{text}]};
  Qasper (`allenai/qasper`, or the release JSON {paper_id: {...}}): one paper with its questions;
  QuALITY (the release JSONL): {article_id, title, article, questions: [{question, options, gold_label (1-4)}]};
  QMSum (the release JSON, one meeting a file): {meeting_transcripts, general_query_list, specific_query_list}.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Iterable

from retrotune.qa import QADataError, QAExample

LETTERS = "ABCDEFGH"
SCROLLS_FIELDS = ("id", "input", "output")


def _need(row: dict, name: str, where: str, schema: str):
    if name not in row or row[name] is None:
        raise QADataError(f"{where}: field {name!r} is missing; {schema}")
    return row[name]


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise QADataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _list(value, where: str, name: str, item: type | None = None) -> list:
    """A list field (a JSON array): a string or a mapping in its place is refused, not iterated letter by letter;
    `item` checks each element's type too."""
    if not isinstance(value, (list, tuple)):
        raise QADataError(f"{where}: field {name!r} must be a list, got {type(value).__name__} {str(value)[:40]!r}")
    for i, element in enumerate(value):
        if item is not None and not isinstance(element, item):
            raise QADataError(f"{where}: field {name!r}[{i}] must be a {_KINDS.get(item, item.__name__)}, got "
                              f"{type(element).__name__}")
    return list(value)


_KINDS = {str: "string", dict: "mapping", list: "list"}


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(OrderedDict((v.strip(), None) for v in values if isinstance(v, str) and v.strip()))


def _doc_id(text: str) -> str:
    return "doc-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def is_scrolls(row: dict) -> bool:
    return all(name in row for name in SCROLLS_FIELDS)


def _scrolls_groups(rows, schema: str):
    """SCROLLS rows grouped by id, in first-seen order: (where, first row, [outputs])."""
    groups: dict[str, list] = OrderedDict()
    for where, row in rows:
        key = str(_need(row, "id", where, schema))
        _text(_need(row, "input", where, schema), where, "input")
        output = row.get("output")
        if key not in groups:
            groups[key] = [where, row, []]
        if isinstance(output, str) and output.strip():
            groups[key][2].append(output)
    return groups.values()


def _split_query(text: str, where: str) -> tuple[str, str]:
    query, sep, document = text.partition("\n\n")
    if not sep or not document.strip():
        raise QADataError(f"{where}: field 'input' has no blank line between the query and the document; SCROLLS "
                          f"inputs are 'query\\n\\ndocument'")
    return query.strip(), document.strip()


# ---- open-domain QA ----

def read_nq_open(rows) -> list[QAExample]:
    schema = "an NQ-open row has 'question' and 'answer' (a list of strings)"
    out = []
    for i, (where, row) in enumerate(rows):
        question = _text(_need(row, "question", where, schema), where, "question")
        answers = row.get("answer", row.get("answers"))
        if answers is None:
            raise QADataError(f"{where}: field 'answer' is missing; {schema}")
        answers = _unique(_list(answers, where, "answer", str))
        if not answers:
            raise QADataError(f"{where}: field 'answer' is empty; give at least one gold answer")
        key = str(row.get("id", i))
        out.append(QAExample(id=key, question=question, answers=answers, group=key))
    return out


def _trivia_answers(answer: dict, where: str) -> tuple[str, ...]:
    value = answer.get("value", answer.get("Value"))
    aliases = _list(answer.get("aliases", answer.get("Aliases")) or [], where, "answer.aliases", str)
    answers = _unique([value, *aliases])
    if not answers:
        raise QADataError(f"{where}: field 'answer' has no 'value' or 'aliases'; a TriviaQA answer is "
                          f"{{value, aliases: [...]}}")
    return answers


def read_triviaqa(rows) -> list[QAExample]:
    schema = "a TriviaQA row has 'question', 'question_id' and 'answer' ({value, aliases})"
    out = []
    for i, (where, row) in enumerate(rows):
        if "Data" in row and isinstance(row["Data"], list):  # the original release: one JSON of all questions
            out += read_triviaqa([(f"{where}, Data[{j}]", r) for j, r in enumerate(row["Data"])])
            continue
        question = _text(row.get("question", row.get("Question")) or _need(row, "question", where, schema),
                         where, "question")
        answer = row.get("answer", row.get("Answer"))
        if not isinstance(answer, dict):
            raise QADataError(f"{where}: field 'answer' is missing or not a mapping; {schema}")
        key = str(row.get("question_id", row.get("QuestionId", i)))
        out.append(QAExample(id=key, question=question, answers=_trivia_answers(answer, where), group=key))
    return out


# ---- long-document QA ----

def _scrolls_examples(rows, schema: str) -> list[QAExample]:
    out = []
    for where, row, outputs in _scrolls_groups(rows, schema):
        query, document = _split_query(row["input"], where)
        doc = _doc_id(document)
        out.append(QAExample(id=str(row["id"]), question=query, answers=_unique(outputs), group=doc,
                             document_id=doc, document=document))
    return out


def read_narrativeqa(rows) -> list[QAExample]:
    rows = list(rows)
    schema = ("a NarrativeQA row is SCROLLS' {id, pid, input, output} or the original {document: {id, text}, "
              "question: {text}, answers: [{text}]}")
    if rows and is_scrolls(rows[0][1]):
        return _scrolls_examples(rows, schema)
    out = []
    for i, (where, row) in enumerate(rows):
        document = _need(row, "document", where, schema)
        question = _need(row, "question", where, schema)
        if not isinstance(document, dict) or "text" not in document:
            raise QADataError(f"{where}: field 'document' must be a mapping with 'text' (and 'id'); {schema}")
        text = question.get("text") if isinstance(question, dict) else question
        answers = _unique(a.get("text") if isinstance(a, dict) else a
                          for a in _list(_need(row, "answers", where, schema), where, "answers"))
        if not answers:
            raise QADataError(f"{where}: field 'answers' is empty; give at least one reference answer")
        doc = str(document.get("id") or _doc_id(document["text"]))
        title = (document.get("summary") or {}).get("title") or ""
        out.append(QAExample(id=str(row.get("id", f"{doc}-{i}")), question=_text(text, where, "question.text"),
                             answers=answers, group=doc, document_id=doc, document_title=title,
                             document=document["text"]))
    return out


def qasper_answer(answer: dict) -> str:
    """One annotator's answer as a string, as SCROLLS converts it: 'Unanswerable', 'Yes'/'No', the extractive
    spans joined by ', ', or the free-form answer."""
    if answer.get("unanswerable"):
        return "Unanswerable"
    if answer.get("yes_no") is not None:
        return "Yes" if answer["yes_no"] else "No"
    if answer.get("extractive_spans"):
        return ", ".join(answer["extractive_spans"])
    return answer.get("free_form_answer") or ""


def _qasper_paper(key: str, paper: dict, where: str) -> list[QAExample]:
    schema = "a Qasper paper has 'title', 'abstract', 'full_text' and 'qas'"
    full_text = _need(paper, "full_text", where, schema)
    if isinstance(full_text, dict):  # the Hugging Face layout: columns of sections
        sections = list(zip(full_text.get("section_name", []), full_text.get("paragraphs", [])))
    else:
        sections = [(s.get("section_name"), _list(s.get("paragraphs", []), where, "full_text.paragraphs", str))
                    for s in _list(full_text, where, "full_text", dict)]
    parts = [paper.get("title") or "", paper.get("abstract") or ""]
    parts += [f"{name or ''}\n" + "\n".join(paragraphs) for name, paragraphs in sections]
    document = "\n\n".join(p for p in parts if p.strip())
    qas = _need(paper, "qas", where, schema)
    if isinstance(qas, dict):  # columns -> rows
        qas = [{"question": q, "question_id": qid, "answers": a}
               for q, qid, a in zip(qas.get("question", []), qas.get("question_id", []), qas.get("answers", []))]
    out = []
    for j, qa in enumerate(_list(qas, where, "qas", dict)):
        annotations = qa.get("answers") or []
        if isinstance(annotations, dict):  # HF: {answer: [...], annotation_id: [...], ...}
            annotations = [{"answer": a} for a in annotations.get("answer", [])]
        answers = _unique(qasper_answer(a.get("answer", a)) for a in annotations)
        if not answers:
            raise QADataError(f"{where}, question {j}: no annotated answer; every Qasper question needs one")
        question = _text(_need(qa, "question", f"{where}, question {j}", schema), f"{where}, question {j}", "question")
        out.append(QAExample(id=str(qa.get("question_id", f"{key}-{j}")), question=question, answers=answers,
                             group=key, document_id=key, document_title=paper.get("title") or "",
                             document=document))
    return out


def read_qasper(rows) -> list[QAExample]:
    rows = list(rows)
    schema = "a Qasper row is SCROLLS' {id, pid, input, output}, or a paper {id, title, abstract, full_text, qas}"
    if rows and is_scrolls(rows[0][1]):
        return _scrolls_examples(rows, schema)
    out = []
    for where, row in rows:
        if "full_text" in row:
            out += _qasper_paper(str(row.get("id", row.get("_file", where))), row, where)
            continue
        papers = {k: v for k, v in row.items() if k != "_file" and isinstance(v, dict) and "full_text" in v}
        if not papers:  # the release JSON: {paper_id: paper}
            raise QADataError(f"{where}: not a Qasper record; {schema}, or the release's {{paper_id: paper}}")
        for key, paper in papers.items():
            out += _qasper_paper(key, paper, f"{where}, paper {key}")
    return out


def split_options(text: str, where: str) -> tuple[str, tuple[str, ...], str]:
    """A SCROLLS QuALITY input 'question\n\n(A) ...\n(B) ...\n\narticle' -> (question, options, article)."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if re.match(r"\s*\(A\)\s", line)), None)
    if first is None:
        raise QADataError(f"{where}: no options '(A) ...' after the question; a QuALITY input lists its options "
                          f"one a line as (A) ... (D) before the article")
    options, end = [], first
    for end in range(first, len(lines)):
        match = re.match(rf"\s*\({LETTERS[len(options)]}\)\s*(.*)$", lines[end]) if len(options) < len(LETTERS) \
            else None
        if not match:
            break
        options.append(match.group(1).strip())
    else:
        end = len(lines)
    document = "\n".join(lines[end:]).strip()
    if not document:
        raise QADataError(f"{where}: field 'input' holds no article after the options; SCROLLS QuALITY inputs are "
                          f"'question\\n\\n(A) ...\\n(D) ...\\n\\narticle'")
    return "\n".join(lines[:first]).strip(), tuple(options), document


def _label(output: str, options: tuple[str, ...], where: str) -> int:
    text = re.sub(r"^\s*\(?([A-H])\)\s*", "", output).strip()
    for i, option in enumerate(options):
        if option.strip() == text:
            return i
    raise QADataError(f"{where}: output {output[:60]!r} is none of the options {list(options)}; the output must be "
                      f"the text of the correct option")


def read_quality(rows) -> list[QAExample]:
    rows = list(rows)
    schema = ("a QuALITY row is SCROLLS' {id, pid, input, output} or the release's {article_id, title, article, "
              "questions: [{question, options, gold_label}]}")
    out = []
    if rows and is_scrolls(rows[0][1]):
        for where, row, outputs in _scrolls_groups(rows, schema):
            question, options, document = split_options(row["input"], where)
            label = _label(outputs[0], options, where) if outputs else None
            doc = _doc_id(document)
            out.append(QAExample(id=str(row["id"]), question=question, answers=tuple(outputs[:1]) or ("",),
                                 group=doc, document_id=doc, document=document, options=options, label=label))
        return out
    for where, row in rows:
        article = _text(_need(row, "article", where, schema), where, "article")
        doc = str(row.get("article_id") or _doc_id(article))
        for j, q in enumerate(_list(_need(row, "questions", where, schema), where, "questions", dict)):
            here = f"{where}, question {j}"
            options = tuple(_list(_need(q, "options", here, schema), here, "options", str))
            if len(options) < 2:
                raise QADataError(f"{here}: field 'options' holds {len(options)} option(s); a multiple-choice "
                                  f"question needs 2 to {len(LETTERS)}")
            gold = q.get("gold_label")
            if gold is not None and not (isinstance(gold, int) and 1 <= gold <= len(options)):
                raise QADataError(f"{here}: gold_label {gold!r} must be 1..{len(options)} (1-based, as released)")
            label = gold - 1 if gold is not None else None
            question = _text(_need(q, "question", here, schema), here, "question")
            out.append(QAExample(id=str(q.get("question_unique_id", f"{doc}-{j}")), question=question,
                                 answers=(options[label],) if label is not None else ("",), group=doc,
                                 document_id=doc, document_title=row.get("title") or "", document=article,
                                 options=options, label=label))
    return out


def read_qmsum(rows) -> list[QAExample]:
    rows = list(rows)
    schema = ("a QMSum row is SCROLLS' {id, pid, input, output}, or the release's meeting {meeting_transcripts, "
              "general_query_list, specific_query_list}")
    if rows and is_scrolls(rows[0][1]):
        return _scrolls_examples(rows, schema)
    out = []
    for i, (where, row) in enumerate(rows):
        turns = _list(_need(row, "meeting_transcripts", where, schema), where, "meeting_transcripts", dict)
        document = "\n".join(f"{t.get('speaker', '')}: {t.get('content', '')}" for t in turns)
        meeting = str(row.get("meeting_id") or row.get("_file") or _doc_id(document))
        queries = [q for name in ("general_query_list", "specific_query_list")
                   for q in _list(row.get(name) or [], where, name, dict)]
        if not queries:
            raise QADataError(f"{where}: no general_query_list or specific_query_list; {schema}")
        for j, q in enumerate(queries):
            here = f"{where}, query {j}"
            answer = _text(_need(q, "answer", here, "each query has 'query' and 'answer'"), here, "answer")
            query = _text(_need(q, "query", here, "each query has 'query' and 'answer'"), here, "query")
            out.append(QAExample(id=f"{meeting}-{j}", question=query,
                                 answers=(answer,), group=meeting, document_id=meeting, document=document))
    return out
