"""The grid on a cluster: an experiment as shell commands, one per cell, for a standard scheduler to run in parallel.

Takes an experiment YAML (and its overrides); gives a bash script of three parts:
- `--prepare`, once and first: the index, the retro-fit stage, the zero-shot rows and every cell's neighbours (so
  the cells, running at once, only read the shared neighbour cache);
- one `--cell NAME` line per grid cell (train, then evaluate), each independent of the others, marked with the GPUs
  it uses (`# gpus=G`; with G > 1 it runs under torchrun, data-parallel);
- `--collect`, last: reads the finished cells into the table (`results.md`), training nothing.

On one machine the script runs as it is, top to bottom. On a cluster the cell lines go to a job array (see README).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from retrotune.config import ConfigError
from retrotune.experiment import ExperimentConfig, grid_cells, prepare, retrofit_folder, run_cell, zero_shot_rows

CELL_MARK = "--cell"


def plan_script(file: str, overrides: list[str], exp: ExperimentConfig, gpus: int = 1,
                python: str | None = None, root: str | Path | None = None) -> str:
    """The bash script of an experiment's plan (see the module docstring)."""
    names = [cell[0] for cell in grid_cells(exp, None)]
    return shell_script("experiment", file, overrides, names, exp.output_dir, gpus, python, root)


def shell_script(subcommand: str, file: str, overrides: list[str], names: list[str], output_dir: str,
                 gpus: int = 1, python: str | None = None, root: str | Path | None = None) -> str:
    """A plan as bash: `eval.py SUBCOMMAND FILE OVERRIDES` with --prepare, then --cell NAME for each of `names`,
    then --collect. Every value from the user (paths, overrides, cell names) is shell-quoted, and comments hold no
    line break, so running the script runs only these commands whatever the names contain."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ConfigError(f"--gpus must be a positive number of GPUs per cell, got {gpus!r}")
    root = Path(root or Path.cwd()).resolve()  # paths in the experiment are relative to where it was planned
    command = f"\"$EVAL\" {subcommand} {shlex.join([file, *overrides])}"
    launcher = "\"$PYTHON\"" if gpus == 1 else f"\"$PYTHON\" -m torch.distributed.run --nproc_per_node {gpus}"
    cells = [f"{launcher} {command} {CELL_MARK} {shlex.quote(name)}  # gpus={gpus}" for name in names]
    lines = [
        "#!/usr/bin/env bash",
        _comment(f"Plan of {shlex.join([file, *overrides])}: {len(names)} cells, results in {output_dir}."),
        "# One machine: run this file as it is. A cluster: run the --prepare line once, then the --cell lines in",
        "# parallel (each is independent and needs the GPUs its comment names), then the --collect line.",
        "set -euo pipefail",
        f"DEFAULT_PYTHON={shlex.quote(python or sys.executable)}",
        f"DEFAULT_EVAL={shlex.quote(str(Path(__file__).resolve().parents[1] / 'eval.py'))}",
        f"DEFAULT_ROOT={shlex.quote(str(root))}",
        "PYTHON=\"${PYTHON:-$DEFAULT_PYTHON}\"",
        "EVAL=\"${RETROTUNE_EVAL:-$DEFAULT_EVAL}\"",
        "cd \"${RETROTUNE_ROOT:-$DEFAULT_ROOT}\"",
        f"\"$PYTHON\" {command} --prepare",
        *cells,
        f"\"$PYTHON\" {command} --collect",
    ]
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    """One comment line: control characters (a line break would end the comment) are shown escaped."""
    return "# " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def prepare_plan(exp: ExperimentConfig) -> None:
    """Everything the cells share, done once: index, retro-fit, zero-shot rows, and the neighbours of every cell's
    training and validation questions (written into the shared cache here, read by the cells)."""
    from backbones import load_tokenizer
    from retrotune import neighbours
    from retrotune.cell import task_data
    from retrotune.tasks import get_task

    retrofit_dir = prepare(exp)
    zero_shot_rows(exp, Path(exp.output_dir), retrofit_dir)
    seen = set()
    for _, _, _, _, _, _, config in grid_cells(exp, retrofit_dir):
        key = (config.task, config.index, config.retriever, config.neighbours, config.neighbours_cache,
               config.data.qa, config.data.train_size, config.train.seed, str(config.data.validation_groups),
               config.data.validation_fraction, config.data.validation_size)
        if key in seen:
            continue
        seen.add(key)
        task = get_task(config.task)
        retriever = neighbours.open_retrieval(config, task, load_tokenizer(config.decoder))
        for part in task_data(config):
            neighbours.attach(config, task, retriever, part)


def run_named_cell(exp: ExperimentConfig, name: str) -> dict | None:
    """Train and evaluate the cell `name` (under torchrun every process trains, the first one evaluates);
    returns its scores (None in the other processes)."""
    from retrotune.cell import train_run
    from retrotune.runs import FINAL

    retrofit_dir = retrofit_folder(exp) if exp.retrofit is not None else None
    if retrofit_dir is not None and not (retrofit_dir / FINAL / "run.json").is_file():
        raise ConfigError(f"{retrofit_dir} holds no finished retro-fit; run the plan's --prepare line first")
    cells = {cell[0]: cell for cell in grid_cells(exp, retrofit_dir)}
    if name not in cells:
        raise ConfigError(f"--cell {name!r} is not a cell of this experiment; its cells are {sorted(cells)}")
    _, _, _, _, _, folder, config = cells[name]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not (folder / FINAL / "run.json").is_file():
            train_run(config)
        if int(os.environ.get("RANK", "0")) != 0:
            return None
    return run_cell(exp, name, folder, config)[1]
