"""The report's PNG figures: learning curves of one run or many, and score against trainable parameters."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _axis(path: Path, xlabel: str, ylabel: str, title: str | None = None, log_x: bool = False):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    try:
        yield axis
        if log_x:
            axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        if title:
            axis.set_title(title)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)


def learning_curve(rows: list[dict], path: Path, title: str | None = None) -> None:
    """Training loss per step and validation loss where it was measured, for one run."""
    with _axis(path, "optimiser step", "loss", title or path.parent.name) as axis:
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                axis.plot(*zip(*points), style, label=key.replace("_", " "))


def learning_curves(runs: list[Path], path: Path) -> None:
    """Training loss of several runs (folders holding metrics.jsonl) on one plot."""
    with _axis(path, "optimiser step", "training loss") as axis:
        for folder in runs:
            metrics = folder / "metrics.jsonl"
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=folder.name)


def score_vs_parameters(rows: list[dict], path: Path) -> None:
    """The task's validation score (F1 for SQuAD-open) of each fine-tuned cell against its trainable parameters;
    zero-shot rows as lines."""
    def score(row):
        return row.get("score", row.get("f1"))

    with _axis(path, "trainable parameters", "validation score", log_x=True) as axis:
        for model in sorted({r["model"] for r in rows if r["method"] != "zero-shot"}):
            points = [(r["trainable_parameters"], score(r), r["method"]) for r in rows
                      if r["model"] == model and r["method"] != "zero-shot"]
            axis.scatter([p[0] for p in points], [p[1] for p in points], label=model)
            for x, y, method in points:
                axis.annotate(method, (x, y), fontsize=7)
        for row in rows:
            if row["method"] == "zero-shot":
                axis.axhline(score(row), linestyle=":", linewidth=1, color="grey")
                axis.annotate(f"{row['model']}, zero-shot", xy=(0.01, score(row)),
                              xycoords=("axes fraction", "data"), fontsize=6, color="grey", va="bottom")
