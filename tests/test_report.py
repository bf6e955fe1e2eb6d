"""The HTML report of an experiment folder: self-contained, every question with every row's three predictions in its
embedded data, untrusted text escaped, and (where chromium is installed) the page renders its question list."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from retrotune.report import write_report

INJECTED = "<script>alert(1)</script>"
QUESTIONS = [
    {"id": "q1", "group": "Black_Death", "question": "In what year did the Black Death reach England?",
     "answers": ["1348", "June 1348"],
     "neighbour_texts": ["The plague reached England in June 1348, arriving at the port of Melcombe in Dorset.",
                         "The Black Death was the deadliest pandemic recorded in human history."],
     "shuffled_neighbour_texts": ["Geology is the study of the Earth, the rocks of which it is composed.",
                                  "Pharmacists are healthcare professionals who dispense medication."]},
    {"id": "q2", "group": "Geology", "question": f"What do geologists study? {INJECTED}",
     "answers": ["the Earth"],
     "neighbour_texts": ["Geology is the study of the Earth, the rocks of which it is composed.",
                         "Geologists study the mineral and rock composition of the Earth."],
     "shuffled_neighbour_texts": ["The plague reached England in June 1348.", "Pharmacy is the science of drugs."]},
    {"id": "q3", "group": "Pharmacy", "question": "Who dispenses medication?", "answers": ["pharmacists"],
     "neighbour_texts": ["Pharmacists are healthcare professionals who dispense medication.",
                         "Pharmacy is the science and technique of preparing and dispensing drugs."],
     "shuffled_neighbour_texts": ["Geologists study the mineral and rock composition of the Earth.",
                                  "The Black Death was the deadliest pandemic recorded."]},
]
# (row folder, condition) -> predictions for q1, q2, q3
PREDICTIONS = {
    ("retro", "true"): ["June 1348", "the Earth", "pharmacists"],
    ("retro", "shuffled"): ["1350", "rocks", "</script><b>doctors</b>"],
    ("retro", "none"): ["1347", "rocks", "doctors"],
    ("gpt", "true"): ["1348", "minerals", "nurses"],
    ("gpt", "shuffled"): ["1347", "stones", "nurses"],
    ("gpt", "none"): ["the 14th century", "rocks", "doctors"],
}
ROWS = [
    {"model": "RETRO", "method": "lora", "eval_dir": "cells/retro-lora-n300-s0/eval", "train_size": 300, "seed": 0,
     "trainable_parameters": 460_800, "train_seconds": 412.0, "em": 66.7, "f1": 83.3, "f1_ci": [50.0, 100.0],
     "rouge_l": 83.3, "answer_recall": 100.0, "n": 3, "retrieval_gain_f1": 61.1,
     "retrieval_gain_f1_ci": [16.7, 100.0], "controls": {"shuffled": {"f1": 22.2, "em": 0.0},
                                                          "none": {"f1": 0.0, "em": 0.0}}},
    {"model": "GPT + neighbours in prompt", "method": "lora", "eval_dir": "cells/gpt-lora-n300-s0/eval",
     "train_size": 300, "seed": 0, "trainable_parameters": 460_800, "train_seconds": 388.5, "em": 33.3, "f1": 33.3,
     "rouge_l": 33.3, "answer_recall": 100.0, "n": 3, "retrieval_gain_f1": 0.0,
     "controls": {"shuffled": {"f1": 33.3, "em": 0.0}, "none": {"f1": 0.0, "em": 0.0}}},
]


def make_experiment(out: Path) -> Path:
    """A tiny experiment folder as retrotune.experiment writes it: two rows, three questions."""
    from retrotune.metrics import exact_match, f1_score
    from retrotune.plots import learning_curves, score_vs_parameters

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": ROWS, "seconds": 800.5}))
    (out / "results.md").write_text("| model | method | F1 |\n|---|---|---:|\n| RETRO | lora | 83.3 |\n")
    (out / "eval_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for (model, condition), predictions in PREDICTIONS.items():
        folder = out / "cells" / f"{model}-lora-n300-s0" / "eval" / condition
        folder.mkdir(parents=True)
        lines = [{"id": q["id"], "question": q["question"], "prediction": p, "answers": q["answers"],
                  "em": exact_match(p, q["answers"]), "f1": f1_score(p, q["answers"])}
                 for q, p in zip(QUESTIONS, predictions)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cells = [out / "cells" / f"{model}-lora-n300-s0" for model in ("retro", "gpt")]
    for cell, floor in zip(cells, (0.6, 1.1)):
        (cell / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": floor + 2.5 / step}) + "\n"
                                                    for step in range(1, 31)))
    score_vs_parameters(ROWS, out / "score_vs_parameters.png")
    learning_curves(cells, out / "learning_curves.png")
    return out


def _embedded(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert found, "no embedded data block"
    return json.loads(found.group(1))


def test_report_is_self_contained_escaped_and_complete(tmp_path):
    path = write_report(make_experiment(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text()

    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "the page fetches something"
    assert "data:image/png;base64," in page
    assert INJECTED not in page and "</script><b>" not in page
    assert page.count("<script") == page.count("</script>") == 2  # the data block and the code, nothing injected

    data = _embedded(page)
    assert [row["label"] for row in data["rows"]] == ["RETRO · lora · n=300 · seed 0",
                                                      "GPT + neighbours in prompt · lora · n=300 · seed 0"]
    assert [q["id"] for q in data["questions"]] == ["q1", "q2", "q3"]
    q2 = data["questions"][1]
    assert q2["question"].endswith(INJECTED)  # escaped in the page, the same text once parsed
    assert q2["neighbours"] == QUESTIONS[1]["neighbour_texts"]
    assert q2["shuffled_neighbours"] == QUESTIONS[1]["shuffled_neighbour_texts"]
    for q, source in zip(data["questions"], QUESTIONS):
        for row, model in zip(q["predictions"], ("retro", "gpt")):
            assert set(row) == {"true", "shuffled", "none"}
            for condition, one in row.items():
                assert one["prediction"] == PREDICTIONS[(model, condition)][QUESTIONS.index(source)]
                assert 0.0 <= one["f1"] <= 1.0

    for element in ('id="search"', 'id="row-a"', 'id="row-b"', 'id="condition"', 'id="counter"'):
        assert element in page
    assert "[50.0, 100.0]" in page and "[16.7, 100.0]" in page  # intervals where the rows carry them


def test_report_without_question_file_or_predictions(tmp_path):
    out = make_experiment(tmp_path / "run")
    (out / "eval_questions.jsonl").unlink()
    shutil.rmtree(out / "cells" / "gpt-lora-n300-s0" / "eval" / "shuffled")
    rows = json.loads((out / "results.json").read_text())["rows"]
    rows.append({"model": "GPT (no retrieval)", "method": "zero-shot", "trainable_parameters": 0,
                 "train_seconds": 0.0, "train_size": 0, "seed": None, "em": 0.0, "f1": 5.0})  # no eval_dir
    (out / "results.json").write_text(json.dumps({"rows": rows}))
    data = _embedded(write_report(out).read_text())
    assert [q["id"] for q in data["questions"]] == ["q1", "q2", "q3"]
    assert data["questions"][0]["question"] == QUESTIONS[0]["question"]  # taken from the predictions
    assert data["questions"][0]["neighbours"] == []
    assert set(data["questions"][0]["predictions"][1]) == {"true", "none"}
    assert data["questions"][0]["predictions"][2] is None


def test_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        write_report(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page: Path, profile: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--no-first-run",
                           f"--user-data-dir={profile}", *args, page.resolve().as_uri() + fragment],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_renders_its_question_list_in_a_browser(tmp_path):
    page = write_report(make_experiment(tmp_path / "run"))
    done = chromium(page, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert dom.count('class="question card"') == 3
    assert dom.count('<td class="row">') == 3 * len(ROWS)
    assert "3 of 3 questions" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and INJECTED not in dom

    # "RETRO right, GPT wrong" with the true neighbours (the filters read from the address's #fragment): q2, q3
    done = chromium(page, tmp_path / "profile", "--dump-dom", fragment="#a=0&b=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.findall(r'<div class="meta">(q\d)', done.stdout) == ["q2", "q3"]
    assert "2 of 3 questions" in done.stdout
