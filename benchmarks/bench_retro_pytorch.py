"""How fast is our RETRO against retro-pytorch 0.3.9 at equal model dimensions?

Takes model dimensions (width, depth, chunk size m, neighbours K, neighbour length R = 2m, sequence length T, batch B);
gives a markdown table of forward+backward time per token, each as a ratio to retro-pytorch measured in the same run.

retro-pytorch cannot share a process (nor an environment: its autofaiss dependency pins numpy<2) with the project, so
its half runs in `benchmarks/.venv-retro-pytorch` (made by `benchmarks/setup_retro_pytorch_env.sh`) as a worker
process that times steps on request and answers in JSON; the main process times ours in between, alternating which
side goes first in each round, so drift in machine load hits both. Without that environment this prints a 'skipped'
row and exits 0.

This module is also the worker (`--worker`): keep its top level free of project and third-party imports.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import fmt, md_table

HERE = Path(__file__).resolve().parent
DEFAULT_ENV_PYTHON = HERE / ".venv-retro-pytorch" / "bin" / "python"
SETUP = "bash benchmarks/setup_retro_pytorch_env.sh"
TITLE = "## RETRO vs retro-pytorch 0.3.9: forward+backward time per token"
HEADERS = ["implementation", "what requires grad", "params (M)", "params requiring grad (M)", "ms / step (median)",
           "µs / token", "ratio vs retro-pytorch"]
# retro-pytorch 0.3.9 accepts `heads` but never passes it on: its encoder and decoder always use 8 heads of
# `dim_head` each. We therefore fix 8 heads and set dim_head = width / 8 so the attention widths agree.
RETRO_PYTORCH_HEADS = 8


@dataclass(frozen=True)
class Dims:
    width: int = 512  # D, decoder and encoder width
    layers: int = 12
    chunk_size: int = 64  # m
    neighbours: int = 2  # K
    seq_len: int = 512  # T
    batch: int = 2  # B
    vocab: int = 32000
    encoder_layers: int = 2
    cca_layers: tuple[int, ...] = field(default=(5, 8, 11))  # 0-based; RETRO's 1-based 6, 9, 12 for 12 layers

    def __post_init__(self):
        object.__setattr__(self, "cca_layers", tuple(self.cca_layers))
        if self.width % RETRO_PYTORCH_HEADS or self.width // RETRO_PYTORCH_HEADS < 32:
            raise ValueError(f"width {self.width}: must be a multiple of 8 with width/8 >= 32 (retro-pytorch always "
                             f"uses 8 heads and refuses head widths under 32); try 256 or 512")
        if self.seq_len % self.chunk_size:
            raise ValueError(f"seq_len {self.seq_len} must be a multiple of chunk_size {self.chunk_size} "
                             f"(retro-pytorch needs one neighbour row per full chunk)")
        if not self.cca_layers or not all(0 <= i < self.layers for i in self.cca_layers):
            raise ValueError(f"cca_layers {self.cca_layers} must be non-empty 0-based indices below "
                             f"layers={self.layers}")

    @property
    def neighbour_length(self) -> int:  # R: a chunk and its continuation
        return 2 * self.chunk_size

    @property
    def chunks(self) -> int:  # L
        return self.seq_len // self.chunk_size

    @property
    def mlp_hidden(self) -> int:
        # retro-pytorch's MLP is Linear(D, 4D) -> GELU -> Linear(4D, D): 8 D^2 weights. Llama's gated MLP has three
        # D x I matrices, so I = 8D/3 gives it the same weights and the same matmul FLOPs.
        return round(8 * self.width / 3)

    def describe(self) -> str:
        return (f"D={self.width}, {self.layers} decoder layers, 8 heads, MLP {self.mlp_hidden} (Llama, gated) vs "
                f"{4 * self.width} (retro-pytorch), vocab {self.vocab}, {self.encoder_layers} encoder layers, "
                f"CCA at 0-based layers {list(self.cca_layers)}, m={self.chunk_size}, K={self.neighbours}, "
                f"R={self.neighbour_length}, T={self.seq_len}, B={self.batch} ({self.batch * self.seq_len} tokens "
                f"per step)")


FULL = Dims()
TINY = Dims(width=256, layers=4, chunk_size=16, neighbours=2, seq_len=64, batch=2, vocab=512, encoder_layers=1,
            cca_layers=(2, 3))


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, n: int, device) -> list[float]:
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _count(params) -> int:
    return sum(p.numel() for p in params)


# -- the retro-pytorch half (runs in its own environment) --------------------------------------------------------

def worker(dims: Dims, threads: int) -> None:
    """Build retro-pytorch's RETRO, then answer `run N` lines on stdin with the seconds of N steps as JSON."""
    import torch
    from retro_pytorch import RETRO

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = _device()
    d = dims
    model = RETRO(num_tokens=d.vocab, max_seq_len=d.seq_len + 1, enc_dim=d.width, enc_depth=d.encoder_layers,
                  dec_depth=d.layers, dec_cross_attn_layers=tuple(i + 1 for i in d.cca_layers), dec_dim=d.width,
                  dim_head=d.width // RETRO_PYTORCH_HEADS, chunk_size=d.chunk_size, pad_id=0).to(device).train()
    # ids start at 1: retro-pytorch masks id 0 (pad_id) out of the neighbours, and ours get no padding either.
    seq = torch.randint(1, d.vocab, (d.batch, d.seq_len + 1), device=device)  # (B, T+1): inputs and shifted labels
    retrieved = torch.randint(1, d.vocab, (d.batch, d.chunks, d.neighbours, d.neighbour_length), device=device)

    def step():
        model(seq, retrieved, return_loss=True).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations and kernel selection
    from importlib import metadata

    ready = {"ready": True, "params": _count(model.parameters()),
             "trainable": _count(p for p in model.parameters() if p.requires_grad), "torch": torch.__version__,
             "device": str(device), "threads": torch.get_num_threads(),
             "version": metadata.version("retro-pytorch")}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        print(json.dumps({"seconds": _time_steps(step, int(cmd[1]), device)}), flush=True)


class Reference:
    """The retro-pytorch worker process, driven one batch of steps at a time."""

    def __init__(self, python: Path, dims: Dims, threads: int, root: Path):
        cmd = [str(python), "-m", "benchmarks.bench_retro_pytorch", "--worker", json.dumps(asdict(dims)),
               "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(root)})
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the retro-pytorch worker exited (code {code}) without answering; its stderr is "
                               f"above. Recreate its environment with: {SETUP}")
        return json.loads(line)

    def run(self, n: int) -> list[float]:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# -- our half ------------------------------------------------------------------------------------------------------

def build_ours(dims: Dims, device):
    """A Llama decoder of matching dims (untied embeddings as in retro-pytorch), retro-fitted with our RETRO."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retro import RetroConfig, retrofit

    d = dims
    cfg = LlamaConfig(vocab_size=d.vocab, hidden_size=d.width, intermediate_size=d.mlp_hidden,
                      num_hidden_layers=d.layers, num_attention_heads=RETRO_PYTORCH_HEADS,
                      num_key_value_heads=RETRO_PYTORCH_HEADS, max_position_embeddings=d.seq_len,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device)
    model = retrofit(base, RetroConfig(chunk_size=d.chunk_size, num_neighbours=d.neighbours,
                                       cca_layers=d.cca_layers, encoder_layers=d.encoder_layers,
                                       encoder_heads=RETRO_PYTORCH_HEADS, cca_heads=RETRO_PYTORCH_HEADS))
    model.set_gates(0.5)  # an open gate, as after training (it costs the same FLOPs as a closed one)
    return model.train()


def our_steps(model, dims: Dims, device) -> dict:
    """Step functions for each way of training ours, each setting which parameters require grad before it runs."""
    import torch

    d = dims
    ids = torch.randint(1, d.vocab, (d.batch, d.seq_len), device=device)  # (B, T)
    neighbours = torch.randint(1, d.vocab, (d.batch, d.chunks, d.neighbours, d.neighbour_length),
                               device=device)  # (B, L, K, R)
    added = {id(p) for p in model.retro_parameters()}

    def trainable(all_params: bool):
        for p in model.parameters():
            p.requires_grad_(all_params or id(p) in added)

    def retro_step():
        model(input_ids=ids, neighbours=neighbours, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    def base_step():
        model.base(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return {"all": (lambda: trainable(True), retro_step), "retrofit": (lambda: trainable(False), retro_step),
            "base": (lambda: trainable(True), base_step)}


# -- the comparison ------------------------------------------------------------------------------------------------

def skipped(python: Path) -> str:
    row = ["retro-pytorch 0.3.9", f"skipped: no environment at {python}; create it with `{SETUP}`", "-", "-", "-",
           "-", "-"]
    return f"{TITLE}\n\n{md_table(HEADERS, [row])}\n"


def compare(dims: Dims, python: Path, rounds: int, steps: int, threads: int) -> str:
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    ref = Reference(python, dims, threads, HERE.parent)
    device = _device()
    if device.type != torch.device(ref.info["device"]).type:
        # A CPU-only torch in the retro-pytorch environment: time both on CPU rather than compare CPU with CUDA.
        print(f"retro-pytorch runs on {ref.info['device']}, so ours does too; for CUDA recreate its environment "
              f"with: TORCH=torch {SETUP}", file=sys.stderr)
        device = torch.device(ref.info["device"])
    try:
        model = build_ours(dims, device)
        modes = our_steps(model, dims, device)
        for setup, step in modes.values():  # warm-up, as the worker did
            setup()
            step()
        times: dict[str, list[float]] = {"ref": [], **{k: [] for k in modes}}
        params = {}
        for name, (setup, _) in modes.items():
            setup()
            module = model.base if name == "base" else model
            params[name] = (_count(module.parameters()), _count(p for p in module.parameters() if p.requires_grad))
        order = ["ref", *modes]
        for r in tqdm(range(rounds), desc="rounds (retro-pytorch and ours, alternating)", file=sys.stderr):
            for name in (order if r % 2 == 0 else order[::-1]):
                if name == "ref":
                    times["ref"] += ref.run(steps)
                else:
                    setup, step = modes[name]
                    setup()
                    times[name] += _time_steps(step, steps, device)
    finally:
        ref.close()

    tokens = dims.batch * dims.seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    info = ref.info

    def row(label, what, total, trainable, key):
        return [label, what, fmt(total / 1e6), fmt(trainable / 1e6), fmt(med[key] * 1e3),
                fmt(med[key] / tokens * 1e6), fmt(med[key] / med["ref"])]

    rows = [
        row(f"retro-pytorch {info['version']} (reference)", "everything (it trains its decoder from scratch)",
            info["params"], info["trainable"], "ref"),
        row("retrotune RETRO", "everything (base decoder unfrozen)", *params["all"], "all"),
        row("retrotune RETRO, retro-fit mode", "encoder + CCA only (base frozen)", *params["retrofit"], "retrofit"),
        row("Llama decoder alone, no retrieval (context)", "everything", *params["base"], "base"),
    ]
    worst = max(abs(t / med[k] - 1) for k, v in times.items() for t in v)
    notes = [
        f"Dimensions: {dims.describe()}.",
        f"Device {device}, {threads} torch threads in each process; retro-pytorch's process reports torch "
        f"{info['torch']} on {info['device']}. {rounds} rounds of {steps} steps per implementation, the order "
        f"alternating each round, after one warm-up step each; medians of {rounds * steps} steps "
        f"(every step within {fmt(100 * worst, 2)}% of its row's median).",
        "Equal: width, depth, 8 heads of D/8, MLP weights (8 D^2 per layer), which layers get CCA, encoder depth and "
        "width, m, K, R, T, B, vocab, untied embeddings, token ids (no padding), fp32, loss = next-token cross-entropy "
        "with backward through everything that requires grad.",
        "Not equal: retro-pytorch's own blocks (einsum attention, RMSNorm, rotary on 32 dims plus learned absolute "
        "positions, null key/values in cross-attention, K neighbours encoded as separate sequences); ours runs the HF "
        "Llama forward (SDPA attention, SwiGLU MLP, rotary) with CCA hooked onto layer outputs and K neighbours of a "
        "chunk attending as one K*R sequence. retro-pytorch trains all its weights from scratch; ours is meant to "
        "train only the added encoder and CCA (retro-fit mode), which still back-propagates through the frozen "
        "decoder layers above the first CCA layer but computes no weight gradients for them.",
    ]
    return f"{TITLE}\n\n{md_table(HEADERS, rows)}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy dimensions and 2 rounds (a smoke run)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 4, tiny 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in each process (default 1: on a busy machine, OpenMP threads waiting on each "
                         "other distort timings far more than they distort one thread's)")
    ap.add_argument("--steps", type=int, help="steps per implementation per round (default 1)")
    ap.add_argument("--retro-pytorch-python", type=Path,
                    default=Path(os.environ.get("RETRO_PYTORCH_PYTHON", DEFAULT_ENV_PYTHON)),
                    help="python of the retro-pytorch environment (env RETRO_PYTORCH_PYTHON; default "
                         "benchmarks/.venv-retro-pytorch/bin/python)")
    ap.add_argument("--worker", metavar="DIMS_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(Dims(**json.loads(args.worker)), args.threads or os.cpu_count() or 1)
        return 0
    python = args.retro_pytorch_python
    if not python.is_file():
        print(f"retro-pytorch environment not found at {python}; create it with: {SETUP}", file=sys.stderr)
        sys.stdout.write(skipped(python))
        return 0
    rounds = args.rounds or (2 if args.tiny else 4)
    steps = args.steps or 1
    if rounds < 1 or steps < 1:
        raise SystemExit(f"--rounds and --steps must be >= 1, got {rounds} and {steps}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    sys.stdout.write(compare(TINY if args.tiny else FULL, python, rounds, steps, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
