"""Stage 6, tables: result rows of many cells -> markdown.

`markdown_table`: one experiment on one task (rows: model and method, with the zero-shot rows; the control columns;
intervals over questions and the spread over seeds); `comparisons_table` and `findings_list`: what the rows show.
`paper_table`: the paper's layout (rows: model x method; columns: the six tasks, each score with its 95% interval
over questions, their average, and the cost columns: trainable parameters, training hours, generated tokens per
second at inference).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from retrotune import stats


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ci(row: dict, key: str, signed: bool = False) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if value is None:
        return "-"
    spec = "+.1f" if signed else ".1f"
    text = format(value, spec)
    if ci:
        text += f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"
    if len(row.get("seeds") or ()) > 1 and row.get(f"{key}_sd") is not None:
        text += f" ±{row[f'{key}_sd']:.1f}"
    return text


def markdown_table(rows: list[dict]) -> str:
    """One row per model, method and training-set size (`retrotune.findings.aggregate`: seeds averaged). Each score
    is the mean over the n evaluation questions with its 95% bootstrap interval over questions in brackets, and,
    for rows trained with several seeds, ± the standard deviation across seeds. The control columns give F1 with
    shuffled neighbours and with none; the retrieval gain is F1 with true minus shuffled neighbours, paired per
    question. Cost columns: trainable parameters, training time and the cell's wall time (training and evaluation
    under every control; means over seeds), and answering time per question (true neighbours)."""
    lines = ["| model | method | train questions | seeds | n | trainable params | train time | cell time | s / question "
             "| EM | F1 | ROUGE-L | answer recall@k | F1 shuffled | F1 none | retrieval gain (F1) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        size = "-" if row["method"] == "zero-shot" else ("all" if row["train_size"] is None else row["train_size"])
        seeds = "-" if row["method"] == "zero-shot" else len(row.get("seeds") or [None])
        speed, wall = row.get("seconds_per_question"), row.get("wall_seconds")
        lines.append(f"| {row['model']} | {row['method']} | {size} | {seeds} | {row.get('n', '-')} | "
                     f"{row['trainable_parameters']:,} | {row['train_seconds'] / 60:.1f} min | "
                     f"{'-' if wall is None else format(wall / 60, '.1f') + ' min'} | "
                     f"{'-' if speed is None else format(speed, '.2f')} | {_ci(row, 'em')} | {_ci(row, 'f1')} | "
                     f"{_ci(row, 'rouge_l')} | {_num(row.get('answer_recall'))} | {_ci(row, 'f1_shuffled')} | "
                     f"{_ci(row, 'f1_none')} | {_ci(row, 'retrieval_gain_f1', signed=True)} |")
    return "\n".join(lines)


def comparisons_table(results: list[dict]) -> str:
    """Paired comparisons (retrotune.findings.comparisons): the mean F1 difference per question, its 95% interval
    and the permutation p-value; a difference whose interval includes 0 is not a finding."""
    lines = ["| comparison | scope | train questions | difference (F1) | 95% interval | p | finding |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in results:
        size = "-" if c["train_size"] is None else c["train_size"]
        lines.append(f"| {c['comparison']} | {c['scope']} | {size} | {c['difference']:+.1f} | "
                     f"[{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}] | {c['p_value']:.3f} | "
                     f"{'yes' if c['separated'] else 'no: the interval includes 0'} |")
    return "\n".join(lines)


def findings_list(findings: list[dict]) -> str:
    """The paper's findings, one line each: the verdict, the test that decides it and its numbers."""
    lines = []
    for f in findings:
        if f["verdict"] == "not measured":
            lines.append(f"- **{f['finding']}**: not measured (the study lacks its rows).")
            continue
        lines.append(f"- **{f['finding']}**: {f['verdict']}. {f['test']}: {f['detail']}.")
        for item in f.get("per_method", []):
            lines.append(f"    - {item}")
    return "\n".join(lines)


def score_interval(questions: list[dict]) -> tuple[float, float, int]:
    """(low, high, n): the 95% interval over the n questions of a task score, from its seeds' per-question values
    (`retrotune.grid.question_scores`, one record per seed, all on the same questions). The seeds are averaged per
    question first, then the questions resampled: the mean of the values, or, for `geometric_mean`, the geometric
    mean of each column's mean (QMSum's ROUGE), bootstrapped as a whole."""
    ids = questions[0]["ids"]
    if any(q["ids"] != ids for q in questions[1:]):
        raise ValueError("a cell's seeds were scored on different questions; evaluate every seed on the same "
                         "evaluation set")
    names = list(questions[0]["columns"])
    columns = [np.mean([q["columns"][name] for q in questions], axis=0) for name in names]  # each (Q,)
    if questions[0]["statistic"] == "geometric_mean":
        low, high = stats.interval_of(stats.geometric_mean_of_means, columns)
    else:
        (column,) = columns
        low, high = stats.interval(column)
    return low, high, len(ids)


def paper_table(rows: list[dict], tasks: list[str], titles: dict[str, str] | None = None) -> str:
    """Rows: one per (model, method), in first-seen order; a cell is the task's score (`score`: EM, F1, accuracy
    or the ROUGE geometric mean, by task), averaged over seeds, and in brackets its 95% bootstrap interval over the
    task's n questions (`score_interval`: the seeds averaged per question, then questions resampled; each row
    carries its per-question values as `questions`). n stands in the header where a task's rows share it, else in
    each cell. Average is the mean over the tasks the row has. Cost columns: trainable parameters (the largest over
    the row's cells), training hours (summed over its cells), generated tokens per second at inference (mean over
    its cells)."""
    titles = titles or {}
    table: OrderedDict = OrderedDict()
    for row in rows:
        entry = table.setdefault((row["model"], row["method"]), {"seeds": {}, "params": 0, "seconds": 0.0,
                                                                  "speed": []})
        entry["seeds"].setdefault(row["task"], []).append(row)
        entry["params"] = max(entry["params"], row.get("trainable_parameters") or 0)
        entry["seconds"] += row.get("train_seconds") or 0.0
        if row.get("tokens_per_second"):
            entry["speed"].append(row["tokens_per_second"])
    for entry in table.values():
        entry["cells"] = {}
        for task, members in entry["seeds"].items():
            try:
                low, high, n = score_interval([m["questions"] for m in members])
            except ValueError as error:
                raise ValueError(f"{members[0].get('cell', task)}: {error}") from None
            entry["cells"][task] = (sum(m["score"] for m in members) / len(members), low, high, n)
    sizes = {t: {e["cells"][t][3] for e in table.values() if t in e["cells"]} for t in tasks}
    shared = {t: next(iter(n)) for t, n in sizes.items() if len(n) == 1}

    def cell(entry: dict, task: str) -> str:
        if task not in entry["cells"]:
            return "-"
        score, low, high, n = entry["cells"][task]
        return f"{score:.1f} [{low:.1f}, {high:.1f}]" + ("" if task in shared else f" n={n}")

    header = ["model", "method", *[titles.get(t, t) + (f" (n={shared[t]})" if t in shared else "") for t in tasks],
              "Average", "trainable params", "train hours", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for (model, method), entry in table.items():
        present = [entry["cells"][t][0] for t in tasks if t in entry["cells"]]
        average = sum(present) / len(present) if present else None
        speed = sum(entry["speed"]) / len(entry["speed"]) if entry["speed"] else None
        lines.append(f"| {model} | {method} | " + " | ".join(cell(entry, t) for t in tasks) + f" | {_num(average)} | "
                     f"{entry['params']:,} | {entry['seconds'] / 3600:.3f} | {_num(speed)} |")
    return "\n".join(lines)
