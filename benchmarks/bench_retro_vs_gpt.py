"""RETRO vs the GPT baseline: cost of one training step and of generation, at k = 2, 5, 10 neighbours.

Takes the default decoder (SmolLM2-135M-Instruct; `--tiny`: a 4-layer toy Llama) and random neighbours of real-text
length (R = 2m tokens each); prints a markdown section: per-example forward+backward time, generation latency and
activation memory of both models, and RETRO/GPT ratios, all measured in one run with the runs interleaved.

Both models see the same question, answer and neighbour tokens. RETRO: question left-padded to a chunk boundary, the
answer after it, neighbours cross-attended through CCA. GPT: the k neighbours (k * R tokens) written before the
question. Gradients: RETRO trains only its added parameters (encoder + CCA), the base is frozen. GPT has no trainable
parameter of its own here, so its backward runs to the input embeddings (`inputs_embeds.requires_grad`): activation
gradients through the whole frozen backbone, the least any PEFT method that adapts the lower layers pays. Neither
model computes weight gradients for the base, so the comparison is forward+backward through the same backbone.
Generation: greedy, KV-cached, the same loop (`retro.generate`) for both, fixed length (no EOS stop), no re-retrieval.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fmt, md_table  # noqa: E402
from retro import RetroConfig, generate, prompt_part, qa_layout, retrofit  # noqa: E402


def load_model(tiny: bool):
    if tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        return AutoModelForCausalLM.from_config(cfg).eval(), "tiny Llama (4 layers, width 64)"
    from backbones import load_decoder

    model, _ = load_decoder("smollm2-135m")
    return model.eval(), "SmolLM2-135M-Instruct (30 layers, width 576)"


class SavedActivations:
    """Bytes of distinct tensors autograd keeps for backward (parameters excluded): activation memory, any device."""

    def __init__(self, params):
        self.param_ptrs = {p.data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.param_ptrs:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def make_batches(vocab: int, B: int, q_len: int, a_len: int, k: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randint(10, vocab, shape, generator=g)  # noqa: E731
    questions, answers, neighbours = rand(B, q_len), rand(B, a_len), rand(B, k, 2 * m)  # neighbours (B, K, R)
    retro = qa_layout(questions.tolist(), answers.tolist(), m, 0, neighbours=list(neighbours.numpy()))
    gpt_prompts = [torch.cat([neighbours[b].flatten(), questions[b]]).tolist() for b in range(B)]
    gpt = qa_layout(gpt_prompts, answers.tolist(), 1, 0)
    return retro, gpt


def retro_step(model, batch):
    keys = ("input_ids", "attention_mask", "position_ids", "neighbours", "labels")
    loss = model(**{k: batch[k] for k in keys}).loss
    loss.backward()


def gpt_step(base, batch):
    embeds = base.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                labels=batch["labels"]).loss
    loss.backward()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy model and sizes (a smoke run in seconds)")
    ap.add_argument("--ks", default="2,5,10", help="neighbour counts to compare (default 2,5,10)")
    ap.add_argument("--batch", type=int, help="examples per training step (default 2; tiny 2)")
    ap.add_argument("--repeats", type=int, help="timed repetitions after one warm-up (default 3; tiny 2)")
    ap.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 32; tiny 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared machine, one thread's CPU time measures the work done "
                         "without the noise of other processes)")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if not ks or min(ks) < 1:
        ap.error(f"--ks must list positive neighbour counts, got {args.ks!r}")
    m, q_len, a_len = (8, 12, 6) if args.tiny else (64, 40, 24)
    B = args.batch or 2
    repeats = args.repeats or (2 if args.tiny else 3)
    new_tokens = args.new_tokens or (4 if args.tiny else 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    # primary clock: GPU wall time, or CPU time of this process (robust to other load on a shared CPU)
    clock = 0 if device == "cuda" else 1

    t0 = time.perf_counter()
    base, name = load_model(args.tiny)
    base.to(device)
    print(f"loaded {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    vocab = base.get_input_embeddings().weight.shape[0]
    rows = []
    for k in tqdm(ks, desc="k", file=sys.stderr):
        model = retrofit(base, RetroConfig(chunk_size=m, num_neighbours=k))
        model.set_gates(0.5)  # a trained-looking model: CCA really contributes
        model.train()
        base.eval()  # the frozen backbone keeps its dropout off in both models
        retro_b, gpt_b = (
            {n: t.to(device) for n, t in b.items()} for b in make_batches(vocab, B, q_len, a_len, k, m, seed=k))
        steps = {"retro": lambda: retro_step(model, retro_b), "gpt": lambda: gpt_step(base, gpt_b)}
        gens = {"retro": lambda: generate(model, **prompt_part(retro_b, m), max_new_tokens=new_tokens),
                "gpt": lambda: generate(base, **prompt_part(gpt_b, 1), max_new_tokens=new_tokens)}
        mem = {}
        for who in ("retro", "gpt"):
            with SavedActivations(list(base.parameters()) + list(model.retro_parameters())) as acts:
                steps[who]()  # warm-up, and the activation memory of one step
            mem[who] = acts.mib
            gens[who]()
        step_s = {"retro": [], "gpt": []}
        gen_s = {"retro": [], "gpt": []}
        for _ in range(repeats):  # interleaved so that load on the machine hits both alike
            for who in ("retro", "gpt"):
                model.zero_grad(set_to_none=True)
                step_s[who].append([t / B for t in timed(steps[who])])
                gen_s[who].append(timed(gens[who]))
        med = {who: [statistics.median(t[c] for t in v) for c in (0, 1)] for who, v in step_s.items()}
        gmed = {who: [statistics.median(t[c] for t in v) for c in (0, 1)] for who, v in gen_s.items()}
        rows.append([k, int(retro_b["input_ids"].shape[1]), int(gpt_b["input_ids"].shape[1]),
                     fmt(med["gpt"][clock] * 1e3), fmt(med["retro"][clock] * 1e3),
                     fmt(med["retro"][clock] / med["gpt"][clock], 2), fmt(med["retro"][0] / med["gpt"][0], 2),
                     fmt(gmed["gpt"][clock] * 1e3), fmt(gmed["retro"][clock] * 1e3),
                     fmt(gmed["retro"][clock] / gmed["gpt"][clock], 2), fmt(gmed["retro"][0] / gmed["gpt"][0], 2),
                     f"{mem['gpt']:.0f}", f"{mem['retro']:.0f}"])
        model.remove_hooks()
    n_added = sum(p.numel() for p in model.retro_parameters())
    print("## RETRO vs GPT baseline: training step and generation cost\n")
    unit = "GPU wall time" if clock == 0 else "CPU time of the benchmark process"
    print(f"{name} on {device} ({torch.get_num_threads()} threads); times are {unit} (wall-clock ratios beside "
          f"them); chunk m = {m}, neighbours R = {2 * m} tokens, "
          f"question {q_len} + answer {a_len} tokens, batch {B}, median of {repeats}; RETRO adds "
          f"{n_added / 1e6:.1f} M parameters at k = {ks[-1]} (the only ones it trains). Generation: {new_tokens} "
          f"greedy tokens, KV-cached, batch {B}. Activation memory: tensors saved for backward in one step.\n")
    print(md_table(["k", "RETRO tokens/ex", "GPT tokens/ex", "GPT step ms/ex", "RETRO step ms/ex", "RETRO/GPT step",
                    "(wall)", "GPT gen ms", "RETRO gen ms", "RETRO/GPT gen", "(wall)", "GPT act MiB",
                    "RETRO act MiB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
