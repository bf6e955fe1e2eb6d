"""What reading neighbours costs: every RETRO design against the frozen base and against GPT, on three shapes.

Takes the default decoder (SmolLM2-135M-Instruct; `--tiny`: a 4-layer toy Llama) and random neighbour tokens of
real-text length (R = 2m each); prints a markdown section with, per shape, each model's time and its ratio to the
frozen base on the same tokens, all measured in one run with the models interleaved.

Shapes:
- qa: a batch of questions (40 tokens) and answers (24), one neighbour set of K per question; one training step.
- corpus-T: one sequence of T tokens whose every chunk has its own K neighbours (a retro-fit's shape); one training
  step, next-token loss on every token.
- generation: a one-chunk prompt, then `--gen-chunks` chunks generated greedily (KV-cached) with re-retrieval after
  every chunk (fresh neighbours for the chunk just finished).
Models: the frozen base on the text alone; RETRO with each design (`separate`: its own encoder and CCA blocks;
`joint`: the decoder encodes the neighbours and every layer reads them; `joint, depth d`: the neighbours pass only
the decoder's first d layers, `RetroConfig.neighbour_depth`; `joint, layers a-b, depth d`: joint CCA on layers a..b
only, its neighbours through the first d layers, so the backward stops at layer a and the encoding at d (the cheap
end of joint CCA); `joint, states kept`: joint CCA whose every neighbour
was run through the frozen decoder before, inside `RetroModel.reusing_neighbours`, which is what joint CCA costs
when a small database is read more than once, as over several epochs of a retro-fit: it reads exactly what
`joint` reads); GPT with the same neighbour text in its prompt (for
generation it re-reads its prompt with the new neighbours after every chunk, as in-context retrieval does).
Training steps: RETRO trains only its added parameters at gates 0.5 (a model that reads), the base is frozen; the
base and GPT have no trainable parameter of their own, so their backward runs to the input embeddings (activation
gradients through the whole frozen backbone, the least any PEFT method pays). CPU time of this process, one thread
by default (robust to other load on a shared machine); GPU wall time on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fmt, md_table  # noqa: E402
from benchmarks.bench_reading_layers import describe, parse_layers  # noqa: E402
from retro import RetroConfig, generate, prompt_part, qa_layout, retrofit  # noqa: E402


def load_model(tiny: bool):
    if tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        return AutoModelForCausalLM.from_config(cfg).eval(), "tiny Llama (4 layers, width 64)"
    from backbones import load_decoder

    model, _ = load_decoder("smollm2-135m")
    return model.eval(), "SmolLM2-135M-Instruct (30 layers, width 576)"


KEPT = "joint, states kept"  # joint CCA reading neighbours whose decoder states it computed before


def designs(depths: list[int], layer_sets: list[tuple[tuple[int, ...], int | None]], n_layers: int) -> dict[str, dict]:
    """RetroConfig fields of each design compared, by label. `layer_sets`: (CCA layers, neighbour depth) pairs."""
    out = {"separate": {"attention": "separate"}, "joint": {"attention": "joint"}, KEPT: {"attention": "joint"}}
    for d in depths:
        if d < n_layers:
            out[f"joint, depth {d}"] = {"attention": "joint", "neighbour_depth": d}
    for layers, depth in layer_sets:
        if layers[-1] >= n_layers or (depth or 0) > n_layers:
            spec = describe(layers) + (f"@{depth}" if depth else "")
            raise ValueError(f"--layer-sets {spec}: the decoder has {n_layers} layers")
        label = f"joint, layers {describe(layers)}" + (f", depth {depth}" if depth else "")
        out[label] = {"attention": "joint", "cca_layers": layers, "neighbour_depth": depth}
    return out


class Randoms:
    def __init__(self, vocab: int, seed: int):
        self.vocab, self.g = vocab, torch.Generator().manual_seed(seed)

    def __call__(self, *shape) -> torch.Tensor:
        return torch.randint(10, self.vocab, shape, generator=self.g)


def frozen_step(base, input_ids, attention_mask, position_ids, labels, **_):
    """Forward + backward of the frozen base, gradients to the input embeddings only."""
    embeds = base.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
         labels=labels).loss.backward()


def retro_step(model, batch):
    keys = ("input_ids", "attention_mask", "position_ids", "neighbours", "labels")
    model.zero_grad(set_to_none=True)
    model(**{k: batch[k] for k in keys}).loss.backward()


def qa_shape(rand, B: int, k: int, m: int):
    """(text-only batch, RETRO batch, GPT batch) of B questions + answers with k neighbours each."""
    q_len, a_len = 40, 24
    questions, answers, neighbours = rand(B, q_len), rand(B, a_len), rand(B, k, 2 * m)  # neighbours (B, K, R)
    plain = qa_layout(questions.tolist(), answers.tolist(), 1, 0)
    retro = qa_layout(questions.tolist(), answers.tolist(), m, 0, neighbours=list(neighbours.numpy()))
    gpt = qa_layout([torch.cat([neighbours[b].flatten(), questions[b]]).tolist() for b in range(B)],
                    answers.tolist(), 1, 0)
    return plain, retro, gpt


def corpus_shape(rand, T: int, k: int, m: int):
    """One sequence of T tokens, every chunk with its own k neighbours; GPT reads all of them before the text."""
    ids, neighbours = rand(1, T), rand(1, T // m, k, 2 * m)  # neighbours (1, L, K, R)
    ones = torch.ones_like(ids)
    plain = {"input_ids": ids, "attention_mask": ones, "position_ids": torch.arange(T)[None], "labels": ids}
    retro = {**plain, "neighbours": neighbours}
    prompt = neighbours.flatten()[None]  # (1, L*K*R)
    gpt_ids = torch.cat([prompt, ids], dim=1)
    gpt = {"input_ids": gpt_ids, "attention_mask": torch.ones_like(gpt_ids),
           "position_ids": torch.arange(gpt_ids.shape[1])[None],
           "labels": torch.cat([torch.full_like(prompt, -100), ids], dim=1)}
    return plain, retro, gpt


class _Silent:
    """The tokenizer `generate` needs to turn a finished chunk into a query text; the random retriever ignores it."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def generation_runs(base, model, rand, k: int, m: int, chunks: int, device: str):
    """Callables generating `chunks` chunks after a one-chunk prompt: base alone, RETRO with re-retrieval after each
    chunk, GPT re-reading a prompt with the latest chunk's neighbours before each chunk."""
    prompt = rand(1, m).to(device)
    fresh = [rand(1, k, 2 * m).to(device) for _ in range(chunks + 1)]  # the neighbours each retrieval returns
    new = chunks * m

    def plain():
        generate(base, prompt, max_new_tokens=new)

    def retro():
        served = iter(fresh[1:])
        generate(model, prompt, neighbours=fresh[0][:, None], max_new_tokens=new,
                 retrieve=lambda texts: next(served), tokenizer=_Silent())

    def gpt():
        text = prompt
        for c in range(chunks):
            ids = torch.cat([fresh[c].flatten()[None], text], dim=1)
            text = torch.cat([text, generate(base, ids, max_new_tokens=m)], dim=1)

    return plain, retro, gpt


