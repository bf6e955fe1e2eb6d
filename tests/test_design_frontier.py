"""benchmarks/design_frontier.py on the recorded designs: every design folder loads, joint CCA is the reference, and
the verdict column follows the two bars (cost and reading)."""
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import design_frontier  # noqa: E402


def table(out: str) -> dict[str, list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:])}


def recorded(tmp_path: Path, ratios: dict[str, float]) -> Path:
    """The recorded design folders, with a costs.json of the given corpus-512 ratios (by bench label)."""
    designs = tmp_path / "designs"
    shutil.copytree(design_frontier.DESIGNS, designs, ignore=shutil.ignore_patterns("costs.json"))
    (designs / "costs.json").write_text(json.dumps({"model": "m", "device": "cpu", "unit": "u", "repeats": 1,
                                                    "ratios": {"qa": {}, "corpus-512": ratios}}))
    return designs


def test_frontier_of_the_recorded_designs(tmp_path, capsys):
    folders = sorted(p.name for p in design_frontier.DESIGNS.iterdir() if p.is_dir())
    labels = {json.loads((design_frontier.DESIGNS / f / "design.json").read_text())["bench"] for f in folders}
    ratios = {label: 1.2 for label in labels} | {"RETRO, joint": 2.2}
    assert design_frontier.main(["--designs", str(recorded(tmp_path, ratios))]) == 0
    rows = table(capsys.readouterr().out)
    assert len(rows) == len(folders)
    joint = rows["joint CCA, every layer reads its own states (shipped)"]
    assert joint["minus joint CCA (paired)"] == "-"
    assert joint["corpus-512 cost"] == "2.20x" and joint["clears both bars"] == "no: cost"  # it reads: +8.4 F1
    kept = rows["joint CCA, neighbour states kept"]  # the same computation, so the same record and reading
    assert kept["RETRO + LoRA F1"] == joint["RETRO + LoRA F1"]
    assert kept["corpus-512 cost"] == "1.20x (2.20x on first sight)" and kept["clears both bars"] == "no: cost"
    cheap_reader = dict(ratios, **{"RETRO, joint": 1.4})
    assert design_frontier.main(["--designs", str(recorded(tmp_path / "cheap", cheap_reader))]) == 0
    assert table(capsys.readouterr().out)["joint CCA, neighbour states kept"]["clears both bars"] == "yes"
    depth8 = rows["joint CCA, neighbours through the first 8 layers"]
    assert depth8["minus joint CCA (paired)"].startswith("-5.0 [")  # 7.3 - 12.3 F1 on the same 400 questions
    assert depth8["clears both bars"] == "no: reading"


def test_frontier_without_costs_still_reports_reading(tmp_path, capsys):
    designs = recorded(tmp_path, {})
    (designs / "costs.json").unlink()
    assert design_frontier.main(["--designs", str(designs)]) == 0
    rows = table(capsys.readouterr().out)
    assert not any(key.endswith(" cost") for key in next(iter(rows.values())))
    assert rows["joint CCA, neighbours through the first 4 layers"]["clears both bars"] == "no: reading"


def test_a_design_without_its_rows_is_refused(tmp_path):
    designs = recorded(tmp_path, {})
    shutil.rmtree(designs / "depth-4" / "rows")
    with pytest.raises(SystemExit, match=r"depth-4/rows/zero-shot-retro.json: missing"):
        design_frontier.main(["--designs", str(designs)])


RECORDED = sorted(p.name for p in design_frontier.DESIGNS.iterdir()
                  if p.is_dir() and not json.loads((p / "design.json").read_text()).get("record"))


@pytest.mark.parametrize("name", RECORDED)
def test_a_design_record_is_what_its_command_records(name, tmp_path, monkeypatch):
    """The recorded rows were made with the setup the design's overrides give (checked as a rerun of its command
    checks them), and they are every row the command asks for: its rerun reads them and computes nothing."""
    from retrotune.experiment import load_experiment, run_experiment

    monkeypatch.chdir(ROOT)
    design = json.loads((design_frontier.DESIGNS / name / "design.json").read_text())
    exp = load_experiment("configs/study.yaml", design["overrides"] + [f"output_dir={tmp_path / 'out'}",
                                                                         f"record=benchmarks/study/designs/{name}"])
    result = run_experiment(exp, partial=True)
    assert result["missing"] == []
    assert [(row["model"], row["method"]) for row in result["rows"]] == [("RETRO (retro-fitted)", "zero-shot"),
                                                                         ("RETRO", "lora")]
    assert not (tmp_path / "out" / "cells").exists()


def test_the_study_record_is_what_the_study_config_records(tmp_path, monkeypatch):
    """Joint CCA's point on the frontier is the study's own record: every row of configs/study.yaml is in it, made
    with the shipped setup."""
    from retrotune.experiment import load_experiment, run_experiment

    monkeypatch.chdir(ROOT)
    result = run_experiment(load_experiment("configs/study.yaml", [f"output_dir={tmp_path}"]), partial=True)
    assert result["missing"] == []
    assert len(result["rows"]) == 3 + 2 * 7  # three zero-shot rows, seven methods on both models
