"""Evaluate RETRO and the GPT baseline on a task, or run a whole side-by-side experiment or the paper's grid.

    python eval.py experiment configs/demo.yaml          # index, zero-shot, retro-fit, fine-tuning, table
    python eval.py zero-shot configs/finetune_gpt_lora.yaml   # GPT closed-book, GPT + neighbours, RETRO
    python eval.py checkpoint runs/gpt-lora              # a trained run on its validation questions
    python eval.py experiment configs/demo.yaml --plan plan.sh   # the grid as one shell line per cell
    python eval.py checkpoint runs/gpt-lora --index indexes/other --task nq_open --qa nq/validation.jsonl
    python eval.py compare RECORD/rows/A.json RECORD/rows/B.json   # two recorded rows, paired per question
    python eval.py paper configs/paper.yaml              # the paper's grid and its table
    python eval.py paper configs/paper.yaml --cell qasper/smollm2-135m/retro/lora
    python eval.py paper configs/paper.yaml --zero-shot  # the zero-shot row of every task
    python eval.py paper configs/paper.yaml --plan paper.sh   # the paper's grid as one shell line per cell

Scores, by task: exact match and F1 over all answer aliases, ROUGE-1/2/L and their geometric mean, multiple-choice
accuracy (by option likelihood and by generated letter), and answer recall@k of the neighbours (is the answer in
what was retrieved?), which tells reader errors from retriever errors. Predictions are saved as JSONL beside the scores.
Bad input is reported as one `error: ...` line with exit status 2 (`--debug`: traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _experiment(args) -> int:
    from retrotune.experiment import load_experiment, run_experiment
    from retrotune.config import RunConfig
    from retrotune.preflight import check_run

    started = time.perf_counter()
    exp = load_experiment(args.file, args.overrides)
    check_run(RunConfig(**{**exp.run, "stage": "finetune"}), index=False)  # the experiment builds a missing index
    if args.plan or args.prepare or args.cell:
        return _plan_step(args, exp)
    results = run_experiment(exp, collect_only=args.collect, partial=args.partial)
    print(results["table"])
    print(f"\nfinished in {(time.perf_counter() - started) / 60:.1f} min; results in "
          f"{load_experiment(args.file, args.overrides).output_dir}/results.md")
    return 0


def _plan_step(args, exp) -> int:
    """--plan writes the grid as shell commands; --prepare and --cell run its lines (see retrotune/plan.py)."""
    from retrotune import plan

    if args.plan:
        script = plan.plan_script(args.file, args.overrides, exp, gpus=args.gpus)
        if args.plan == "-":
            print(script, end="")
        else:
            Path(args.plan).parent.mkdir(parents=True, exist_ok=True)
            Path(args.plan).write_text(script)
            Path(args.plan).chmod(0o755)
            print(f"wrote {args.plan}: run it with bash {args.plan}, or give its --cell lines to a scheduler")
    elif args.prepare:
        plan.prepare_plan(exp)
    else:
        scores = plan.run_named_cell(exp, args.cell)
        if scores is not None:
            print(json.dumps({"cell": args.cell, "em": scores["em"], "f1": scores["f1"]}))
    return 0


def _zero_shot(args) -> int:
    from retrotune.experiment import ExperimentConfig, markdown_table, with_intervals, zero_shot_rows
    from retrotune.config import load_config
    from retrotune.preflight import check_run

    config = load_config(args.file, args.overrides)
    check_run(config.__class__(**{**config.to_dict(), "stage": "finetune", "init_from": None}))
    out = Path(args.out or Path(config.output_dir) / "zero-shot-eval")
    run = {k: v for k, v in config.to_dict().items() if k not in ("stage", "model", "init_from")}
    exp = ExperimentConfig(output_dir=str(out), run=run, corpus=None, zero_shot=args.models)
    retrofit_dir = Path(args.retro_weights) if args.retro_weights else None
    rows = zero_shot_rows(exp, out, retrofit_dir)
    print(markdown_table(with_intervals(rows)))
    return 0


def _checkpoint(args) -> int:
    import shutil

    from retrotune.cell import evaluate_run
    from retrotune.preflight import check_index, check_positive
    from retrotune.runs import verify_final

    verify_final(args.run)  # finished and intact, before any model loads
    if args.index:
        check_index(args.index)
    data = {}
    if args.limit is not None:
        check_positive(args.limit, "--limit")
        data["validation_size"] = args.limit
    if args.qa:  # every question of the file unless --limit says otherwise
        data.update(eval_qa=args.qa, validation_size=args.limit)
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    for part in ("true", "shuffled", "none"):  # evaluated afresh: another index or task must not read old scores
        shutil.rmtree(out / part, ignore_errors=True)
    scores = evaluate_run(Path(args.run), out, controls=args.controls, index=args.index, decoder=args.decoder,
                          task=args.task, **data)
    if scores.get("f1") is not None:  # 95% intervals over the questions scored
        from retrotune.findings import aggregate
        from retrotune.scores import read_evaluation

        row = aggregate([{"model": Path(args.run).name, "method": "checkpoint", "questions": read_evaluation(out)}])[0]
        scores.update({key: value for key, value in row.items() if key.endswith("_ci")})
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    print(json.dumps(scores, indent=2))
    source = args.qa or "the run's evaluation split"
    limit = f" (--limit {args.limit})" if args.limit is not None else ""
    print(f"scored n={scores['n']} questions of {source}{limit}", file=sys.stderr)
    return 0


def _compare(args) -> int:
    from retrotune.config import ConfigError
    from retrotune.findings import compare_records
    from retrotune.scores import read_record

    rows = []
    for path in (args.first, args.second):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such recorded row (an experiment with `record:` writes them to "
                                    f"RECORD/rows/<row>.json)")
        try:
            rows.append({"name": Path(path).stem, "questions": read_record(path)[1]})
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}: not a recorded row (JSON with 'row' and 'questions', as an experiment "
                              f"with `record:` writes)") from None
    result = compare_records(*rows, metric=args.metric)
    names = f"{rows[0]['name']} - {rows[1]['name']}"
    for what, paired in (("score", result["score"]), ("retrieval gain", result.get("retrieval_gain"))):
        if paired is not None:
            print(f"{what} ({args.metric}), {names}: {paired.difference:+.1f} [{paired.low:+.1f}, {paired.high:+.1f}], "
                  f"permutation p = {paired.p_value:.3f}, n = {paired.n}")
    return 0


def _paper(args) -> int:
    from retrotune.grid import load_grid, run_grid

    for flag in ("cell", "methods"):  # `--cell X key=value`: argparse hands the override to --cell's list
        names = getattr(args, flag) or []
        args.overrides += [name for name in names if "=" in name]
        setattr(args, flag, [name for name in names if "=" not in name] or None)
    grid = load_grid(args.file, args.overrides)
    if args.plan:
        from retrotune.grid import plan_script

        script = plan_script(args.file, args.overrides, grid, gpus=args.gpus)
        Path(args.plan).parent.mkdir(parents=True, exist_ok=True)
        Path(args.plan).write_text(script)
        Path(args.plan).chmod(0o755)
        print(f"wrote {args.plan}: run it with bash {args.plan}, or give its --cell lines to a scheduler")
        return 0
    if args.prepare:
        from retrotune.grid import prepare

        prepare(grid)
        return 0
    results = run_grid(grid, cells=args.cell, methods=["zero_shot"] if args.zero_shot else args.methods,
                       collect_only=args.collect)
    print(results["table"])
    print(f"\nfinished in {results['seconds'] / 60:.1f} min; table in {grid.output_dir}/paper_table.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    experiment = commands.add_parser("experiment", help="run (or resume) an experiment YAML and print its table")
    experiment.add_argument("file")
    experiment.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.train.max_steps=10")
    step = experiment.add_mutually_exclusive_group()
    step.add_argument("--plan", metavar="SCRIPT", help="write the grid as a shell script (one line per cell) to "
                                                         "SCRIPT ('-': stdout) instead of running it")
    step.add_argument("--prepare", action="store_true", help="a plan's first line: index, retro-fit, zero-shot "
                                                             "rows, the cells' neighbours")
    step.add_argument("--cell", metavar="NAME", help="a plan's cell line: train and evaluate this cell only")
    step.add_argument("--collect", action="store_true", help="a plan's last line: the table from the finished "
                                                             "cells, training nothing")
    step.add_argument("--partial", action="store_true", help="the table of the rows finished or recorded so far, "
                                                             "naming the rest; trains and evaluates nothing")
    experiment.add_argument("--gpus", type=int, default=1, help="with --plan: GPUs (processes) per cell")
    experiment.set_defaults(handler=_experiment)
    zero = commands.add_parser("zero-shot", help="evaluate the untrained models of a run config")
    zero.add_argument("file", help="a run config YAML (its index, data and decoder are used)")
    zero.add_argument("overrides", nargs="*")
    zero.add_argument("--models", nargs="+", default=["gpt_closed_book", "gpt", "retro"],
                      choices=["gpt_closed_book", "gpt", "retro"])
    zero.add_argument("--retro-weights", help="a retro-fit run folder whose RETRO weights to evaluate")
    zero.add_argument("--out", help="output folder (default: OUTPUT_DIR/zero-shot-eval)")
    zero.set_defaults(handler=_zero_shot)
    checkpoint = commands.add_parser("checkpoint", help="evaluate a trained run")
    checkpoint.add_argument("run", help="the run's output_dir (holding final/)")
    checkpoint.add_argument("--index", help="evaluate against this index: another corpus is recorded beside the "
                                            "scores; refused only if its tokenizer or chunk size differs")
    checkpoint.add_argument("--decoder", help="the base model to load it onto (refused unless the training base)")
    checkpoint.add_argument("--task", help="evaluate on another task (default: the run's)")
    checkpoint.add_argument("--qa", help="other questions to evaluate on, in the task's schema (default: the run's "
                                         "evaluation split)")
    checkpoint.add_argument("--limit", type=int, help="evaluate only N questions")
    checkpoint.add_argument("--controls", nargs="*", default=[], choices=["shuffled", "none"],
                            help="also score with shuffled neighbours and with none")
    checkpoint.add_argument("--out", help="output folder (default: RUN/eval)")
    checkpoint.set_defaults(handler=_checkpoint)
    compare = commands.add_parser("compare", help="two recorded rows compared question by question: the paired "
                                                  "difference with its 95%% interval")
    compare.add_argument("first", help="a recorded row, e.g. benchmarks/study/rows/retro-lora-nall-s0.json")
    compare.add_argument("second", help="the row it is compared with (scored on the same questions)")
    compare.add_argument("--metric", default="f1", choices=["f1", "em", "rouge_l"])
    compare.set_defaults(handler=_compare)
    paper = commands.add_parser("paper", help="run the paper's grid (tasks x base models x GPT/RETRO x methods), "
                                              "or some of its cells, and print the paper-layout table")
    paper.add_argument("file", help="a grid YAML, e.g. configs/paper.yaml")
    paper.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.train.max_steps=10")
    paper.add_argument("--cell", nargs="+", help="only these cells, by name: TASK/BASE/MODEL/METHOD "
                                                 "(e.g. qasper/smollm2-135m/retro/lora)")
    paper.add_argument("--zero-shot", action="store_true", help="only the zero-shot row, for every task")
    paper.add_argument("--methods", nargs="+", help="only these methods (their labels in the grid)")
    paper.add_argument("--plan", metavar="SCRIPT", help="write the grid as a shell script (one line per cell) to "
                                                       "SCRIPT and stop")
    paper.add_argument("--gpus", type=int, default=1, help="with --plan: GPUs (processes) per cell")
    paper.add_argument("--prepare", action="store_true", help="a plan's first line: retro-fits and neighbours")
    paper.add_argument("--collect", action="store_true", help="a plan's last line: the table from the finished "
                                                              "cells, running nothing")
    paper.set_defaults(handler=_paper)
    for command in (experiment, zero, checkpoint, compare, paper):
        command.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    args = parser.parse_args(argv)
    from retrieval.errors import run_cli
    from retrotune.preflight import expected_errors

    from retrieval.distributed import leave_process_group

    try:
        return run_cli(args.handler, args, expected_errors(), debug=args.debug)
    finally:
        leave_process_group()


if __name__ == "__main__":
    from retrieval.distributed import exit_process

    exit_process(main())
