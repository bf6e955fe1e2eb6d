"""Smoke tests of the benchmark runner and of its own scripts at toy sizes (the numbers are not checked for speed)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as runner  # noqa: E402
from benchmarks import bench_lora_memory, bench_retro_pytorch  # noqa: E402

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def sections(markdown: str) -> dict[str, str]:
    """`## title` -> the text up to the next `## `."""
    parts = re.split(r"^## ", markdown, flags=re.M)
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] if "\n" in p else "" for p in parts[1:]}


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The first markdown table in `text`: its header cells and rows of cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, f"no markdown table with rows in:\n{text}"
    assert set(lines[1].replace("|", "")) <= {"-", ":", " "}, f"second table line is not a separator: {lines[1]}"

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split(" | ")]

    return cells(lines[0]), [cells(ln) for ln in lines[2:]]


def test_runner_tiny_on_own_scripts(tmp_path):
    out = tmp_path / "report.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRO_PYTORCH_PYTHON": str(tmp_path / "absent" / "bin" / "python")}
    res = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--only", "retro_pytorch,lora_memory",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    secs = sections(text)

    header, rows = table(secs["Machine"])
    facts = {r[0]: r[1] for r in rows}
    assert {"CPU", "cores", "RAM", "CUDA device", "torch / transformers / peft"} <= set(facts)
    assert re.search(r"\d", facts["RAM"])

    header, rows = table(secs["Scripts"])
    assert header == ["benchmark", "status", "wall time (s)"]
    assert {r[0]: r[1] for r in rows} == {"bench_lora_memory": "ok", "bench_retro_pytorch": "ok"}
    assert "bench_index_build" not in {r[0] for r in rows}  # --only kept the other scripts out

    retro = secs[bench_retro_pytorch.TITLE.removeprefix("## ")]
    header, rows = table(retro)
    assert header == bench_retro_pytorch.HEADERS
    assert len(rows) == 1 and rows[0][1].startswith("skipped") and "setup_retro_pytorch_env.sh" in rows[0][1]

    memory = secs[bench_lora_memory.TITLE.removeprefix("## ")]
    header, rows = table(memory)
    assert header[:len(bench_lora_memory.HEADERS)] == bench_lora_memory.HEADERS
    assert [r[0].split()[0] for r in rows] == ["inference", "LoRA", "full"]
    for r in rows:
        assert all(NUMBER.match(c) for c in r[1:]), f"non-numeric cell in {r}"
        peak, after_load = float(r[2]), float(r[3])
        assert peak >= after_load > 0
    trainable = {r[0].split()[0]: float(r[1]) for r in rows}
    assert trainable["inference"] == 0 < trainable["LoRA"] < trainable["full"]
    assert float(rows[2][5]) == pytest.approx(1.0)  # full fine-tuning against itself
    assert float(rows[0][6]) == pytest.approx(1.0)  # inference against itself


def test_failed_script_is_a_failed_row_and_others_still_reported():
    bad = runner.run_one("bench_no_such_script", tiny=True, timeout=60)
    assert bad.status == "failed (exit 1)"
    assert "No module named" in bad.section
    good = runner.Outcome("bench_fake", "ok", 1.0, "## Fake\n\n| a |\n|---|\n| 1 |")
    text = runner.report([bad, good], tiny=True, left_out=["bench_other"])
    header, rows = table(sections(text)["Scripts"])
    assert [r[:2] for r in rows] == [["bench_no_such_script", "failed (exit 1)"], ["bench_fake", "ok"]]
    assert "## Fake" in text and "Not run in this invocation: bench_other." in text


def test_bare_row_scripts_get_a_title_from_their_docstring():
    title, takes_header = runner._source_facts("bench_retro_pytorch")
    assert title == bench_retro_pytorch.__doc__.strip().split("\n")[0]
    assert takes_header is False  # it prints its own header; only scripts declaring --header are passed it


def test_only_rejects_unknown_names_and_lists_the_known():
    available = ["bench_lora_memory", "bench_retro_pytorch"]
    assert runner.select(available, ["retro_pytorch", "bench_lora_memory.py"]) == available[::-1]
    with pytest.raises(SystemExit, match="available: lora_memory, retro_pytorch"):
        runner.select(available, ["nope"])


@pytest.mark.skipif(not bench_retro_pytorch.DEFAULT_ENV_PYTHON.is_file(),
                    reason="benchmarks/.venv-retro-pytorch absent (bash benchmarks/setup_retro_pytorch_env.sh)")
def test_retro_pytorch_tiny_comparison_when_env_present():
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_retro_pytorch", "--tiny", "--rounds", "1"],
                         cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    header, rows = table(res.stdout)
    assert header == bench_retro_pytorch.HEADERS
    assert len(rows) == 4 and rows[0][0].startswith("retro-pytorch")
    for r in rows:
        assert all(NUMBER.match(c) for c in r[2:]), f"non-numeric cell in {r}"
    assert float(rows[0][-1]) == pytest.approx(1.0)
    # retro-fit mode trains only the added modules: fewer parameters require grad than in the all-trainable row
    assert float(rows[2][3]) < float(rows[1][3]) == pytest.approx(float(rows[1][2]))


def test_bench_peft_compares_lora_and_loretta_rep_inference_in_one_process(capsys):
    from benchmarks import bench_peft

    bench_peft.main(["--tiny", "--methods", "lora", "loretta_rep_qkvo", "--rounds", "3"])
    out = capsys.readouterr().out
    for kind in ("gpt", "retro"):
        found = re.search(rf"Unmerged inference overhead over the frozen base \({kind}, one process, 3 interleaved "
                          rf"rounds, median \[quartiles\]\): LoRETTA_rep ([\d.]+)x \[[\d.]+, [\d.]+\], LoRA "
                          rf"([\d.]+)x .*\(target LoRETTA_rep <= LoRA: (met|missed)\)", out)
        assert found, out
        rep, lora, verdict = float(found[1]), float(found[2]), found[3]
        assert rep > 0 and lora > 0
        if rep != lora:  # the verdict compares the unrounded medians
            assert verdict == ("met" if rep < lora else "missed"), out


def half_unit(printed: str) -> float:
    """Half a unit in the last printed digit of a number: how far rounding may have moved it."""
    decimals = len(printed.partition(".")[2])
    return 0.5 * 10 ** -decimals


def test_bench_study_cell_times_both_losses_and_both_batch_sizes(capsys):
    from benchmarks import bench_study_cell

    assert bench_study_cell.main(["--tiny"]) == 0
    steps, answering = (table(part) for part in capsys.readouterr().out.split("\n\n")[2:4])
    assert [r[0] for r in steps[1]] == [r[0] for r in answering[1]] == ["GPT + neighbours in prompt", "RETRO"]
    for row in steps[1]:
        full, answer, ratio = float(row[2]), float(row[3]), float(row[4].rstrip("x"))
        assert full > 0 and answer > 0
        # the times are printed to 3 significant figures and the ratio to 2 decimals, each from unrounded values:
        # the ratio lies in what the printed times allow, widened by its own rounding
        slack_full, slack_answer = half_unit(row[2]), half_unit(row[3])
        low = (answer - slack_answer) / (full + slack_full) - 0.005
        high = (answer + slack_answer) / (full - slack_full) + 0.005
        assert low <= ratio <= high, (row, low, high)
    assert answering[0][2:4] == ["batches of 4 (s)", "batches of 8 (s)"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in answering[1])
