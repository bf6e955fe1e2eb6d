"""Can the model read its neighbours? A key -> value copy task, RETRO and GPT + neighbours side by side.

Each example asks `key: QXJV value:` and the answer (one of 88 words) is written nowhere but in the neighbour
`key: QXJV value is apple.`: a model that does not read its neighbour is at chance (1/88). Keys are drawn fresh for
every training batch; 64 held-out keys never seen in training are the test set. Both models see the same stream of
examples and are scored in the same run, with true neighbours and with shuffled ones (each test question given the
neighbour of another): a model that reads scores high with the first and at chance with the second.

RETRO trains what retro-fitting adds (neighbour encoder + CCA, base frozen), with chunk m = 8 and one neighbour of
R = 16 tokens; the question is left-padded to end on a chunk boundary, so the token that predicts the answer sees its
chunk's neighbour (the QA layout of `retro.qa`). GPT trains LoRA (r = 8 on attention) with the neighbour text
written before the question. Prints a markdown section: accuracy with true and shuffled neighbours over training
steps, and the steps each model needs to reach 90%.

    python benchmarks/bench_copy_task.py              # SmolLM2-135M-Instruct, seeded
    python benchmarks/bench_copy_task.py --tiny       # a 4-layer toy Llama on token ids (seconds)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import md_table  # noqa: E402
from retro import RetroConfig, qa_layout, retrofit  # noqa: E402

WORDS = ("apple river stone cloud tiger piano garden window silver yellow doctor market island forest winter "
         "summer bottle button candle castle dragon engine farmer flower friend guitar hammer helmet jacket kitten "
         "ladder lemon letter magnet monkey mirror needle orange pencil pepper pillow planet pocket rabbit rocket "
         "saddle shadow sister spider spring square street sugar table ticket tomato tunnel turkey valley wallet "
         "water wheel wizard anchor banana basket beach bread bridge camera carpet cheese circle coffee copper "
         "cotton desert dinner finger glass honey horse house lamp leaf lion moon mountain music ocean paper "
         "queen road salt ship shoe snake star storm sun tree truck village whale wind wolf wood").split()
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Example:
    prompt: list[int]  # `key: QXJV value:`
    answer: int  # the value word's token
    neighbour: list[int]  # `key: QXJV value is apple.`


class CopyTask:
    """Examples built from token pieces, so the same task runs on a real tokenizer or on a toy vocabulary."""

    def __init__(self, key_prefix, key_pieces, prompt_sep, neighbour_sep, suffix, values, key_length: int = 4,
                 seed: int = 0, held_out: int = 64):
        self.key_prefix, self.key_pieces, self.prompt_sep = list(key_prefix), key_pieces, list(prompt_sep)
        self.neighbour_sep, self.suffix, self.values = list(neighbour_sep), list(suffix), list(values)
        self.key_length = key_length
        self.rng = np.random.default_rng(seed)
        keys = set()
        while len(keys) < held_out:
            keys.add(self._key())
        self.held_out_keys = sorted(keys)
        self.test = [self.example(key) for key in self.held_out_keys]

    @classmethod
    def for_tokenizer(cls, tokenizer, seed: int = 0, n_values: int = 88) -> "CopyTask":
        enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        values = []
        for word in WORDS:
            ids = enc(" " + word)
            if len(ids) == 1 and ids[0] not in values:
                values.append(ids[0])
        if len(values) < n_values:
            raise ValueError(f"the tokenizer has only {len(values)} single-token words of the list; need {n_values}")
        pieces = {letter: enc(letter) for letter in LETTERS}
        return cls(enc("key:"), pieces, enc(" value:"), enc(" value is"), enc("."), values[:n_values], seed=seed,
                   held_out=64)

    @classmethod
    def for_vocabulary(cls, vocab_size: int, seed: int = 0, n_values: int = 32) -> "CopyTask":
        """Token ids only: 3..3+26 stand for letters, the last `n_values` ids for values, 1 and 2 for separators."""
        pieces = {letter: [3 + i] for i, letter in enumerate(LETTERS)}
        return cls([1], pieces, [2], [2, 2], [1], range(vocab_size - n_values, vocab_size), seed=seed, held_out=32)

    def _key(self) -> tuple[str, ...]:
        return tuple(self.rng.choice(list(LETTERS), self.key_length))

    def example(self, key: tuple[str, ...]) -> Example:
        key_ids = [t for letter in key for t in self.key_pieces[letter]]
        value = int(self.values[self.rng.integers(len(self.values))])
        prompt = self.key_prefix + key_ids + self.prompt_sep
        return Example(prompt, value, self.key_prefix + key_ids + self.neighbour_sep + [value] + self.suffix)

    def batch(self, n: int) -> list[Example]:
        """Fresh training examples whose keys are never held-out ones."""
        held = set(self.held_out_keys)
        out = []
        while len(out) < n:
            key = self._key()
            if key not in held:
                out.append(self.example(key))
        return out


def shuffled(examples: list[Example]) -> list[Example]:
    """Each question with the neighbour of the next one (another key, usually another value)."""
    return [Example(e.prompt, e.answer, examples[(i + 1) % len(examples)].neighbour) for i, e in enumerate(examples)]


def retro_batch(examples: list[Example], m: int, R: int, pad: int) -> dict:
    return qa_layout([e.prompt for e in examples], [[e.answer] for e in examples], m, pad,
                     neighbours=[np.asarray([e.neighbour[:R]]) for e in examples], num_neighbours=1,
                     neighbour_length=R)


def gpt_batch(examples: list[Example], newline: list[int], pad: int) -> dict:
    return qa_layout([e.neighbour + newline + e.prompt for e in examples], [[e.answer] for e in examples], 1, pad)


RETRO_KEYS = ("input_ids", "attention_mask", "position_ids", "neighbours", "labels")
GPT_KEYS = ("input_ids", "attention_mask", "position_ids", "labels")


def answer_logits(model, batch: dict, keys) -> torch.Tensor:
    """Logits (B, V) at the last prompt position, the one that predicts the answer token; the vocabulary projection
    of the other positions is skipped."""
    P, T = int(batch["prompt_length"]), batch["input_ids"].shape[1]
    out = model(**{k: batch[k] for k in keys if k != "labels"}, logits_to_keep=T - P + 1)
    return out.logits[:, 0]


@torch.no_grad()
def accuracy(model, batch: dict, keys) -> float:
    """Share of examples whose answer token is the argmax at the last prompt position."""
    model.eval()
    logits = answer_logits(model, batch, keys)
    model.train()
    return float((logits.argmax(-1) == batch["labels"][:, int(batch["prompt_length"])]).float().mean())


class Learner:
    """One model on the copy task: its batches, optimiser and test scores."""

    def __init__(self, name: str, model, make_batch, keys, groups: list[dict], test: list[Example]):
        self.name, self.model, self.make_batch, self.keys = name, model, make_batch, keys
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.params = [p for group in groups for p in group["params"]]
        self.test_true, self.test_shuffled = make_batch(test), make_batch(shuffled(test))
        self.curve: list[dict] = []
        self.seconds = 0.0

    def step(self, examples: list[Example]) -> float:
        t0 = time.perf_counter()
        batch = self.make_batch(examples)
        target = batch["labels"][:, int(batch["prompt_length"])]
        loss = torch.nn.functional.cross_entropy(answer_logits(self.model, batch, self.keys).float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - t0
        return loss.item()

    def score(self, step: int) -> dict:
        row = {"step": step, "true": accuracy(self.model, self.test_true, self.keys),
               "shuffled": accuracy(self.model, self.test_shuffled, self.keys)}
        self.curve.append(row)
        return row

    def steps_to(self, target: float) -> int | None:
        return next((row["step"] for row in self.curve if row["true"] >= target), None)


def load(tiny: bool, seed: int):
    if tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
        base = AutoModelForCausalLM.from_config(cfg).eval()
        return base, None, CopyTask.for_vocabulary(96, seed), [0], "tiny Llama (4 layers, width 64)"
    from retrotune.models import load_decoder

    base, tokenizer = load_decoder("smollm2-135m")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return base.eval(), tokenizer, CopyTask.for_tokenizer(tokenizer, seed), newline, "SmolLM2-135M-Instruct"


def run(tiny: bool = False, steps: int = 200, batch_size: int = 16, eval_every: int = 5, retro_lr: float = 1e-3,
        gpt_lr: float = 1e-3, lr_scales: dict | None = None, retro_overrides: dict | None = None, seed: int = 0, models=("retro", "gpt"),
        target: float = 0.9, stop_at: float = 0.98, progress: bool = True) -> dict:
    """Train the chosen models on one seeded example stream; returns their curves and steps-to-`target`."""
    from peft_methods import apply_peft
    from retrotune.config import RETRO_LR_SCALES
    from retrotune.trainer import param_groups

    lr_scales = RETRO_LR_SCALES if lr_scales is None else lr_scales

    base, tokenizer, task, newline, name = load(tiny, seed)
    pad = 0 if tokenizer is None else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    m = 8
    learners = []
    if "retro" in models:
        torch.manual_seed(seed)
        retro = retrofit(copy.deepcopy(base), RetroConfig(chunk_size=m, num_neighbours=1, neighbour_length=2 * m,
                                                          **(retro_overrides or {})))
        retro.train()
        retro.base.eval()
        groups = param_groups(list(retro.retro_parameters()), retro.retro_parameter_groups(), retro_lr, lr_scales)
        learners.append(Learner("RETRO", retro, lambda ex: retro_batch(ex, m, 2 * m, pad), RETRO_KEYS, groups,
                                task.test))
    if "gpt" in models:
        torch.manual_seed(seed)
        gpt = apply_peft(copy.deepcopy(base), {"method": "lora", "r": 8})
        gpt.train()
        learners.append(Learner("GPT + neighbour in prompt", gpt, lambda ex: gpt_batch(ex, newline, pad), GPT_KEYS,
                                [{"params": [p for p in gpt.parameters() if p.requires_grad], "lr": gpt_lr}],
                                task.test))
    for learner in learners:
        learner.score(0)
    active = list(learners)
    bar = tqdm(range(1, steps + 1), desc="copy task", file=sys.stderr, disable=not progress)
    for step in bar:
        examples = task.batch(batch_size)  # the same examples for every model
        for learner in active:
            learner.step(examples)
        if step % eval_every == 0 or step == steps:
            for learner in active:
                learner.score(step)
            bar.set_postfix({lr.name.split()[0]: f"{lr.curve[-1]['true']:.2f}/{lr.curve[-1]['shuffled']:.2f}"
                             for lr in active})
            active = [lr for lr in active if lr.curve[-1]["true"] < stop_at]
            if not active:
                break
    return {"model": name, "chance": 1 / len(task.values), "target": target, "batch_size": batch_size,
            "results": {lr.name: {"curve": lr.curve, "steps_to_target": lr.steps_to(target),
                                  "seconds": lr.seconds} for lr in learners}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy model on token ids (a smoke run in seconds)")
    ap.add_argument("--steps", type=int, help="training steps at most (default 300; tiny 40)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--stop-at", type=float, default=0.98, help="stop a model once its accuracy reaches this")
    ap.add_argument("--retro-lr", type=float, default=1e-3)
    ap.add_argument("--gpt-lr", type=float, default=1e-3)
    ap.add_argument("--lr-scales", help="RETRO's learning-rate multipliers by group (gate, cca_qk, cca, encoder) "
                                        "as JSON (default: train.lr_scales' default)")
    ap.add_argument("--retro", default="{}", help="RetroConfig fields as JSON, e.g. '{\"cca_layers\": [26, 27, 28, 29]}'")
    ap.add_argument("--models", default="retro,gpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--json", help="also write the curves to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.tiny else 300)
    out = run(args.tiny, steps, args.batch, args.eval_every, args.retro_lr, args.gpt_lr, json.loads(args.lr_scales) if args.lr_scales else None,
              json.loads(args.retro),
              args.seed, tuple(args.models.split(",")), stop_at=args.stop_at)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    rows = []
    for name, res in out["results"].items():
        last = res["curve"][-1]
        rows.append([name, res["steps_to_target"] or f"> {last['step']}", f"{100 * last['true']:.1f}",
                     f"{100 * last['shuffled']:.1f}", last["step"], f"{res['seconds']:.0f}"])
    print("## Reading neighbours: key -> value copy task\n")
    print(f"{out['model']}, seed {args.seed}, batch {out['batch_size']} fresh examples a step, 64 held-out keys "
          f"(tiny: 32), chance {100 * out['chance']:.1f}%. Accuracy (%) of the answer token at the last step run; "
          f"a model stops once it scores 98% with true neighbours.\n")
    print(md_table(["model", f"steps to {100 * out['target']:.0f}%", "true neighbours", "shuffled neighbours",
                    "steps run", "train seconds"], rows))
    for name, res in out["results"].items():
        curve = ", ".join(f"{r['step']}: {100 * r['true']:.0f}/{100 * r['shuffled']:.0f}" for r in res["curve"])
        print(f"\n{name} (step: true/shuffled %): {curve}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
