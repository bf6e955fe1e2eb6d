"""The experiment's HTML report: an experiment's output folder -> `report.html`, one self-contained page (inline CSS
and JS, figures as data URIs, nothing fetched) to open in any browser, also offline.

    python -m retrotune.report runs/experiment

Reads what `retrotune.experiment` leaves in the folder: `results.json` (the rows; each row's `eval_dir` names the
folder of its `true/`, `shuffled/` and `none/` predictions.jsonl), `eval_questions.jsonl` (each question with the
neighbour texts both models read and those of the shuffled control; optional), `results.md` and every `*.png`.
Gives the results table (with n and confidence intervals where the rows carry them: `f1_ci`, ...), the figures, and
a browser of every question: its gold answers, the neighbours read, and each row's answer with its F1 under the true
neighbours, shuffled ones and none, filtered by text or by "row A right, row B wrong" (right: F1 > 0.5).

Every text from the data is escaped: the table here with `html.escape`, the browser through `textContent` from one
JSON blob whose `<`, `>` and `&` are written as \\u escapes, so no question or prediction can close the tag.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

CONDITIONS = ("true", "shuffled", "none")  # the neighbours a prediction was made with
FIRST_FIGURES = ("score_vs_parameters.png", "learning_curves.png")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _row_label(row: dict) -> str:
    label = f"{row.get('model', '?')} · {row.get('method', '?')}"
    if row.get("method") != "zero-shot":
        size = row.get("train_size")
        label += f" · n={'all' if size is None else size}"
        if row.get("seed") is not None:
            label += f" · seed {row['seed']}"
    return label


def _predictions(out_dir: Path, row: dict) -> dict[str, dict[str, dict]]:
    """condition -> question id -> that line of the row's predictions.jsonl (empty without `eval_dir`)."""
    if not row.get("eval_dir"):
        return {}
    folder = out_dir / row["eval_dir"]
    found = {c: {str(p["id"]): p for p in _jsonl(folder / c / "predictions.jsonl")} for c in CONDITIONS}
    return {c: by_id for c, by_id in found.items() if by_id}


def report_data(out_dir: Path, rows: list[dict]) -> dict:
    """The page's data: the rows' labels and every question with its neighbours and each row's answers under each
    condition (`predictions[i][condition]` = {prediction, f1, em}, i the row's position; null where it has none).
    Questions come in the order of eval_questions.jsonl, then any only the predictions name."""
    per_row = [_predictions(out_dir, row) for row in rows]
    questions: dict[str, dict] = {}
    for q in _jsonl(out_dir / "eval_questions.jsonl"):
        questions[str(q["id"])] = {"id": str(q["id"]), "question": q.get("question") or "",
                                   "answers": q.get("answers") or [], "group": q.get("group"),
                                   "neighbours": q.get("neighbour_texts") or [],
                                   "shuffled_neighbours": q.get("shuffled_neighbour_texts") or []}
    for found in per_row:
        for by_id in found.values():
            for qid, p in by_id.items():
                q = questions.setdefault(qid, {"id": qid, "question": "", "answers": [], "group": None,
                                               "neighbours": [], "shuffled_neighbours": []})
                q["question"] = q["question"] or p.get("question") or ""
                q["answers"] = q["answers"] or p.get("answers") or []
    for q in questions.values():
        q["predictions"] = [{c: {"prediction": found[c][q["id"]].get("prediction", ""),
                                 "f1": found[c][q["id"]].get("f1"), "em": found[c][q["id"]].get("em")}
                             for c in CONDITIONS if q["id"] in found.get(c, {})} or None for found in per_row]
    return {"title": out_dir.resolve().name, "rows": [{"label": _row_label(row)} for row in rows],
            "questions": list(questions.values())}


def _with_ci(value, interval, signed: bool = False) -> str:
    text = "–" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")
    if value is not None and isinstance(interval, (list, tuple)) and len(interval) == 2 and None not in interval:
        text += f' <span class="ci">[{interval[0]:.1f}, {interval[1]:.1f}]</span>'
    return text


