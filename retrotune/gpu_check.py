"""GPU check: every GPU path of the project, end to end on the embedded models (`smollm2-135m`, `minilm`), in a few
minutes; prints a pass/fail table and exits 1 if any check failed.

    make gpu-check            # or: HF_HUB_OFFLINE=1 python -m retrotune.gpu_check

Each check runs through the functions train.py and eval.py use, on tiny configs written to a temporary folder:
a tiny index (SQuAD-demo passages, minilm on the GPU), a bf16 retro-fit step of RETRO, a bf16 LoRA step of GPT and of
RETRO, cached generation on the GPU through the QA contract (compared with uncached decoding), a faiss index built
and searched on the GPUs (when faiss has GPU support), the memory estimate (`retrotune.memory`) against the measured
peak of a LoRA step, and FSDP across the visible GPUs (torchrun + train.py with train.fsdp). Each check is caught on
its own, so one failure does not hide the others. Without CUDA it says so in one line and exits 0.
"""
from __future__ import annotations

import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "squad-demo"
ARTICLES = ("Black_Death", "Pharmacy", "1973_oil_crisis", "Geology")  # the last one held out for validation
DECODER, EMBEDDER = "smollm2-135m", "minilm"
CHUNK = 16  # tokens per chunk of the tiny index: short sequences keep every step fast
MEMORY_BAND = (0.5, 2.0)  # measured peak / estimate accepted: the estimate leaves out temporaries and the allocator
NO_CUDA = "gpu-check: no CUDA device visible; nothing to check here (run it on a machine with a GPU)"


def lora_peft(model: str) -> dict:
    """LoRA on self-attention; for RETRO its added layers train beside it, as in configs/finetune_retro_lora.yaml."""
    return {"method": "lora", "r": 4, "targets": ["attention"], **({"train_retro": True} if model == "retro" else {})}


class Skipped(Exception):
    """A check that cannot run on this machine; its message says why."""


@dataclass
class Outcome:
    name: str
    status: str  # pass | fail | skip
    detail: str
    seconds: float


def run_checks(checks: list[tuple[str, Callable[[], str]]]) -> list[Outcome]:
    """Run each (name, check) in turn; a check returns a one-line detail, raises `Skipped`, or fails by raising."""
    outcomes = []
    for name, check in checks:
        started = time.perf_counter()
        try:
            status, detail = "pass", check()
        except Skipped as reason:
            status, detail = "skip", f"skipped: {reason}"
        except Exception as error:  # noqa: BLE001 - a failing check is reported, the others still run
            traceback.print_exc()  # the whole story on stderr; the table keeps its first line
            lines = str(error).strip().splitlines()
            status, detail = "fail", f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
        outcomes.append(Outcome(name, status, detail, time.perf_counter() - started))
        print(f"[{status}] {name} ({outcomes[-1].seconds:.1f} s)", file=sys.stderr, flush=True)
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    lines = ["| check | result | time | detail |", "|---|---|---:|---|"]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {o.name} | {o.status.upper()} | {o.seconds:.1f} s | {detail} |")
    return "\n".join(lines)


def exit_status(outcomes: list[Outcome]) -> int:
    return int(any(o.status == "fail" for o in outcomes))


# ---- the checks ----

