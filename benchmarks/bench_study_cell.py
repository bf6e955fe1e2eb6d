"""What a study cell spends its time on, and what two of its settings save: the answer-only loss and the batch size.

Takes the default decoder (SmolLM2-135M-Instruct; `--tiny`: a 4-layer toy Llama) with LoRA (r = 8, the study's) on
GPT + neighbours in the prompt and on RETRO (joint CCA at gates 0.5, its added layers frozen, as in the study's
cells), and random tokens shaped like the study's questions: GPT prompts of 45 to 195 tokens (one 128-token
neighbour, the question and the chat template), RETRO prompts of 37 to 62 tokens padded to one 64-token chunk with
one 128-token neighbour, answers of 6 tokens. Prints a markdown section with two tables, measured in one run:

- a QA training step (forward + backward, 4 questions): HF's loss from `labels`, which projects every position onto
  the vocabulary, against `retro.qa.labelled_loss`, which projects only the positions that predict an answer token;
- answering the same questions (greedy, KV-cached, 12 new tokens) in batches of 32 against batches of 64, sorted by
  prompt length as the evaluation sorts them.

CPU time of this process, one thread by default; GPU wall time on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fmt, md_table  # noqa: E402
from benchmarks.bench_retro_vs_gpt import Randoms, load_model, measure, timed  # noqa: E402
from retro import RetroConfig, generate, prompt_part, qa_layout, retrofit  # noqa: E402
from retro.qa import labelled_loss  # noqa: E402

ANSWER = 6  # answer tokens (with the end-of-turn token), about the study's SQuAD answers


def lora(model):
    """LoRA as the study's cells have it; on RETRO the added layers stay frozen (`train_retro` is off by default)."""
    import peft_methods as pm

    return pm.apply_peft(model, {"method": "lora", "r": 8})


def questions(rand, n: int, m: int, neighbour: int, retro: bool, seed: int = 0) -> list[tuple]:
    """n (prompt, answer, neighbours) triples with the study's lengths, for GPT (neighbour in the prompt) or RETRO."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if retro:
            length = int(torch.randint(37 * m // 64, 62 * m // 64 + 1, (1,), generator=g))
            out.append((rand(length).tolist(), rand(ANSWER).tolist(), rand(1, neighbour).numpy()))
        else:
            length = int(torch.randint(45 * m // 64, 195 * m // 64 + 1, (1,), generator=g))
            out.append((rand(length).tolist(), rand(ANSWER).tolist(), None))
    return sorted(out, key=lambda q: len(q[0]))


def batch(items: list[tuple], m: int, retro: bool) -> dict:
    prompts, answers, neighbours = zip(*items)
    if retro:
        return qa_layout(list(prompts), list(answers), m, 0, neighbours=list(neighbours))
    return qa_layout(list(prompts), list(answers), 1, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy model and sizes (a smoke run in seconds)")
    ap.add_argument("--questions", type=int, help="questions answered at each batch size (default 128; tiny 16)")
    ap.add_argument("--batches", default=None, help="the two batch sizes compared (default 32,64; tiny 4,8)")
    ap.add_argument("--repeats", type=int, help="timed rounds of the training step after a warm-up (default 3; "
                                                "tiny 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = ap.parse_args(argv)
    m = 8 if args.tiny else 64
    n = args.questions or (16 if args.tiny else 128)
    small, large = (int(b) for b in (args.batches or ("4,8" if args.tiny else "32,64")).split(","))
    repeats = args.repeats or (1 if args.tiny else 3)
    new_tokens = 4 if args.tiny else 12
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    base, name = load_model(args.tiny)
    rand = Randoms(base.get_input_embeddings().weight.shape[0], seed=0)
    retro_model = retrofit(copy.deepcopy(base), RetroConfig(chunk_size=m, num_neighbours=1, attention="joint"))
    retro_model.set_gates(0.5)
    models = {"GPT + neighbours in prompt": (lora(base).to(device), False), "RETRO": (lora(retro_model).to(device), True)}

    steps, answering = [], []
    for label, (model, on_retro) in models.items():
        keys = ("input_ids", "attention_mask", "position_ids", "labels") + (("neighbours",) if on_retro else ())
        train = {k: v.to(device) for k, v in batch(questions(rand, 4, m, 2 * m, on_retro, seed=1), m, on_retro).items()
                 if k in keys}
        model.eval()  # no dropout, so both losses run the same network; gradients flow all the same

        def step(loss):
            model.zero_grad(set_to_none=True)
            loss().backward()

        seconds = measure({"full": lambda: step(lambda: model(**train).loss),
                           "answer": lambda: step(lambda: labelled_loss(model, train))}, repeats)
        tokens = train["input_ids"].shape[1]
        steps.append([label, tokens, fmt(seconds["full"]), fmt(seconds["answer"]),
                      f"{seconds['answer'] / seconds['full']:.2f}x"])

        asked = questions(rand, n, m, 2 * m, on_retro, seed=2)

        def answer(size):
            with torch.no_grad():
                for lo in range(0, n, size):
                    b = batch(asked[lo:lo + size], m, on_retro)
                    generate(model, **prompt_part(b, m if on_retro else 1, device), max_new_tokens=new_tokens)

        answer(large)  # warm-up
        by_size = {size: timed(lambda s=size: answer(s)) for size in (small, large)}
        answering.append([label, n, fmt(by_size[small]), fmt(by_size[large]),
                          f"{by_size[large] / by_size[small]:.2f}x"])
        print(f"{label}: measured", file=sys.stderr)

    unit = "GPU wall time" if device == "cuda" else f"CPU time of the benchmark process, {torch.get_num_threads()} " \
                                                    f"thread(s)"
    print("## What a study cell spends: the answer-only loss and the evaluation's batch size\n")
    print(f"{name} with LoRA (r = 8) on {device}; {unit}. Training: one forward + backward of 4 questions, median of "
          f"{repeats} interleaved rounds after a warm-up. Answering: {n} questions, greedy, {new_tokens} new tokens, "
          f"once after a warm-up.\n")
    print(md_table(["model", "tokens / question in the step", "step, full projection (s)",
                    "step, answer positions only (s)", "answer-only / full"], steps))
    print()
    print(md_table(["model", "questions", f"batches of {small} (s)", f"batches of {large} (s)",
                    f"{large} / {small}"], answering))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