def results_table(rows: list[dict]) -> str:
    """The rows as an HTML table: the columns of results.md plus seed and n, intervals where the rows have them."""
    head = ("model", "method", "train questions", "seed", "trainable params", "train time", "n", "EM", "F1",
            "ROUGE&#8209;L", "answer recall@k", "F1 shuffled", "F1 none", "retrieval gain (F1)")
    lines = ["<table class='results'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        controls = row.get("controls") or {}
        shuffled, none = controls.get("shuffled") or {}, controls.get("none") or {}
        zero_shot = row.get("method") == "zero-shot"
        size = "–" if zero_shot else ("all" if row.get("train_size") is None else f"{row['train_size']:,}")
        seconds = row.get("train_seconds")
        cells = [html.escape(str(row.get("model", ""))), html.escape(str(row.get("method", ""))), size,
                 "–" if row.get("seed") is None else html.escape(str(row["seed"])),
                 f"{row.get('trainable_parameters') or 0:,}", "–" if not seconds else f"{seconds / 60:.1f} min",
                 "–" if row.get("n") is None else f"{row['n']:,}", _with_ci(row.get("em"), row.get("em_ci")),
                 _with_ci(row.get("f1"), row.get("f1_ci")), _with_ci(row.get("rouge_l"), row.get("rouge_l_ci")),
                 _with_ci(row.get("answer_recall"), row.get("answer_recall_ci")),
                 _with_ci(shuffled.get("f1"), shuffled.get("f1_ci")), _with_ci(none.get("f1"), none.get("f1_ci")),
                 _with_ci(row.get("retrieval_gain_f1"), row.get("retrieval_gain_f1_ci"), signed=True)]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _figures(out_dir: Path) -> str:
    first = {name: i for i, name in enumerate(FIRST_FIGURES)}
    pngs = sorted(out_dir.glob("*.png"), key=lambda p: (first.get(p.name, len(first)), p.name))
    parts = []
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = html.escape(png.name)
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption>{name}"
                     f"</figcaption></figure>")
    return "<div class='figures'>" + "".join(parts) + "</div>" if parts else "<p class='note'>No figures.</p>"


def embedded_json(data) -> str:
    """JSON for a <script type="application/json"> block: no `<`, `>` or `&` appear literally, so the text can
    neither close the tag nor open a comment; JSON.parse reads the escapes back as the same characters."""
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


STYLE = """
:root { --fg: #1d2330; --muted: #667085; --line: #e3e6ec; --bg: #f6f7f9; --good: #1a7f37; --good-bg: #e6f4ea;
        --bad: #b42318; --bad-bg: #fdecea; --accent: #3056d3; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 22px; margin: 0 0 4px; }
.kicker { font-size: 12px; letter-spacing: .04em; text-transform: uppercase; color: var(--muted); }
h2 { font-size: 17px; margin: 32px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
.note, .ci { color: var(--muted); }
.ci { font-size: 11px; white-space: nowrap; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
table.results th, table.results td { padding: 6px 8px; border-bottom: 1px solid var(--line); text-align: right; }
table.results td { white-space: nowrap; font-variant-numeric: tabular-nums; }
table.results td:first-child { white-space: normal; min-width: 150px; }
table.results th { font-size: 11.5px; line-height: 1.25; color: var(--muted); font-weight: 600; background: #fafbfc;
                   vertical-align: bottom; }
table.results th:nth-child(-n+2), table.results td:nth-child(-n+2) { text-align: left; }
table.results tbody tr:hover { background: #f3f6fd; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figure img { display: block; max-width: 100%; width: 560px; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; }
details.raw pre { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px; overflow: auto;
                  font-size: 12px; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 10px 14px; padding: 12px 14px;
            margin-bottom: 14px;
            position: sticky; top: 0; z-index: 1; }
.controls input[type=search] { flex: 1 1 100%; padding: 6px 9px; border: 1px solid #cfd4dc; border-radius: 6px;
                               font: inherit; }
.controls select { padding: 5px 6px; border: 1px solid #cfd4dc; border-radius: 6px; font: inherit; max-width: 250px;
                   background: #fff; }
.controls label { color: var(--muted); font-size: 13px; }
#counter { margin-left: auto; font-weight: 600; }
.question { padding: 14px 16px; margin-bottom: 12px; }
.question .meta { font-size: 12px; color: var(--muted); }
.question .text { font-size: 15px; font-weight: 600; margin: 2px 0 6px; white-space: pre-wrap; }
.answers { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin-bottom: 8px; font-size: 12px;
           color: var(--muted); }
.chip { background: var(--good-bg); color: var(--good); border-radius: 10px; padding: 1px 9px; font-size: 13px; }
.neighbours { margin: 6px 0 10px; }
.neighbours summary { cursor: pointer; color: var(--accent); font-size: 13px; }
.neighbour-cols { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-top: 8px; }
.neighbour-cols h4 { margin: 0 0 4px; font-size: 12px; color: var(--muted); font-weight: 600; }
.neighbour-cols ol { margin: 0; padding-left: 20px; }
.neighbour-cols li { font-size: 12.5px; margin-bottom: 6px; white-space: pre-wrap; }
table.preds th, table.preds td { padding: 5px 8px; border-top: 1px solid var(--line); vertical-align: top;
                                 text-align: left; }
table.preds th { font-size: 12px; color: var(--muted); font-weight: 600; }
table.preds td.row { width: 27%; font-size: 13px; }
table.preds tr.picked td.row { font-weight: 600; }
table.preds td.pred { width: 24%; }
.pred .answer { white-space: pre-wrap; word-break: break-word; }
.f1 { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 8px; padding: 0 6px; margin-left: 6px; }
.f1.right { background: var(--good-bg); color: var(--good); }
.f1.wrong { background: var(--bad-bg); color: var(--bad); }
.missing { color: #b0b6c0; }
button#more { display: block; margin: 10px auto; padding: 7px 16px; border: 1px solid #cfd4dc; border-radius: 6px;
              background: #fff; font: inherit; cursor: pointer; }
"""

SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var RIGHT = 0.5, PAGE = 50;
  var conditions = [["true", "true neighbours"], ["shuffled", "shuffled"], ["none", "none"]];
  var search = document.getElementById("search"), rowA = document.getElementById("row-a"),
      rowB = document.getElementById("row-b"), cond = document.getElementById("condition"),
      list = document.getElementById("questions"), counter = document.getElementById("counter"),
      more = document.getElementById("more"), openAll = document.getElementById("open-neighbours");
  var shown = PAGE;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  [rowA, rowB].forEach(function (select) {
    data.rows.forEach(function (row, i) {
      var option = el("option", null, row.label);
      option.value = String(i);
      select.appendChild(option);
    });
  });
  function f1Of(q, i, c) {
    var p = q.predictions[i];
    return p && p[c] && typeof p[c].f1 === "number" ? p[c].f1 : null;
  }
  function haystack(q) {
    if (q._text === undefined) {
      var parts = [q.id, q.question, q.group || ""].concat(q.answers || []);
      q.predictions.forEach(function (p) {
        if (p) conditions.forEach(function (c) { if (p[c[0]]) parts.push(p[c[0]].prediction); });
      });
      q._text = parts.join("\\n").toLowerCase();
    }
    return q._text;
  }
  function matches(q) {
    var words = search.value.toLowerCase().trim();
    if (words && words.split(/\\s+/).some(function (w) { return haystack(q).indexOf(w) < 0; })) return false;
    var c = cond.value;
    if (rowA.value !== "") { var a = f1Of(q, +rowA.value, c); if (a === null || !(a > RIGHT)) return false; }
    if (rowB.value !== "") { var b = f1Of(q, +rowB.value, c); if (b === null || b > RIGHT) return false; }
    return true;
  }
  function neighbourList(title, texts) {
    var box = el("div");
    box.appendChild(el("h4", null, title));
    if (!texts || !texts.length) { box.appendChild(el("div", "missing", "none")); return box; }
    var ol = el("ol");
    texts.forEach(function (t) { ol.appendChild(el("li", null, t)); });
    box.appendChild(ol);
    return box;
  }
  function card(q) {
    var box = el("article", "question card");
    box.appendChild(el("div", "meta", q.id + (q.group ? " · " + q.group : "")));
    box.appendChild(el("div", "text", q.question));
    var answers = el("div", "answers", "gold:");
    (q.answers || []).forEach(function (a) { answers.appendChild(el("span", "chip", a)); });
    box.appendChild(answers);
    if ((q.neighbours && q.neighbours.length) || (q.shuffled_neighbours && q.shuffled_neighbours.length)) {
      var details = el("details", "neighbours");
      details.open = openAll.checked;
      details.appendChild(el("summary", null, "neighbours read (" + q.neighbours.length + " true, " +
                                              q.shuffled_neighbours.length + " shuffled)"));
      var cols = el("div", "neighbour-cols");
      cols.appendChild(neighbourList("true neighbours (both models)", q.neighbours));
      cols.appendChild(neighbourList("shuffled control", q.shuffled_neighbours));
      details.appendChild(cols);
      box.appendChild(details);
    }
    var table = el("table", "preds"), head = el("tr");
    head.appendChild(el("th", null, "row"));
    conditions.forEach(function (c) { head.appendChild(el("th", null, c[1])); });
    table.appendChild(head);
    data.rows.forEach(function (row, i) {
      var picked = String(i) === rowA.value || String(i) === rowB.value;
      var tr = el("tr", picked ? "picked" : null), p = q.predictions[i] || {};
      tr.appendChild(el("td", "row", row.label));
      conditions.forEach(function (c) {
        var td = el("td", "pred"), one = p[c[0]];
        if (!one) { td.appendChild(el("span", "missing", "–")); }
        else {
          td.appendChild(el("span", "answer", one.prediction === "" ? "(empty)" : one.prediction));
          if (typeof one.f1 === "number")
            td.appendChild(el("span", "f1 " + (one.f1 > RIGHT ? "right" : "wrong"), "F1 " + one.f1.toFixed(2)));
        }
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    box.appendChild(table);
    return box;
  }
  function render() {
    var hits = data.questions.filter(matches);
    list.replaceChildren();
    hits.slice(0, shown).forEach(function (q) { list.appendChild(card(q)); });
    counter.textContent = hits.length + " of " + data.questions.length + " questions" +
                          (hits.length > shown ? " (first " + shown + " shown)" : "");
    more.hidden = hits.length <= shown;
  }
  function restart() {
    shown = PAGE;
    var state = new URLSearchParams();
    if (search.value) state.set("q", search.value);
    if (rowA.value !== "") state.set("a", rowA.value);
    if (rowB.value !== "") state.set("b", rowB.value);
    if (cond.value !== "true") state.set("c", cond.value);
    if (openAll.checked) state.set("n", "1");
    history.replaceState(null, "", state.toString() ? "#" + state.toString() : location.pathname + location.search);
    render();
  }
  // the filters live in the address's #fragment, so a filtered view can be bookmarked or shared
  var start = new URLSearchParams(location.hash.slice(1));
  search.value = start.get("q") || "";
  openAll.checked = start.get("n") === "1";
  [[rowA, "a"], [rowB, "b"], [cond, "c"]].forEach(function (pair) {
    var value = start.get(pair[1]);
    if (value !== null && Array.prototype.some.call(pair[0].options, function (o) { return o.value === value; }))
      pair[0].value = value;
  });
  [rowA, rowB, cond].forEach(function (s) { s.addEventListener("change", restart); });
  openAll.addEventListener("change", restart);
  search.addEventListener("input", restart);
  more.addEventListener("click", function () { shown += PAGE; render(); });
  render();
})();
"""


def render(out_dir: Path) -> str:
    """The page for an experiment folder, as one HTML string."""
    rows = json.loads((out_dir / "results.json").read_text(encoding="utf-8")).get("rows", [])
    data = report_data(out_dir, rows)
    markdown = out_dir / "results.md"
    raw = (f"<details class='raw'><summary>results.md</summary><pre>"
           f"{html.escape(markdown.read_text(encoding='utf-8'))}</pre></details>" if markdown.is_file() else "")
    no_neighbours = "" if (out_dir / "eval_questions.jsonl").is_file() else \
        "<p class='note'>This folder has no eval_questions.jsonl: the neighbour texts are not shown.</p>"
    title = html.escape(data["title"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}: retrotune report</title><style>{STYLE}</style></head>
<body><main>
<div class="kicker">retrotune experiment report</div>
<h1>{title}</h1>
<p class="note">{len(rows)} rows, {len(data["questions"])} evaluation questions. Scores in %; intervals in brackets
where the results carry them; a question counts as right for a row when its F1 is above 0.5.</p>
<h2>Results</h2>
<div class="card scroll">{results_table(rows)}</div>
{raw}
<h2>Figures</h2>
{_figures(out_dir)}
<h2>Questions</h2>
{no_neighbours}
<div class="controls card">
  <input id="search" type="search" placeholder="search questions, answers, predictions">
  <label>right (F1 &gt; 0.5) <select id="row-a"><option value="">any row</option></select></label>
  <label>wrong <select id="row-b"><option value="">any row</option></select></label>
  <label>with <select id="condition"><option value="true">true neighbours</option>
    <option value="shuffled">shuffled neighbours</option><option value="none">no neighbours</option></select></label>
  <label><input id="open-neighbours" type="checkbox"> show neighbours</label>
  <span id="counter"></span>
</div>
<div id="questions"></div>
<button id="more" type="button" hidden>show more</button>
</main>
<script type="application/json" id="report-data">{embedded_json(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(out_dir: Path) -> Path:
    """Write `out_dir/report.html` for an experiment's output folder; returns its path."""
    out_dir = Path(out_dir)
    if not (out_dir / "results.json").is_file():
        raise FileNotFoundError(f"{out_dir} holds no results.json; point at an experiment's output folder "
                                f"(output_dir of its YAML) after the experiment has run")
    path = out_dir / "report.html"
    path.write_text(render(out_dir), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="an experiment's output folder (holding results.json)")
    args = parser.parse_args(argv)
    try:
        print(write_report(Path(args.run_dir)))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
