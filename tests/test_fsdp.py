"""FSDP (FSDP2 through torch.distributed, two CPU processes over gloo) trains GPT + LoRA and RETRO + LoRA with the
losses of the single-process run on the same joint batches, writes checkpoints that hold the same whole trained
tensors, and resumes from one onto the same loss curve."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import fsdp_fit_run

HELPER = Path(__file__).parent / "fsdp_fit_run.py"


def _fsdp_on_cpu_reason() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo process group, so FSDP cannot run on CPU processes"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


pytestmark = pytest.mark.skipif(_fsdp_on_cpu_reason() is not None, reason=str(_fsdp_on_cpu_reason()))


def _launch(kind: str, output_dir: Path, steps: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FIT_RUN_TIMEOUT": "1500"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(HELPER), kind,
                           str(output_dir), str(steps), "4", "1"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])


@pytest.mark.parametrize("kind", ["gpt", "retro"])
def test_fsdp_matches_one_process_and_resumes(kind, tmp_path):
    torch.set_num_threads(1)  # the same reductions as in the launched processes
    single = fsdp_fit_run.run(kind, str(tmp_path / "single"), 6, 8, False)  # one process, joint batches of 8
    sharded = _launch(kind, tmp_path / "fsdp", 4)  # two processes, 4 each
    assert sharded == pytest.approx(single[:4], rel=1e-4)

    whole = load_file(str(tmp_path / "single" / "checkpoint-4" / "trainable.safetensors"))
    saved = load_file(str(tmp_path / "fsdp" / "checkpoint-4" / "trainable.safetensors"))
    assert saved.keys() == whole.keys() and len(saved) > 0
    for name in whole:
        torch.testing.assert_close(saved[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)

    resumed = _launch(kind, tmp_path / "fsdp", 6)  # resumes from checkpoint-4
    assert resumed == pytest.approx(single, rel=1e-4)
