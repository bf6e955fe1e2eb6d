"""Tiny data sets in each task's real schema, written by the tests (no downloads): a few examples each, about three
short documents, so that adapters, document-scoped retrieval and the whole grid run on a CPU in seconds."""
import json
from pathlib import Path

DOCS = {
    "rivers": ("Rivers", "The Rhine flows from the Alps to the North Sea. Barges carry coal and grain along the "
                         "Rhine. The river passes Basel, Cologne and Rotterdam before it reaches the sea."),
    "stars": ("Stars", "A star burns hydrogen into helium in its core. Red giants are old stars that have swollen. "
                       "The Sun is a yellow dwarf about halfway through its life."),
    "bread": ("Bread", "Bakers mix flour, water, salt and yeast. The dough rises while the yeast makes gas. Sourdough "
                       "uses a starter of wild yeast instead of baker's yeast."),
}
CORPUS = [{"id": f"{key}#{i}", "title": title, "text": sentence.strip() + "."}
          for key, (title, text) in DOCS.items() for i, sentence in enumerate(text.split(". ")) if sentence.strip()]

OPEN_QA = [("Where does the Rhine flow to?", ["the North Sea", "North Sea"]),
           ("What do stars burn in their core?", ["hydrogen"]),
           ("What does sourdough use instead of baker's yeast?", ["a starter of wild yeast", "wild yeast"]),
           ("Which city does the Rhine pass before the sea?", ["Rotterdam"]),
           ("What kind of star is the Sun?", ["a yellow dwarf", "yellow dwarf"]),
           ("What do bakers mix?", ["flour, water, salt and yeast"])]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _splits(folder: Path, rows: list, name: str = "{split}.jsonl") -> Path:
    half = len(rows) // 2
    write_jsonl(folder / name.format(split="train"), rows[:half])
    write_jsonl(folder / name.format(split="validation"), rows[half:])
    return folder


def nq_open(folder: Path) -> Path:
    return _splits(folder, [{"question": q, "answer": a} for q, a in OPEN_QA])


