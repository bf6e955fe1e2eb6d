"""A tiny LoRA run of the shared loop, for the FSDP tests (tests/test_fsdp.py): started once in-process or by
`python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_fit_run.py KIND OUTPUT_DIR STEPS BATCH FSDP`.

KIND is gpt (a 4-layer toy Llama + LoRA) or retro (its retro-fit + LoRA, RETRO's added layers training too); the
data are fixed-length sequences, so the mean of the processes' losses is the loss of their joint batch.
"""
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # tests/, then this checkout

import torch  # noqa: E402

from conftest import TINY_VOCAB, build_tiny_lm, open_retro  # noqa: E402
from retrotune.config import TrainConfig  # noqa: E402
from retrotune.trainer import fit  # noqa: E402

M, K = 4, 2


def data(n=32, length=12):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, TINY_VOCAB, (length,), generator=g),
             "neighbours": torch.randint(0, TINY_VOCAB, (length // M, K, 2 * M), generator=g)} for _ in range(n)]


def collate(kind):
    def run(items):
        ids = torch.stack([item["input_ids"] for item in items])  # (B, T)
        batch = {"input_ids": ids, "labels": ids}
        if kind == "retro":
            batch["neighbours"] = torch.stack([item["neighbours"] for item in items])  # (B, L, K, R)
        return batch
    return run


def model(kind):
    from peft_methods import apply_peft

    torch.manual_seed(0)
    base = build_tiny_lm("llama")
    if kind == "gpt":
        return apply_peft(base, {"method": "lora", "r": 4})
    from retro import RetroConfig, retrofit

    retro = open_retro(retrofit(base, RetroConfig(chunk_size=M, num_neighbours=K)))
    return apply_peft(retro, {"method": "lora", "r": 4, "train_retro": True})


def run(kind: str, output_dir: str, steps: int, batch_size: int, fsdp: bool) -> list[float]:
    config = TrainConfig(max_steps=steps, batch_size=batch_size, lr=1e-2, schedule="constant", eval_every=100,
                         save_every=2, seed=1, fsdp=fsdp)
    named = None
    m = model(kind)
    retro = next((x for x in m.modules() if hasattr(x, "retro_parameter_groups")), None)
    if retro is not None:
        named = retro.retro_parameter_groups()
    result = fit(m, data(), collate(kind), lambda mod, b: mod(**b).loss, config, output_dir,
                 run_config={"model": kind}, named_groups=named)
    return [row["loss"] for row in result.history]


if __name__ == "__main__":
    import faulthandler
    import os

    faulthandler.dump_traceback_later(int(os.environ.get("FIT_RUN_TIMEOUT", "600")), exit=True)  # a hung collective ends the process with its stack
    losses = run(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")

    if os.environ.get("RANK", "0") == "0":
        print("LOSSES " + json.dumps(losses))
    from retrieval.distributed import exit_process

    exit_process(0)
