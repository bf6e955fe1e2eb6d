"""RETRO's designs on both axes: what reading costs, and what it reads on the study's questions.

Each folder under `benchmarks/study/designs/` is one design: `design.json` names it, says which row of
`bench_retro_vs_gpt` times it and how it was run, and points at its record (its own `retrofit.json` and `rows/`, or
another design's where the two compute the same thing); `first_sight`, where its cost holds only for neighbours it
has encoded before, names the bench row that times a first sight, on which it is judged. A design's record comes from
the study's own command with the design's `overrides` (which keep only its RETRO rows: zero-shot, and LoRA r = 8 with
seed 0); `--commands` prints them:

    python eval.py experiment configs/study.yaml OVERRIDES output_dir=runs/design-NAME \\
        record=benchmarks/study/designs/NAME

Costs come from one run of `python benchmarks/bench_retro_vs_gpt.py --json benchmarks/study/designs/costs.json`.
Prints the frontier: per design, its cost over the frozen base on the corpus shapes, the retro-fit's last reading
gap, the zero-shot and RETRO + LoRA retrieval gains over shuffled neighbours, and RETRO + LoRA minus joint CCA
(the study's design) question by question, each with its 95% interval over the questions; then whether the
design clears both bars: corpus-512 cost at most 1.5x the base, and reading (the paired difference from joint CCA's
interval above -2 F1 and a retrieval gain of at least +8 F1).

    python benchmarks/design_frontier.py
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import md_table  # noqa: E402
from retrotune import stats  # noqa: E402
from retrotune.scores import read_record, vector  # noqa: E402

DESIGNS = ROOT / "benchmarks/study/designs"
REFERENCE = "joint"  # the folder of the design the others are compared with
CELL = "retro-lora-nall-s0"
MAX_COST, MIN_DIFFERENCE, MIN_GAIN = 1.5, -2.0, 8.0
BAR_SHAPE = "corpus-512"  # the shape whose cost the first bar reads


def load(folder: Path) -> dict:
    """A design folder -> its description, record folder and rows."""
    where = folder / "design.json"
    if not where.is_file():
        raise SystemExit(f"{folder}: no design.json (label, bench, record); every design folder needs one")
    design = json.loads(where.read_text())
    missing = [key for key in ("label", "bench") if key not in design]
    if missing:
        raise SystemExit(f"{where}: missing field(s) {missing}")
    record = ROOT / design["record"] if design.get("record") else folder
    needed = [record / "retrofit.json"] + [record / "rows" / f"{name}.json" for name in ("zero-shot-retro", CELL)]
    for path in needed:
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run the design's experiment (see {where}) to record it")
    retrofit = json.loads(needed[0].read_text())
    rows = {path.stem: read_record(path)[1] for path in needed[1:]}
    return {**design, "folder": folder.name, "record_dir": record.resolve(), "rows": rows, "retrofit": retrofit}


def gain(questions: dict) -> tuple[float, float, float]:
    """Retrieval gain (true minus shuffled F1, paired per question, as the study's tables compute it) and its 95%
    interval."""
    result = stats.paired(vector(questions, "true", "f1"), vector(questions, "shuffled", "f1"))
    return result.difference, result.low, result.high


def signed(value: float, low: float, high: float) -> str:
    return f"{value:+.1f} [{low:+.1f}, {high:+.1f}]"


def cost(ratio: float | None, first_sight: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" + (f" ({first_sight:.2f}x on first sight)" if first_sight not in (None, ratio) else "")


def frontier(designs: list[dict], costs: dict | None) -> tuple[list[str], list[list[str]]]:
    reference = next((d for d in designs if d["folder"] == REFERENCE), None)
    if reference is None:
        raise SystemExit(f"no {REFERENCE!r} design folder: the others are compared with it")
    shapes = [s for s in (costs or {}).get("ratios", {}) if s.startswith("corpus-")]
    headers = (["design"] + [f"{s} cost" for s in shapes]
               + ["retro-fit reading gap", "zero-shot gain (F1)", "RETRO + LoRA F1", "its retrieval gain",
                  "minus joint CCA (paired)", "clears both bars"])
    rows = []
    for d in designs:
        ratios = [costs["ratios"][s].get(d["bench"]) for s in shapes]
        # a design whose cost holds only for neighbours seen before is judged on what a first sight costs
        first = [costs["ratios"][s].get(d.get("first_sight", d["bench"])) for s in shapes]
        last = d["retrofit"]["validation"][-1]
        tuned = d["rows"][CELL]
        f1 = vector(tuned, "true", "f1")
        tuned_gain = gain(tuned)
        diff = stats.paired(f1, vector(reference["rows"][CELL], "true", "f1"))
        reads = diff.low > MIN_DIFFERENCE and tuned_gain[0] >= MIN_GAIN
        if BAR_SHAPE in shapes:
            bar = first[shapes.index(BAR_SHAPE)]
            fails = [why for why, failed in (("cost", bar is None or bar > MAX_COST), ("reading", not reads))
                     if failed]
            verdict = "no: " + ", ".join(fails) if fails else "yes"
        else:  # no cost to judge: the reading bar alone
            verdict = "reads" if reads else "no: reading"
        rows.append([d["label"]] + [cost(r, f) for r, f in zip(ratios, first)]
                    + [f"{last['val_loss_shuffled'] - last['val_loss']:.2f} (step {last['step']})",
                       signed(*gain(d["rows"]["zero-shot-retro"])),
                       "{:.1f} [{:.1f}, {:.1f}]".format(f1.mean(), *stats.interval(f1)),
                       signed(*tuned_gain),
                       "-" if d["record_dir"] == reference["record_dir"] else
                       signed(diff.difference, diff.low, diff.high),
                       verdict])
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--designs", default=str(DESIGNS), help="folder of design folders (default %(default)s)")
    ap.add_argument("--costs", help="bench_retro_vs_gpt --json output (default: DESIGNS/costs.json if present)")
    ap.add_argument("--commands", action="store_true", help="print the command that records each design, and stop")
    args = ap.parse_args(argv)
    root = Path(args.designs)
    if not root.is_dir():
        raise SystemExit(f"--designs {root}: no such folder (the recorded designs are in {DESIGNS})")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise SystemExit(f"{root}: no design folders")
    costs_path = Path(args.costs) if args.costs else root / "costs.json"
    if args.costs and not costs_path.is_file():
        raise SystemExit(f"{costs_path}: not found; write it with bench_retro_vs_gpt.py --json")
    costs = json.loads(costs_path.read_text()) if costs_path.is_file() else None
    if args.commands:
        for folder in folders:
            design = json.loads((folder / "design.json").read_text())
            if not design.get("record"):  # a design with a record of its own
                words = ["python", "eval.py", "experiment", "configs/study.yaml", *design["overrides"],
                         f"output_dir=runs/design-{folder.name}", f"record={os.path.relpath(folder, ROOT)}"]
                print(" ".join(shlex.quote(w) for w in words))
        return 0
    designs = sorted((load(f) for f in folders), key=lambda d: d.get("order", 99))
    headers, rows = frontier(designs, costs)
    print("## RETRO designs: what reading costs and what it reads\n")
    if costs:
        print(f"Costs: {costs['model']} on {costs['device']}, {costs['unit']}, median of {costs['repeats']} "
              f"rounds, each over the frozen base on the same tokens (bench_retro_vs_gpt).")
    n = len(designs[0]["rows"][CELL]["ids"])
    print(f"Reading: the study's evaluation questions, n = {n}, 95% intervals over questions; RETRO + LoRA is "
          f"seed 0 of r = 8.\n")
    print(md_table(headers, rows))
    notes = [f"- {d['label']}: {d['note']}" for d in designs if d.get("note")]
    if notes:
        print("\n" + "\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
