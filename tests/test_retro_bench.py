"""Smoke run of benchmarks/bench_retro_vs_gpt.py on its toy model: it completes and prints a full table."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_retro_vs_gpt_tiny(capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_retro_vs_gpt import main

    assert main(["--tiny", "--ks", "2,5", "--repeats", "1", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## RETRO vs GPT baseline")
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["2", "5"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[3:11]), r  # times and ratios measured, not blank
        assert int(cells[2]) > int(cells[1])  # GPT reads the neighbours as tokens, RETRO does not
