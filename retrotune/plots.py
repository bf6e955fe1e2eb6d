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


def _error(row: dict, key: str = "f1"):
    """Matplotlib's yerr for one point: the distances from the score down and up to its 95% interval."""
    ci = row.get(f"{key}_ci")
    return None if not ci else [[row[key] - ci[0]], [ci[1] - row[key]]]


def score_vs_parameters(rows: list[dict], path: Path) -> None:
    """F1 of each fine-tuned row (seeds averaged) against its trainable parameters, with its 95% interval over
    questions as a bar; zero-shot rows as lines."""
    with _axis(path, "trainable parameters", "F1 (95% interval over questions)", log_x=True) as axis:
        for colour, model in enumerate(sorted({r["model"] for r in rows if r["method"] != "zero-shot"})):
            points = [r for r in rows if r["model"] == model and r["method"] != "zero-shot"]
            for i, row in enumerate(points):
                axis.errorbar(row["trainable_parameters"], row["f1"], yerr=_error(row), fmt="o", capsize=3,
                              color=f"C{colour}", label=model if i == 0 else None)
                axis.annotate(row["method"], (row["trainable_parameters"], row["f1"]), fontsize=7,
                              xytext=(4, 2), textcoords="offset points")
        for row in rows:
            if row["method"] == "zero-shot":
                axis.axhline(row["f1"], linestyle=":", linewidth=1, color="grey")
                axis.annotate(f"{row['model']}, zero-shot", xy=(0.01, row["f1"]),
                              xycoords=("axes fraction", "data"), fontsize=6, color="grey", va="bottom")


def data_scale(rows: list[dict], path: Path) -> None:
    """F1 against the number of training questions, one line per model and method, with 95% intervals."""
    with _axis(path, "training questions", "F1 (95% interval over questions)", log_x=True) as axis:
        series = sorted({(r["model"], r["method"]) for r in rows if r["method"] != "zero-shot"})
        for model, method in series:
            points = sorted((r for r in rows if (r["model"], r["method"]) == (model, method)
                             and r["train_size"] is not None), key=lambda r: r["train_size"])
            axis.errorbar([r["train_size"] for r in points], [r["f1"] for r in points],
                          yerr=[[r["f1"] - r["f1_ci"][0] for r in points], [r["f1_ci"][1] - r["f1"] for r in points]],
                          marker="o", capsize=3, label=f"{model} / {method}")


def retrofit_reading(validation: list[dict], path: Path) -> None:
    """The retro-fit's validation loss with true, shuffled and no neighbours per evaluation, and the reading gap
    (shuffled minus true): the curve that shows when RETRO stopped learning to read."""
    with _axis(path, "retro-fit step", "validation loss", title="retro-fit: reading its neighbours") as axis:
        steps = [r["step"] for r in validation]
        for key, label in (("val_loss", "true neighbours"), ("val_loss_shuffled", "shuffled neighbours"),
                           ("val_loss_base", "no neighbours (the base)")):
            if all(key in r for r in validation):
                axis.plot(steps, [r[key] for r in validation], "o-", label=label)
        gap = axis.twinx()
        gap.plot(steps, [r["val_loss_shuffled"] - r["val_loss"] for r in validation], "k--", label="gap")
        gap.set_ylabel("gap: shuffled - true (dashed)")
