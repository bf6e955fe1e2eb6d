"""Smoke run of benchmarks/bench_retro_vs_gpt.py on its toy model: every design on every shape, against the base."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_retro_vs_gpt_tiny(capsys, tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_retro_vs_gpt import main

    saved = tmp_path / "costs.json"
    assert main(["--tiny", "--shapes", "qa,corpus-32,generation", "--depths", "2", "--gpt-max-tokens", "100",
                 "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## What reading neighbours costs")
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].split("|")[2:5] == [" qa ", " corpus-32 ", " generation "]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]] for ln in table[1:]}
    assert list(rows) == ["base (ms)", "GPT + neighbours in prompt", "RETRO, separate", "RETRO, joint",
                          "RETRO, joint, states kept", "RETRO, joint, depth 2", "RETRO, joint, layers 2-3, depth 2"]
    assert all(float(ms) > 0 for ms in rows["base (ms)"])
    assert rows["GPT + neighbours in prompt"][1] == "skipped (160 tokens > --gpt-max-tokens)"  # 32 + 4 chunks x 2 x 16
    ratios = json.loads(saved.read_text())["ratios"]  # --json holds the same ratios, unrounded
    assert set(ratios) == {"qa", "corpus-32", "generation"}
    for who, cells in list(rows.items())[1:]:
        for shape, cell in zip(["qa", "corpus-32", "generation"], cells):
            assert (who in ratios[shape]) == cell.endswith("x"), (who, shape)
            assert who not in ratios[shape] or f"{ratios[shape][who]:.2f}x" == cell, (who, shape)
    rows["GPT + neighbours in prompt"].pop(1)
    for who, cells in list(rows.items())[1:]:
        assert all(c.endswith("x") and float(c[:-1]) > 0 for c in cells), who  # every ratio measured


def test_bench_retro_vs_gpt_refuses_layers_the_decoder_lacks():
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_retro_vs_gpt import main

    with pytest.raises(ValueError, match="--layer-sets 2-5@2: the decoder has 4 layers"):
        main(["--tiny", "--shapes", "qa", "--layer-sets", "2-5@2"])