def timed(fn) -> float:
    """Seconds of `fn()`: GPU wall time on a GPU, else CPU time of this process."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def measure(runs: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each run over `repeats` rounds (runs interleaved within a round), after one warm-up each."""
    for fn in runs.values():
        fn()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds[name].append(timed(fn))
    return {name: statistics.median(s) for name, s in seconds.items()}


def to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy model and sizes (a smoke run in seconds)")
    ap.add_argument("--shapes", default="qa,corpus-512,corpus-2048,generation",
                    help="shapes to measure (default qa,corpus-512,corpus-2048,generation)")
    ap.add_argument("--depths", default="4,8", help="neighbour depths of the `joint, depth d` designs (default 4,8)")
    ap.add_argument("--layer-sets", help="joint CCA on some layers only, as bench_reading_layers writes them: "
                                         "'20-29@20' is layers 20..29 reading neighbours that passed the first 20 "
                                         "layers; sets separated by ';' (default 20-29@20; tiny 2-3@2; '' for none)")
    ap.add_argument("--json", help="also write every ratio to this JSON file ({shape: {model: ratio}})")
    ap.add_argument("--k", type=int, default=2, help="neighbours per chunk (default 2)")
    ap.add_argument("--batch", type=int, default=2, help="questions per step in the qa shape (default 2)")
    ap.add_argument("--gen-chunks", type=int, help="chunks generated in the generation shape (default 3; tiny 2)")
    ap.add_argument("--gpt-max-tokens", type=int, default=4096,
                    help="skip GPT's training step where its prompt is longer (default 4096: at T = 2048 with 2 "
                         "neighbours a chunk, 10,240 tokens, its backward needs more memory than a 24 GiB machine has)")
    ap.add_argument("--repeats", type=int, help="timed rounds after a warm-up (default 3; tiny 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: one thread's CPU time measures the work without the noise of "
                         "other processes on a shared machine)")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in ("qa", "generation") and not (s.startswith("corpus-") and s[7:].isdigit()):
            ap.error(f"unknown shape {s!r}: use qa, generation or corpus-T (T a multiple of the chunk size)")
    m = 8 if args.tiny else 64
    repeats = args.repeats or (1 if args.tiny else 3)
    gen_chunks = args.gen_chunks or (2 if args.tiny else 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    base, name = load_model(args.tiny)
    base.to(device)
    print(f"loaded {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n_layers = base.config.num_hidden_layers
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    spec = args.layer_sets if args.layer_sets is not None else ("2-3@2" if args.tiny else "20-29@20")
    configs = designs(depths, parse_layers(spec) if spec.strip() else [], n_layers)
    models = {}
    for label, fields in configs.items():  # each design on its own copy of the base: they read through it
        model = retrofit(copy.deepcopy(base), RetroConfig(chunk_size=m, num_neighbours=args.k, **fields))
        model.set_gates(0.5)  # a trained-looking model: CCA really contributes
        model.train()
        model.base.eval()  # the frozen backbone keeps its dropout off in every model
        models[label] = model
    with models[KEPT].reusing_neighbours():  # the warm-up round of each shape runs every neighbour once
        return report(models, base, name, shapes, args, m, repeats, gen_chunks, device)


def report(models: dict, base, name: str, shapes: list[str], args, m: int, repeats: int, gen_chunks: int,
           device: str) -> int:
    """Measure every model on every shape and print the section."""
    vocab = base.get_input_embeddings().weight.shape[0]
    results, described, skipped = {}, [], {}
    for i, shape in enumerate(tqdm(shapes, desc="shapes", file=sys.stderr)):
        rand = Randoms(vocab, seed=i)
        if shape == "generation":
            runs = {}
            for label, model in models.items():
                plain, retro, gpt = generation_runs(base, model, Randoms(vocab, seed=7), args.k, m, gen_chunks,
                                                    device)
                runs.setdefault("base", plain)
                runs.setdefault("GPT + neighbours in prompt", gpt)
                runs[f"RETRO, {label}"] = retro
            described.append(f"generation: {gen_chunks} chunks ({gen_chunks * m} tokens) after a {m}-token prompt, "
                             f"{args.k} fresh neighbours per chunk")
        else:
            if shape == "qa":
                plain, retro_b, gpt_b = (to(b, device) for b in qa_shape(rand, args.batch, args.k, m))
                described.append(f"qa: {args.batch} questions (40 tokens) + answers (24 tokens), {args.k} "
                                 f"neighbours each")
            else:
                T = int(shape[7:])
                plain, retro_b, gpt_b = (to(b, device) for b in corpus_shape(rand, T, args.k, m))
                described.append(f"{shape}: one sequence of {T} tokens ({T // m} chunks), {args.k} neighbours per "
                                 f"chunk")
            runs = {"base": lambda p=plain: frozen_step(base, **p)}
            prompt = gpt_b["input_ids"].shape[1]
            if prompt <= args.gpt_max_tokens:
                runs["GPT + neighbours in prompt"] = lambda g=gpt_b: frozen_step(base, **g)
            else:
                skipped[shape] = f"skipped ({prompt} tokens > --gpt-max-tokens)"
            for label, model in models.items():
                runs[f"RETRO, {label}"] = lambda mod=model, b=retro_b: retro_step(mod, b)
        results[shape] = measure(runs, repeats)
    unit = "GPU wall time" if device == "cuda" else \
        f"CPU time of the benchmark process, {torch.get_num_threads()} thread(s)"
    print("## What reading neighbours costs: RETRO designs and GPT against the frozen base\n")
    print(f"{name} on {device}; {unit}; chunk m = {m}, neighbours of R = {2 * m} tokens; median of {repeats} "
          f"interleaved rounds after a warm-up. Training shapes: one forward + backward (RETRO trains its added "
          f"parameters at gates 0.5; base and GPT backpropagate to their input embeddings). Generation: greedy, "
          f"KV-cached, re-retrieval after every chunk. Each cell: time over the frozen base's on the same text "
          f"(base time in the first row).\n")
    for line in described:
        print(f"- {line}")
    print()
    models_seen = ["GPT + neighbours in prompt"] + [f"RETRO, {label}" for label in models]
    rows = [["base (ms)"] + [fmt(results[s]["base"] * 1e3) for s in shapes]]
    rows += [[who] + [f"{results[s][who] / results[s]['base']:.2f}x" if who in results[s] else skipped[s]
                      for s in shapes] for who in models_seen]
    print(md_table(["model"] + shapes, rows))
    if args.json:
        ratios = {s: {who: results[s][who] / results[s]["base"] for who in results[s] if who != "base"}
                  for s in shapes}
        Path(args.json).write_text(json.dumps({"model": name, "device": device, "unit": unit, "repeats": repeats,
                                               "base_ms": {s: results[s]["base"] * 1e3 for s in shapes},
                                               "ratios": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
