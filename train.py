"""Train RETRO or the GPT baseline: `retrofit` (RETRO's added layers on corpus text) or `finetune` (QA, any PEFT method).

    python train.py configs/finetune_retro_lora.yaml
    python train.py configs/finetune_gpt_lora.yaml train.max_steps=200 peft.r=16 output_dir=runs/gpt-r16
    torchrun --nproc_per_node 4 train.py configs/finetune_gpt_lora.yaml     # data-parallel on 4 GPUs

Re-running the same command resumes from the newest checkpoint in output_dir (or, when it is damaged, from the
newest intact one). Bad input is reported as one `error: ...` line with exit status 2 (`--debug`: traceback).
"""
from __future__ import annotations

import argparse
import json
import os

from retrotune.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields: train.lr=3e-4")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    args = parser.parse_args(argv)
    from retrieval.errors import run_cli
    from retrotune.preflight import expected_errors

    from retrieval.distributed import leave_process_group

    try:
        return run_cli(_train, args, expected_errors(), debug=args.debug)
    finally:
        leave_process_group()


def _train(args) -> int:
    from retrotune.preflight import check_run

    config = load_config(args.config, args.overrides)
    check_run(config)  # before any model is loaded
    from backbones import check_quantise, default_device

    check_quantise(config.quantise, args.device)
    from retrotune.cell import train_run

    summary = train_run(config, device=args.device or default_device())
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process reports
        return 0
    print(json.dumps({"output_dir": config.output_dir, "steps": summary["steps"],
                      "trainable_parameters": summary["trainable_parameters"], "last": summary["last"]}, indent=2))
    return 0


if __name__ == "__main__":
    from retrieval.distributed import exit_process

    exit_process(main())
