"""Smoke run of benchmarks/bench_retro_vs_gpt.py on its toy model: every design on every shape, against the base."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_retro_vs_gpt_tiny(capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_retro_vs_gpt import main

    assert main(["--tiny", "--shapes", "qa,corpus-32,generation", "--depths", "2", "--gpt-max-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## What reading neighbours costs")
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].split("|")[2:5] == [" qa ", " corpus-32 ", " generation "]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]] for ln in table[1:]}
    assert list(rows) == ["base (ms)", "GPT + neighbours in prompt", "RETRO, separate", "RETRO, joint",
                          "RETRO, joint, states kept", "RETRO, joint, depth 2"]
    assert all(float(ms) > 0 for ms in rows["base (ms)"])
    assert rows["GPT + neighbours in prompt"][1] == "skipped (160 tokens > --gpt-max-tokens)"  # 32 + 4 chunks x 2 x 16
    rows["GPT + neighbours in prompt"].pop(1)
    for who, cells in list(rows.items())[1:]:
        assert all(c.endswith("x") and float(c[:-1]) > 0 for c in cells), who  # every ratio measured