class Workspace:
    """The tiny corpus, its index, the QA file and the runs the checks share, under one temporary folder. A check
    that needs something an earlier one failed to make fails too, naming it."""

    def __init__(self, root: Path, device: str = "cuda", precision: str = "bf16"):
        self.root, self.device, self.precision = Path(root), device, precision
        self.index_dir, self.qa_file = self.root / "index", self.root / "qa.jsonl"

    def build_index(self) -> str:
        from retrieval import BuildConfig, Document, build_index
        from retrotune.models import load_embedder, load_tokenizer

        passages = [json.loads(line) for line in (DEMO / "passages.jsonl").open(encoding="utf-8")]
        docs = [Document(p["id"], p["title"], p["text"]) for p in passages
                if p["id"].split("#")[0] in ARTICLES and int(p["id"].split("#")[1]) < 6]
        manifest = build_index(docs, self.index_dir, tokenizer=load_tokenizer(DECODER),
                               embedder=load_embedder(EMBEDDER, device=self.device),
                               config=BuildConfig(chunk_size=CHUNK), tokenizer_alias=DECODER,
                               embedder_alias=EMBEDDER, progress=False)
        kept = {d.id for d in docs}
        questions = [line for line in (DEMO / "questions.jsonl").open(encoding="utf-8")
                     if json.loads(line)["passage_id"] in kept]
        self.qa_file.write_text("".join(questions))
        return f"{len(docs)} passages, {len(questions)} questions, factory {manifest.get('factory', '?')}"

    def need_index(self) -> None:
        from retrieval import is_index

        if not is_index(self.index_dir):
            raise RuntimeError("the tiny index was not built (see its line)")

    def config(self, name: str, **fields):
        from retrotune.config import load_config

        values = {"decoder": DECODER, "embedder": EMBEDDER, "index": str(self.index_dir),
                  "output_dir": str(self.root / name), "neighbours": 2, "max_new_tokens": 4, "prompt_budget": 128,
                  "eval_batch_size": 4, "retro": {"chunk_size": CHUNK, "attention": "joint"},
                  "data": {"qa": str(self.qa_file), "validation_groups": [ARTICLES[-1]], "train_size": 16,
                           "validation_size": 4, "validation_generate": 2, "sequence_chunks": 2,
                           "validation_fraction": 0.1, "self_neighbour_rate": 0.5},
                  "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 2, "save_every": 2,
                            "precision": self.precision}}
        for key, value in fields.items():
            values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
        return load_config(None, base=values)

    def train(self, name: str, **fields) -> str:
        """One tiny run through train.py's path (preflight, then `train_run` on the device)."""
        from retrotune.cell import train_run
        from retrotune.preflight import check_run

        self.need_index()
        config = self.config(name, **fields)
        check_run(config)
        summary = train_run(config, device=self.device)
        last = summary["last"]
        if summary["steps"] != config.train.max_steps or not math.isfinite(last.get("loss", math.nan)):
            raise RuntimeError(f"{summary['steps']} steps, last row {last}")
        trainable = summary["trainable_parameters"]["trainable"]
        return (f"{summary['steps']} steps at {config.train.precision}, loss {last['loss']:.3f}, "
                f"val_loss {last.get('val_loss', math.nan):.3f}, {trainable:,} trained parameters")

    def retrofit(self) -> str:
        return self.train("retrofit", stage="retrofit", model="retro")

    def lora(self, model: str) -> str:
        retrofit = self.root / "retrofit"
        init_from = str(retrofit) if model == "retro" and (retrofit / "final" / "run.json").is_file() else None
        detail = self.train(f"{model}-lora", stage="finetune", model=model, peft=lora_peft(model), init_from=init_from)
        return detail + (", from the retro-fit run" if init_from else "")

    def generation(self) -> str:
        """Each trained LoRA run reloaded on the device as eval.py reloads it, answering through the QA contract
        with the KV cache and without it: the answers must agree."""
        from retrotune import neighbours
        from retrotune.cell import load_trained, run_config, task_data
        from retrotune.tasks import get_task

        parts = []
        for model in ("retro", "gpt"):
            run = self.root / f"{model}-lora"
            if not (run / "final" / "run.json").is_file():
                raise RuntimeError(f"the {model} LoRA run did not finish (see its line)")
            qa, summary, retriever, _ = load_trained(run, device=self.device)
            where = qa.model.get_input_embeddings().weight.device
            if where.type != self.device:
                raise RuntimeError(f"the reloaded {model} model is on {where}, not {self.device}")
            config = run_config(summary)
            _, evaluation = task_data(config, with_train=False)
            records = neighbours.attach(config, get_task(config.task), retriever, evaluation[:4], with_answers=False)
            batch = qa.encode_batch([{k: v for k, v in r.items() if k != "answer"} for r in records])
            cached = qa.generate(batch, max_new_tokens=8)
            plain = qa.generate(batch, max_new_tokens=8, use_cache=False)
            if cached != plain:
                raise RuntimeError(f"{model}: cached decoding {cached} differs from uncached {plain}")
            parts.append(f"{model}: {len(cached)} answers agree")
        return "; ".join(parts) + " (RETRO re-retrieves as chunks complete)"

    def faiss_gpu(self) -> str:
        """An IVF index trained, filled and nprobe-tuned on the GPUs (retrieval.index), then searched there; recall
        against exact search on the CPU."""
        import faiss
        import numpy as np

        from retrieval.index import IndexConfig, build_faiss_index, gpu_count, search_index, set_nprobe, to_devices

        if not hasattr(faiss, "StandardGpuResources") or gpu_count(True) == 0:
            raise Skipped("faiss without GPU support")
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((64, 384)).astype(np.float32)
        vectors = centres[rng.integers(0, 64, 20_000)] + 0.3 * rng.standard_normal((20_000, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cpu_index, factory, nprobe, recall = build_faiss_index(vectors, IndexConfig(factory="IVF256,Flat",
                                                                                    use_gpu=True), progress=False)
        on_gpus = to_devices(cpu_index, True)
        set_nprobe(on_gpus, nprobe)
        queries = vectors[:500] + 0.05 * rng.standard_normal((500, 384)).astype(np.float32)
        _, found = search_index(on_gpus, queries, 10)
        exact = faiss.IndexFlatIP(384)
        exact.add(vectors)
        _, truth = search_index(exact, queries, 10)
        measured = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
        if measured < 0.9:
            raise RuntimeError(f"{factory} at nprobe {nprobe}: recall@10 {measured:.3f} on the GPU, below 0.9")
        return (f"{factory} on {gpu_count(True)} GPU(s) ({type(on_gpus).__name__}), nprobe {nprobe}, "
                f"recall@10 {measured:.3f}")

    def memory(self) -> str:
        """`retrotune.memory.estimate` of a bf16 LoRA step against torch.cuda.max_memory_allocated of one."""
        import torch

        from backbones import load_decoder
        from peft_methods import apply_peft
        from retrotune.memory import estimate

        batch, length, peft = 4, 512, {"method": "lora"}
        e = estimate(DECODER, peft, dtype=torch.bfloat16, seq_len=length)
        predicted = e.frozen_bytes + e.trainable_bytes + batch * length * e.activation_bytes_per_token
        gc.collect()  # what earlier checks left behind is freed, and the rest counted out through `before`
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model, tokenizer = load_decoder(DECODER, dtype=torch.bfloat16, device="cuda")
        model = apply_peft(model, peft)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, len(tokenizer), (batch, length), device="cuda")  # (B, T)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
        del model, optimizer
        torch.cuda.empty_cache()
        ratio = measured / predicted
        detail = (f"LoRA, bf16, {batch}x{length} tokens: estimate {predicted / 2 ** 20:,.0f} MiB, measured peak "
                  f"{measured / 2 ** 20:,.0f} MiB (x{ratio:.2f})")
        if not MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1]:
            raise RuntimeError(detail + f", outside x{MEMORY_BAND[0]}-x{MEMORY_BAND[1]}")
        return detail

    def fsdp(self) -> str:
        """train.py under torchrun with train.fsdp on every visible GPU, GPT + LoRA and RETRO + LoRA."""
        import torch

        gpus = torch.cuda.device_count()
        if gpus < 2:
            raise Skipped(f"{gpus} GPU visible; FSDP shards across two or more processes (train.fsdp has no "
                          f"effect in one)")
        self.need_index()
        parts = []
        for model in ("gpt", "retro"):
            name = f"fsdp-{model}"
            config = self.config(name, stage="finetune", model=model, peft=lora_peft(model),
                                 data={"train_size": 4 * gpus}, train={"fsdp": True})  # a batch of 2 a GPU
            path = self.root / f"{name}.yaml"
            path.write_text(json.dumps(config.to_dict()))  # JSON is YAML
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
                                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "train.py"),
                                   str(path)], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                                  text=True, timeout=300, cwd=ROOT)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["(no output)"]
                reason = next((line for line in reversed(lines) if "Error" in line or "error:" in line), lines[-1])
                raise RuntimeError(f"{model}: torchrun exit status {done.returncode}: {reason.strip()}\n"
                                   + "\n".join(lines[-60:]))
            summary = json.loads((self.root / name / "final" / "run.json").read_text())
            parts.append(f"{model} {summary['steps']} steps, loss {summary['last']['loss']:.3f}")
        return f"{gpus} GPUs: " + "; ".join(parts)


def gpu_checks(ws: Workspace) -> list[tuple[str, Callable[[], str]]]:
    return [("tiny index (minilm on the GPU)", ws.build_index),
            ("retro-fit step, RETRO, bf16", ws.retrofit),
            ("LoRA step, GPT, bf16", lambda: ws.lora("gpt")),
            ("LoRA step, RETRO, bf16", lambda: ws.lora("retro")),
            ("cached generation (QA contract)", ws.generation),
            ("faiss index on the GPU", ws.faiss_gpu),
            ("memory estimate vs measured peak", ws.memory),
            ("FSDP (torchrun, train.fsdp)", ws.fsdp)]


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"gpu-check on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        outcomes = run_checks(gpu_checks(Workspace(Path(tmp))))
    print(format_table(outcomes))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
