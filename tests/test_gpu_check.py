"""`python -m retrotune.gpu_check`: one line and exit status 0 without CUDA; its table lists every check, and one
failing check makes the exit status 1 without hiding the others."""
import os
import subprocess
import sys

import pytest
import torch

from retrotune.gpu_check import NO_CUDA, Skipped, exit_status, format_table, run_checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run for real")
def test_without_cuda_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, "-m", "retrotune.gpu_check"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == NO_CUDA
    assert "nothing to check" in done.stdout


def test_table_lists_every_check_and_a_failure_sets_exit_status_1():
    def passing():
        return "2 steps, loss 1.234"

    def failing():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def skipped():
        raise Skipped("faiss without GPU support")

    outcomes = run_checks([("passes", passing), ("fails", failing), ("skips", skipped)])
    assert [(o.name, o.status) for o in outcomes] == [("passes", "pass"), ("fails", "fail"), ("skips", "skip")]
    assert exit_status(outcomes) == 1
    table = format_table(outcomes).splitlines()
    assert table[0].startswith("| check | result |") and len(table) == 5
    assert table[2].startswith("| passes | PASS |") and table[2].endswith("| 2 steps, loss 1.234 |")
    assert table[3].startswith("| fails | FAIL |")
    assert "RuntimeError: CUDA error: an illegal memory access was encountered |" in table[3]
    assert "more lines" not in table[3]
    assert table[4].startswith("| skips | SKIP |") and "skipped: faiss without GPU support" in table[4]


def test_skips_alone_pass():
    outcomes = run_checks([("ok", lambda: "fine"), ("skips", lambda: (_ for _ in ()).throw(Skipped("one GPU")))])
    assert exit_status(outcomes) == 0
