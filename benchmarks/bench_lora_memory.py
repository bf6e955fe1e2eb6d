"""How much memory does LoRA fine-tuning of the default decoder take, beside inference and full fine-tuning?

Takes the default decoder (SmolLM2-135M via `backbones.load_decoder`) and a batch size; gives a markdown table
of peak resident memory (RSS; on CUDA also `torch.cuda.max_memory_allocated`) for three ways of running the same
batch for a few steps: inference only, LoRA (HF peft, r=8 on q_proj and v_proj, AdamW) and full fine-tuning (AdamW),
each as a ratio to full fine-tuning and to inference measured in the same run.

A process's peak RSS never comes down, so each way runs in its own child process (`--child MODE`), one after another,
and reports JSON; the parent only tabulates.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import PeakSampler, fmt, md_table, mib

HERE = Path(__file__).resolve().parent
MODES = ("inference", "lora", "full")
TITLE = "## Memory: LoRA fine-tuning vs inference and full fine-tuning"
HEADERS = ["mode", "params requiring grad (M)", "peak RSS (MiB)", "RSS after load (MiB)",
           "peak above load (MiB)", "peak RSS / full FT", "peak RSS / inference", "s / step (median)"]


@dataclass(frozen=True)
class Setup:
    model: str = "smollm2-135m"  # a name for load_decoder, or "tiny" for a 2-layer Llama built from a config
    batch: int = 8
    seq_len: int = 256
    steps: int = 2  # the second step is the first with optimiser state, gradients and activations all alive
    lora_r: int = 8
    threads: int = 1  # torch threads: memory barely depends on it, and one thread keeps a busy machine's timings sane

    def __post_init__(self):
        for name in ("batch", "seq_len", "steps", "lora_r", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


FULL = Setup()
TINY = Setup(model="tiny", batch=2, seq_len=32, steps=2)


def _load(setup: Setup):
    import torch

    if setup.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=setup.seq_len)
        return LlamaForCausalLM(cfg)
    from backbones import load_decoder

    model, _ = load_decoder(setup.model)
    return model


def child(mode: str, setup: Setup) -> dict:
    """Run `setup.steps` steps of `mode` on one random batch; the caller prints the JSON this returns."""
    import peft  # noqa: F401  (imported in every mode so the baseline RSS below is the same for all three)
    import psutil
    import torch
    import transformers  # noqa: F401
    from tqdm.auto import tqdm

    torch.set_num_threads(setup.threads)
    proc = psutil.Process()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rss_imports = proc.memory_info().rss
    model = _load(setup).to(device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad] if mode != "inference" else []
    if mode == "inference":
        model.eval()
    else:
        model.train()
    optimiser = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
    with torch.no_grad():  # weights may be mmapped from safetensors: page them in so 'after load' includes them
        for p in model.parameters():
            p.sum()
    torch.manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (setup.batch, setup.seq_len), device=device)  # (B, T)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = proc.memory_info().rss
    times = []
    with PeakSampler() as sampler:
        for _ in tqdm(range(setup.steps), desc=f"{mode} steps", file=sys.stderr):
            t0 = time.perf_counter()
            if optimiser is None:
                with torch.no_grad():
                    model(input_ids=ids, labels=ids)
            else:
                model(input_ids=ids, labels=ids).loss.backward()
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"mode": mode, "rss_imports": rss_imports, "rss_loaded": rss_loaded, "peak_rss": max(peak_rss, sampler.peak),
            "steps_peak_rss": sampler.peak, "trainable": sum(p.numel() for p in trainable),
            "params": sum(p.numel() for p in model.parameters()), "seconds": times, "device": str(device),
            "threads": torch.get_num_threads(),
            "cuda_peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def run_child(mode: str, setup: Setup) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_lora_memory", "--child", mode, "--setup", json.dumps(asdict(setup))]
    res = subprocess.run(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"the {mode} run failed (exit {res.returncode}); its stderr is above. "
                           f"Reproduce with: {' '.join(cmd[1:])}")
    return json.loads(lines[-1])


def table(results: dict[str, dict], setup: Setup) -> str:
    import statistics

    full, inf = results["full"]["peak_rss"], results["inference"]["peak_rss"]
    cuda = results["full"]["cuda_peak"] is not None
    headers = HEADERS + (["CUDA max allocated (MiB)", "CUDA peak / full FT"] if cuda else [])
    rows = []
    for mode in MODES:
        r = results[mode]
        row = [mode if mode != "lora" else f"LoRA r={setup.lora_r} (q_proj, v_proj)", fmt(r["trainable"] / 1e6),
               mib(r["peak_rss"]), mib(r["rss_loaded"]), mib(r["steps_peak_rss"] - r["rss_loaded"]),
               fmt(r["peak_rss"] / full), fmt(r["peak_rss"] / inf), fmt(statistics.median(r["seconds"]))]
        if cuda:
            row += [mib(r["cuda_peak"]), fmt(r["cuda_peak"] / results["full"]["cuda_peak"])]
        rows.append(row)
    r0 = results["full"]
    notes = [
        f"Model {setup.model} ({fmt(r0['params'] / 1e6)} M parameters, fp32) on {r0['device']} "
        f"({r0['threads']} torch threads); batch {setup.batch} x "
        f"{setup.seq_len} tokens of random ids, labels = inputs; {setup.steps} steps each; AdamW for the trained "
        "parameters; no gradient checkpointing; inference runs the same forward (with loss) under torch.no_grad.",
        "Peak RSS is the whole process's peak (`getrusage` ru_maxrss, or the 5 ms psutil sampling if higher), loading "
        "included; 'peak above load' is the sampled peak during the steps minus the RSS just before them, i.e. what "
        "activations, gradients and optimiser state add. Each mode runs in a fresh process, one after another.",
        f"Process RSS after importing torch/transformers/peft, before loading: {mib(r0['rss_imports'])} MiB.",
    ]
    return f"{TITLE}\n\n{md_table(headers, rows)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy Llama, batch 2 x 32 (a smoke run)")
    ap.add_argument("--steps", type=int, help=f"steps per mode (default {FULL.steps})")
    ap.add_argument("--batch", type=int, help=f"batch size (default {FULL.batch})")
    ap.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {FULL.seq_len})")
    ap.add_argument("--threads", type=int, help=f"torch threads (default {FULL.threads})")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, Setup(**json.loads(args.setup)))), flush=True)
        return 0
    base = TINY if args.tiny else FULL
    given = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "threads": args.threads}
    setup = Setup(**{**asdict(base), **{k: v for k, v in given.items() if v is not None}})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm

    results = {}
    for mode in tqdm(MODES, desc="modes (one process each)", file=sys.stderr):
        results[mode] = run_child(mode, setup)
    sys.stdout.write(table(results, setup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
