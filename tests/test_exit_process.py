"""exit_process: a plain process exits through the interpreter's teardown; a torchrun rank skips it, yet keeps its
exit status and whatever it printed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import atexit, sys
sys.path.insert(0, {root!r})
from retrieval.distributed import exit_process
atexit.register(lambda: print("teardown ran", file=sys.stderr))
print("result line", end="")  # still in stdout's buffer: a pipe is block-buffered
print("last words", end="", file=sys.stderr)
exit_process(3)
"""


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_status_and_output_survive_and_teardown_runs_only_outside_torchrun(world):
    env = {**os.environ, "WORLD_SIZE": world}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout == "result line"
    assert done.stderr.startswith("last words")
    assert ("teardown ran" in done.stderr) == (world == "1")
