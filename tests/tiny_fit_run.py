"""A tiny training run in its own process, for the kill -9 and determinism tests (tests/test_checkpoint_faults.py).

    python tests/tiny_fit_run.py OUTPUT_DIR STEPS [KILL_AT_CALL]

Trains the top layer of a seeded 4-layer toy Llama with the shared loop (save_every=3); with KILL_AT_CALL the
process sends itself SIGKILL at that call of the loss, as a crash or an OOM kill would end it.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from conftest import TINY_VOCAB, build_tiny_lm  # noqa: E402
from retrotune.config import TrainConfig  # noqa: E402
from retrotune.trainer import fit  # noqa: E402


def data(n=24, length=12):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, TINY_VOCAB, (length,), generator=generator) for _ in range(n)]


def collate(items):
    ids = torch.stack(items)
    return {"input_ids": ids, "labels": ids}


def model():
    m = build_tiny_lm("llama")
    for name, p in m.named_parameters():
        p.requires_grad = ".layers.3." in name
    return m


def main(output_dir: str, steps: int, kill_at: int | None = None) -> None:
    calls = {"n": 0}

    def loss(m, batch):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return m(**batch).loss

    config = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, eval_every=100, save_every=3, seed=1)
    fit(model(), data(), collate, loss, config, output_dir, run_config={"model": "tiny"})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