def triviaqa_row(i: int, question: str, answers: list[str]) -> dict:
    """The Hugging Face `trivia_qa` (rc.nocontext) row layout."""
    return {"question": question, "question_id": f"tc_{i}", "question_source": "http://example.org",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                               "search_context": []},
            "answer": {"aliases": answers[1:] + [answers[0].upper()],
                       "normalized_aliases": [a.lower() for a in answers],
                       "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                       "normalized_value": answers[0].lower(), "type": "WikipediaEntity", "value": answers[0]}}


def triviaqa(folder: Path) -> Path:
    return _splits(folder, [triviaqa_row(i, q, a) for i, (q, a) in enumerate(OPEN_QA)])


def document(key: str) -> str:
    return DOCS[key][1]


def scrolls(folder: Path, task: str) -> Path:
    """SCROLLS rows {id, pid, input, output}: the query, a blank line, the document; one row per reference."""
    questions = {
        "narrativeqa": [("rivers", "Where does the Rhine end?", ["In the North Sea.", "the North Sea"]),
                        ("stars", "What is the Sun?", ["A yellow dwarf."]),
                        ("bread", "What makes the dough rise?", ["Gas from the yeast.", "the yeast"]),
                        ("rivers", "What do barges carry?", ["Coal and grain."])],
        "qasper": [("stars", "What do stars burn?", ["hydrogen", "Hydrogen into helium"]),
                   ("bread", "Is salt used?", ["Yes"]),
                   ("rivers", "Which cities does the river pass?", ["Basel, Cologne, Rotterdam"]),
                   ("stars", "Are red giants young?", ["No"])],
        "qmsum": [("rivers", "Summarise the discussion of river transport.", ["Barges carry coal and grain.",
                                                                               "They discussed barges."]),
                  ("bread", "What was said about sourdough?", ["Sourdough uses wild yeast."]),
                  ("stars", "Summarise the part about the Sun.", ["The Sun is a yellow dwarf."]),
                  ("bread", "What did the bakers mix?", ["Flour, water, salt and yeast."])],
    }[task]
    rows = []
    for i, (key, question, outputs) in enumerate(questions):
        for j, output in enumerate(outputs):
            rows.append({"id": f"{task}-{i}", "pid": f"{task}-{i}_{j}", "input": f"{question}\n\n{document(key)}",
                         "output": output})
    by_id = sorted({r["id"] for r in rows})
    train = [r for r in rows if by_id.index(r["id"]) < 2]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", [r for r in rows if r not in train])
    return folder


QUALITY = [("rivers", "Where does the Rhine begin?", ["In the Alps", "In the North Sea", "In Basel", "In Cologne"], 1),
           ("stars", "What are red giants?", ["Young stars", "Old swollen stars", "Yellow dwarfs", "Planets"], 2),
           ("bread", "What does sourdough use?", ["Baker's yeast", "No yeast", "A wild yeast starter", "Salt only"], 3),
           ("rivers", "What do barges carry?", ["Coal and grain", "Oil", "People", "Nothing"], 1)]


def quality_scrolls(folder: Path) -> Path:
    rows = []
    for i, (key, question, options, gold) in enumerate(QUALITY):
        listed = "\n".join(f"({'ABCD'[j]}) {o}" for j, o in enumerate(options))
        rows.append({"id": f"q-{i}", "pid": f"q-{i}_0", "input": f"{question}\n\n{listed}\n\n{document(key)}",
                     "output": options[gold - 1]})
    return _splits(folder, rows)


def quality_release(path: Path) -> Path:
    """The QuALITY release JSONL: one article a line with its questions; gold_label is 1-based."""
    articles = {}
    for i, (key, question, options, gold) in enumerate(QUALITY):
        article = articles.setdefault(key, {"article_id": key, "set_unique_id": f"{key}_set", "title": DOCS[key][0],
                                            "author": "fixture", "article": document(key), "questions": []})
        article["questions"].append({"question": question, "question_unique_id": f"{key}_q{i}", "options": options,
                                     "gold_label": gold, "writer_label": gold, "difficult": 0})
    return write_jsonl(path, list(articles.values()))


def narrativeqa_release(path: Path) -> Path:
    """The Hugging Face `deepmind/narrativeqa` row layout."""
    rows = [{"document": {"id": key, "kind": "gutenberg", "url": "", "file_size": 1, "word_count": 1, "start": "",
                          "end": "", "summary": {"text": "", "tokens": [], "url": "", "title": DOCS[key][0]},
                          "text": document(key)},
             "question": {"text": q, "tokens": q.split()}, "answers": [{"text": a, "tokens": a.split()} for a in ans]}
            for key, q, ans in [("rivers", "Where does the Rhine end?", ["the North Sea", "In the North Sea."]),
                                ("stars", "What is the Sun?", ["A yellow dwarf."])]]
    return write_jsonl(path, rows)


def qasper_paper(key: str) -> dict:
    """One paper in the `allenai/qasper` Hugging Face layout (columns of sections and questions)."""
    return {"id": key, "title": DOCS[key][0], "abstract": DOCS[key][1].split(". ")[0] + ".",
            "full_text": {"section_name": ["Introduction"], "paragraphs": [[DOCS[key][1]]]},
            "qas": {"question": ["What is it about?", "Is it long?"], "question_id": [f"{key}-q0", f"{key}-q1"],
                    "nlp_background": ["", ""], "topic_background": ["", ""], "paper_read": ["", ""],
                    "search_query": ["", ""], "question_writer": ["", ""],
                    "answers": [{"answer": [{"unanswerable": False, "extractive_spans": [DOCS[key][0]],
                                             "yes_no": None, "free_form_answer": "", "evidence": [],
                                             "highlighted_evidence": []},
                                            {"unanswerable": False, "extractive_spans": [], "yes_no": None,
                                             "free_form_answer": f"about {DOCS[key][0].lower()}", "evidence": [],
                                             "highlighted_evidence": []}],
                                 "annotation_id": ["a", "b"], "worker_id": ["w", "v"]},
                                {"answer": [{"unanswerable": False, "extractive_spans": [], "yes_no": False,
                                             "free_form_answer": "", "evidence": [], "highlighted_evidence": []}],
                                 "annotation_id": ["c"], "worker_id": ["w"]}]}}


def qmsum_release(folder: Path) -> Path:
    """The QMSum release: one JSON file per meeting in train/ and validation/ folders."""
    meetings = {"train": ["rivers", "bread"], "validation": ["stars", "bread"]}
    for split, keys in meetings.items():
        for n, key in enumerate(keys):
            sentences = [s for s in DOCS[key][1].split(". ") if s]
            meeting = {"topic_list": [{"topic": DOCS[key][0], "relevant_text_span": [["0", "1"]]}],
                       "general_query_list": [{"query": "Summarize the whole meeting.", "answer": DOCS[key][1]}],
                       "specific_query_list": [{"query": f"What was said about {DOCS[key][0].lower()}?",
                                                "answer": sentences[0] + ".", "relevant_text_span": [["0", "0"]]}],
                       "meeting_transcripts": [{"speaker": ["Alice", "Bob"][i % 2], "content": s}
                                               for i, s in enumerate(sentences)]}
            path = folder / split / f"{key}_{n}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(meeting))
    return folder


def paper_tasks(root: Path) -> dict[str, Path]:
    """A data folder for each of the paper's six tasks, each in one of its real schemas."""
    return {"nq_open": nq_open(root / "nq_open"), "triviaqa": triviaqa(root / "triviaqa"),
            "narrativeqa": scrolls(root / "narrativeqa", "narrativeqa"), "qasper": scrolls(root / "qasper", "qasper"),
            "quality": quality_scrolls(root / "quality"), "qmsum": qmsum_release(root / "qmsum")}
