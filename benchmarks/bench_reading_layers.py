"""Where should joint CCA read? Answer loss with true and shuffled neighbours, per set of CCA layers, before training.

Joint CCA reads a chunk's neighbours inside each chosen layer's own attention, through projections that start as the
layer's own, so with its gates fully open it reads them as it would read the same text written before its window,
untrained. That makes a cheap screen of placements: for each set of layers, the answer NLL (nats per answer token)
of held-out SQuAD-open questions with their true neighbour and with a shuffled one (another article's), beside GPT
with the neighbour in its prompt and closed book. The neighbours pass the frozen decoder only up to the highest CCA
layer, so the depth read is also the encoding cost (`bench_retro_vs_gpt` times it).

    python benchmarks/bench_reading_layers.py                 # the study's evaluation questions, first 64
    python benchmarks/bench_reading_layers.py --layers "0-29;0-7;0-3"
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import md_table  # noqa: E402

DEFAULT_LAYERS = "0-29;0-7;0-15;0-29@4;0-29@8;0-29@12"


def parse_layers(spec: str) -> list[tuple[tuple[int, ...], int | None]]:
    """'0-7;0-29@8' -> [((0..7), None), ((0..29), 8)]: sets separated by ';', ranges inclusive, '@d' a
    neighbour depth (`RetroConfig.neighbour_depth`)."""
    sets = []
    for part in spec.split(";"):
        part, _, depth = part.partition("@")
        layers = []
        for piece in part.split(","):
            lo, _, hi = piece.strip().partition("-")
            layers += range(int(lo), int(hi or lo) + 1)
        sets.append((tuple(sorted(set(layers))), int(depth) if depth else None))
    return sets


def describe(layers: tuple[int, ...]) -> str:
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + (None,)):
        if cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ",".join(runs)


def answer_nll(qa, records: list[dict], batch_size: int) -> float:
    """Mean negative log-likelihood per answer token of `records`' answers under `qa`."""
    total, tokens = 0.0, 0
    for i in range(0, len(records), batch_size):
        batch = qa.encode_batch(records[i:i + batch_size])
        total -= float(qa.answer_log_likelihood(batch).sum())
        tokens += int((batch["labels"] != -100).sum())
    return total / tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/study.yaml"), help="experiment whose questions to use")
    ap.add_argument("--layers", default=DEFAULT_LAYERS,
                    help=f"CCA layer sets, ';'-separated, '@d' a neighbour depth (default {DEFAULT_LAYERS})")
    ap.add_argument("--questions", type=int, default=64, help="evaluation questions scored (default 64)")
    ap.add_argument("--gate", type=float, default=10.0, help="pre-tanh gate value (default 10: fully open)")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="8 questions, two layer sets (a smoke run of the real models)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.questions, args.layers = 8, "0-29;0-29@8"
    if args.threads:
        torch.set_num_threads(args.threads)

    from retro import GPTQA, RetroConfig, RetroQA, retrofit
    from retro.model import decoder_layers
    from retrotune import assemble, neighbours
    from retrotune.controls import control_records
    from retrotune.experiment import _run_config, ensure_index, load_experiment
    from retrotune.cell import task_data
    from retrotune.tasks import get_task

    exp = load_experiment(args.config)
    ensure_index(exp)  # the experiment's own index, built from its corpus when missing
    config = _run_config(exp)
    task = get_task(config.task)
    evaluation = task_data(config, with_train=False)[1][:args.questions]
    base, tokenizer = assemble.build_backbone(config)
    base.eval()
    retriever = neighbours.open_retrieval(config, task, tokenizer)
    records = neighbours.attach(config, task, retriever, evaluation)
    shuffled = control_records(records, "shuffled")
    k, bs = config.neighbours, 8
    gpt = GPTQA(base, tokenizer, k, config.prompt_budget)
    closed = GPTQA(base, tokenizer, 0, config.prompt_budget)
    rows = [["closed book", "-", f"{answer_nll(closed, records, bs):.2f}", "-", "-"],
            ["GPT + neighbour in prompt", "-", f"{answer_nll(gpt, records, bs):.2f}",
             f"{answer_nll(gpt, shuffled, bs):.2f}", None]]
    rows[1][4] = f"{float(rows[1][3]) - float(rows[1][2]):+.2f}"
    for layers, depth in tqdm(parse_layers(args.layers), desc="layer sets", file=sys.stderr):
        t0 = time.process_time()
        model = retrofit(base, RetroConfig(**{**exp.run["retro"], "num_neighbours": k, "cca_layers": layers,
                                              "neighbour_depth": depth}))
        model.set_gates(args.gate)
        qa = RetroQA(model, tokenizer)
        true, wrong = answer_nll(qa, records, bs), answer_nll(qa, shuffled, bs)
        model.remove_hooks()
        depth = f"{model.neighbour_depth}/{len(decoder_layers(model.base))}"
        rows.append([f"joint CCA on layers {describe(layers)}", depth,
                     f"{true:.2f}", f"{wrong:.2f}", f"{wrong - true:+.2f}"])
        print(f"{describe(layers)} @{depth}: {true:.3f} / {wrong:.3f} ({time.process_time() - t0:.0f} s CPU)",
              file=sys.stderr)
    print("## Where joint CCA reads: answer loss before training, per set of CCA layers\n")
    print(f"{config.decoder}, {len(records)} evaluation questions of {args.config} (article-disjoint from training), "
          f"{k} neighbour(s) each; gates at tanh({args.gate:g}), score biases 0, nothing trained. Answer NLL in nats "
          f"per answer token; shuffled: each question with another article's neighbour. Depth: decoder layers the "
          f"neighbours pass (the encoding cost).\n")
    print(md_table(["reader", "neighbour depth", "NLL, true neighbours", "NLL, shuffled", "reading (shuffled - true)"],
                   rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
