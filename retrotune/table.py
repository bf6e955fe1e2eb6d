"""Stage 6, tables: result rows of many cells -> markdown.

`markdown_table`: one experiment on one task (rows: model and method, with the zero-shot rows; the control columns).
`paper_table`: the paper's layout (rows: model x method; columns: the six tasks, their average, and the cost
columns: trainable parameters, training hours, generated tokens per second at inference).
"""
from __future__ import annotations

from collections import OrderedDict


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """One row per model and method; the control columns give F1 with shuffled neighbours and with none, and the
    retrieval gain (F1 with the true neighbours minus F1 with shuffled ones)."""
    lines = ["| model | method | train questions | trainable params | train time | EM | F1 | ROUGE-L | answer recall@k "
             "| F1 shuffled | F1 none | retrieval gain (F1) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        size = "-" if row["method"] == "zero-shot" else ("all" if row["train_size"] is None else row["train_size"])
        controls = row.get("controls") or {}
        gain = row.get("retrieval_gain_f1")
        lines.append(f"| {row['model']} | {row['method']} | {size} | {row['trainable_parameters']:,} | "
                     f"{row['train_seconds'] / 60:.1f} min | {_num(row.get('em'))} | {_num(row.get('f1'))} | "
                     f"{_num(row.get('rouge_l'))} | {_num(row.get('answer_recall'))} | "
                     f"{_num(controls.get('shuffled', {}).get('f1'))} | {_num(controls.get('none', {}).get('f1'))} | "
                     f"{'-' if gain is None else format(gain, '+.1f')} |")
    return "\n".join(lines)


def paper_table(rows: list[dict], tasks: list[str], titles: dict[str, str] | None = None) -> str:
    """Rows: one per (model, method), in first-seen order; a cell is the task's score (`score`: EM, F1, accuracy
    or the ROUGE geometric mean, by task), averaged over seeds; Average is the mean over the tasks the row has.
    Cost columns: trainable parameters (the largest over the row's cells), training hours (summed over its
    cells), generated tokens per second at inference (mean over its cells)."""
    titles = titles or {}
    table: OrderedDict = OrderedDict()
    for row in rows:
        entry = table.setdefault((row["model"], row["method"]), {"scores": {}, "params": 0, "seconds": 0.0,
                                                                  "speed": []})
        entry["scores"].setdefault(row["task"], []).append(row["score"])
        entry["params"] = max(entry["params"], row.get("trainable_parameters") or 0)
        entry["seconds"] += row.get("train_seconds") or 0.0
        if row.get("tokens_per_second"):
            entry["speed"].append(row["tokens_per_second"])
    header = ["model", "method", *[titles.get(t, t) for t in tasks], "Average", "trainable params", "train hours",
              "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for (model, method), entry in table.items():
        means = {t: sum(v) / len(v) for t, v in entry["scores"].items()}
        cells = [_num(means.get(t)) for t in tasks]
        present = [means[t] for t in tasks if t in means]
        average = sum(present) / len(present) if present else None
        speed = sum(entry["speed"]) / len(entry["speed"]) if entry["speed"] else None
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + f" | {_num(average)} | {entry['params']:,} | "
                     f"{entry['seconds'] / 3600:.3f} | {_num(speed)} |")
    return "\n".join(lines)
