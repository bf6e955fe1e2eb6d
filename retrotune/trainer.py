"""The training loop shared by both stages and both models: accelerate (so `torchrun`/`accelerate launch` runs it
data-parallel), gradient accumulation, mixed precision on GPU, LR schedules, periodic validation, early stopping,
atomic checkpoints that resume onto the same loss curve, and metrics as JSONL, CSV, TensorBoard and a PNG.

A checkpoint holds only what is trained (the parameters with requires_grad), the optimiser, scheduler and RNG
states, the loop position, the fully resolved run config and the hash of the index it was trained against, and
`manifest.json` (written last) with the size and checksum of each of those files. Resuming checks them and falls
back to the newest complete checkpoint when the latest one is damaged, saying so; a checkpoint without a manifest
is refused. Nothing is unpickled: tensors are stored as safetensors and everything else as JSON (the optimiser,
scheduler and RNG states as tensors plus a JSON outline, see checkpoint_state.py), so a crafted file in a run
folder can fail to load but never runs code.

Determinism: a run's new parameters (PEFT, RETRO layers) are initialised from its seed (`seed_everything`, called
before the model is built), and with `train.deterministic` (the default on CPU) torch is restricted to
deterministic algorithms during `fit`, so two runs of the same config give the same losses step by step (on the
same machine and thread count).
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from retrieval.integrity import seal_directory, verify_sealed
from retrotune import plots
from retrotune.checkpoint_state import CheckpointError, load_state, rng_state, save_state, set_rng_state
from retrotune.config import TrainConfig
from retrotune.precision import resolve as resolve_precision

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "config.json", "state.json")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class FitResult:
    steps: int
    history: list[dict]
    seconds: float
    stopped_early: bool


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, whole and on the CPU. Under FSDP every process must call it (gathering a
    sharded parameter is collective)."""
    return {name: _whole(p).detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def deterministic_default() -> bool:
    return not torch.cuda.is_available()


def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    """Seed python, numpy and torch (every device). Call it before the model's new parameters (PEFT, RETRO layers)
    are initialised: their initial values otherwise come from a seed the libraries draw at import. With
    `deterministic` (None: on CPU) it also sets CUBLAS_WORKSPACE_CONFIG, which cuBLAS reads when it starts."""
    if deterministic or (deterministic is None and deterministic_default()):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@contextmanager
def deterministic_mode(enabled: bool | None):
    """Within it, torch uses deterministic algorithms only (None: on CPU only); the previous settings come back
    after. On GPU this also needs CUBLAS_WORKSPACE_CONFIG (set here when unset, before cuBLAS starts)."""
    enabled = deterministic_default() if enabled is None else bool(enabled)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield enabled
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return -1


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first; a half-written one never has its final name (see `_save_checkpoint`)."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if _checkpoint_step(p) >= 0 and (p / "state.json").is_file()]
    return sorted(found, key=_checkpoint_step, reverse=True)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (not checked: see `load_checkpoint`)."""
    found = checkpoints(output_dir)
    return found[0] if found else None


def verify_checkpoint(checkpoint: Path, checksums=True) -> None:
    """Sizes and checksums of a checkpoint's files against its manifest (IntegrityError naming the file); a
    checkpoint without a manifest is refused, not trusted."""
    remedy = (f"this checkpoint is damaged or was not written by this version; delete {checkpoint} and rerun the "
              f"same command to resume from the one before it")
    verify_sealed(checkpoint, "checkpoint", remedy, checksums)


def load_checkpoint(checkpoint: Path) -> dict:
    """Every file of a checkpoint, checked and read (nothing is applied yet): {"trainable", "saved", "state"}."""
    verify_checkpoint(checkpoint)
    trainable = load_file(str(checkpoint / "trainable.safetensors"))
    saved = load_state(checkpoint / "optimizer.safetensors")
    state = json.loads((checkpoint / "state.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    if not isinstance(saved, dict) or not {"optimizer", "scheduler", "rng"} <= set(saved) or "step" not in state:
        raise CheckpointError(f"{checkpoint}: optimizer.safetensors or state.json lacks the expected entries")
    return {"trainable": trainable, "saved": saved, "state": state, "config": config}


def resumable_checkpoint(output_dir: Path, run_config: dict, report: Callable[[str], object] = print):
    """(path, contents) of the newest checkpoint that reads back intact, or (None, None) when there is none.
    A damaged newer one is skipped with a message through `report`; if every one is damaged, CheckpointError."""
    damaged = []
    for checkpoint in checkpoints(output_dir):
        try:
            contents = load_checkpoint(checkpoint)
        except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint back means it is damaged
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            damaged.append(f"{checkpoint.name} ({reason})")
            continue
        _check_resumable(checkpoint, run_config, contents["config"])  # another run's folder: an error, no fallback
        if damaged:
            report(f"warning: the latest checkpoint(s) are damaged: {'; '.join(damaged)}. Resuming from "
                   f"{checkpoint} (step {contents['state']['step']}) instead")
        return checkpoint, contents
    if damaged:
        raise CheckpointError(f"{output_dir}: every checkpoint is damaged ({'; '.join(damaged)}); delete them "
                              f"(or pick a new output_dir) to train from the start")
    return None, None


def _checkpoint_contents(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    """(trainable parameters, optimiser state) as a checkpoint stores them; under FSDP both are gathered whole
    (every process calls this) and the optimiser state is keyed by parameter name."""
    if not sharded:
        return trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return trainable_state(model), get_optimizer_state_dict(model, optimizer, options=options)


def _save_checkpoint(output_dir: Path, trainable: dict, optimizer_state: dict, scheduler, state: dict,
                     run_config: dict, sharded: bool = False) -> Path:
    target = output_dir / f"{CHECKPOINT_PREFIX}{state['step']}"
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=output_dir))
    try:
        save_file(trainable, str(staging / "trainable.safetensors"))
        save_state({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "sharded": sharded}, staging / "optimizer.safetensors")
        (staging / "config.json").write_text(json.dumps(run_config, indent=2, default=str))
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        seal_directory(staging, "checkpoint", CHECKPOINT_FILES, step=state["step"])  # last
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_trainable(model: torch.nn.Module, path: Path, saved: dict[str, torch.Tensor] | None = None) -> None:
    """Load trained parameters into `model`, refusing a checkpoint of another set of parameters or shapes."""
    saved = load_file(str(path)) if saved is None else saved
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not hold this model's trainable parameters (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); it was saved for another model or PEFT method")
    with torch.no_grad():
        for name, tensor in saved.items():
            if expected[name].shape != tensor.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{tuple(expected[name].shape)}; it was saved for another base model")
            expected[name].copy_(tensor)


def _check_resumable(checkpoint: Path, run_config: dict, saved: dict | None = None) -> None:
    saved = json.loads((checkpoint / "config.json").read_text()) if saved is None else saved
    for key in ("model", "stage", "decoder", "peft", "retro", "index_hash"):
        if saved.get(key) != run_config.get(key):
            raise CheckpointError(f"{checkpoint} was written by a run with {key}={saved.get(key)!r}, this run has "
                                  f"{key}={run_config.get(key)!r}; resume with the same config or pick a new output_dir")


class _Metrics:
    """Appends rows to metrics.jsonl and TensorBoard as they come; CSV and the PNG are written at the end."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.path, self.enabled = output_dir / "metrics.jsonl", enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def history(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint so the curve is not doubled."""
        if self.enabled and self.path.is_file():
            kept = [row for row in self.history() if row["step"] <= step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.writer.close()
        rows = self.history()
        keys = sorted({key for row in rows for key in row}, key=lambda k: (k != "step", k))
        with (self.path.parent / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        plots.learning_curve(rows, self.path.parent / "learning_curve.png")


def param_groups(parameters: list, named: dict[str, list] | None, lr: float, lr_scales: dict[str, float]) -> list[dict]:
    """Optimiser groups: the trained parameters of each named group with an `lr_scales` entry get `lr * scale`, the
    rest `lr`. Scales name RETRO's added layers (gate, cca_qk, cca, encoder); for a model without them (the GPT
    baseline), or whose added layers do not train, they have nothing to act on."""
    training = {id(p) for p in parameters}
    placed: set[int] = set()
    groups = []
    for name, scale in lr_scales.items():
        params = [p for p in (named or {}).get(name, []) if id(p) in training and id(p) not in placed]
        placed |= {id(p) for p in params}
        if params:
            groups.append({"params": params, "lr": lr * scale, "name": name})
    rest = [p for p in parameters if id(p) not in placed]
    return ([{"params": rest, "lr": lr, "name": "default"}] if rest else []) + groups


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards as units, innermost first: the decoder layers (the classes HF models name in
    `_no_split_modules`) and RETRO's CCA blocks and neighbour encoder; the rest (embeddings, final norm, LM head)
    stays with the root."""
    names = {"ChunkedCrossAttention", "NeighbourEncoder", "JointCCA"}
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    return units[::-1]


def shard(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """Shard `model` in place across the processes with FSDP2 (`torch.distributed.fsdp.fully_shard`): every unit of
    `shard_units` and the root. Frozen and trained parameters are sharded alike; gradients are reduce-scattered, so
    each process keeps the optimiser state of its shard only. With bf16/fp16 the units compute in that precision
    and reduce gradients in fp32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _unshard(model: torch.nn.Module) -> None:
    """Gather every sharded unit whole on every process (collective), so that what comes after training (saving,
    counting, evaluating) sees ordinary parameters."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant gradient checkpointing: RETRO's own (base layers, CCA blocks and neighbour encoder), or the
    HF base model's decoder layers for the GPT baseline."""
    retro = next((m for m in model.modules() if hasattr(m, "retro_parameter_groups")), None)
    if retro is not None:
        retro.gradient_checkpointing_enable()
        return
    base = getattr(model, "base", model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def stopping_value(row: dict, metric: str) -> float:
    """What early stopping watches, lower being better: the validation loss, or for `reading_gap` minus the gap
    between the validation loss with shuffled and with true neighbours (a model that reads widens the gap)."""
    if metric == "reading_gap":
        return -(row["val_loss_shuffled"] - row["val_loss"])
    return row["val_loss"]


def fit(model: torch.nn.Module, train_set: Sequence, collate: Callable, loss_fn: Callable, config: TrainConfig,
        output_dir: str | Path, run_config: dict, validate: Callable | None = None, resume: bool = True,
        named_groups: dict[str, list] | None = None) -> FitResult:
    """Train the parameters of `model` that require grad on `train_set` until `config.max_steps` optimiser steps,
    with torch in deterministic mode when `config.deterministic` asks for it (see `_fit`)."""
    with deterministic_mode(getattr(config, "deterministic", None)):
        return _fit(model, train_set, collate, loss_fn, config, output_dir, run_config, validate, resume,
                    named_groups)


def _fit(model: torch.nn.Module, train_set: Sequence, collate: Callable, loss_fn: Callable, config: TrainConfig,
         output_dir: str | Path, run_config: dict, validate: Callable | None = None, resume: bool = True,
         named_groups: dict[str, list] | None = None) -> FitResult:
    """Train the parameters of `model` that require grad on `train_set` until `config.max_steps` optimiser steps.

    `loss_fn(model, batch) -> scalar loss`; `validate(model) -> {"val_loss": ..., ...}` runs every `eval_every` steps
    and at the end. `run_config` is stored with each checkpoint; resuming is refused if it differs in substance.
    `named_groups` (name -> parameters) lets `config.lr_scales` give a group its own learning rate.
    """
    import time

    from accelerate import Accelerator
    from transformers import get_scheduler

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not len(train_set):
        raise ValueError("the training set is empty: check data.qa, data.train_size and the validation split")
    precision = resolve_precision(config.precision)
    # cpu=True on a machine without CUDA: otherwise accelerate leaves processes launched by torchrun unconnected
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available(),
                              mixed_precision={"fp32": "no"}.get(precision, precision))
    sharded = config.fsdp and accelerator.num_processes > 1
    seed_everything(config.seed)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter requires grad: the PEFT method or stage left nothing to train")
    metrics = _Metrics(output_dir, accelerator.is_main_process)
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_val_loss": None, "bad_evals": 0, "seconds": 0.0}
    checkpoint, contents = None, None
    if resume:
        checkpoint, contents = resumable_checkpoint(
            output_dir, run_config, report=lambda m: accelerator.print(m, file=sys.stderr))
    if checkpoint is not None:
        load_trainable(model, checkpoint / "trainable.safetensors", contents["trainable"])  # before sharding
        saved = contents["saved"]
        if bool(saved.get("sharded")) != sharded:
            raise CheckpointError(f"{checkpoint} was written {'with' if saved.get('sharded') else 'without'} FSDP "
                                  f"and this run is {'sharded' if sharded else 'not sharded'}; resume it with the "
                                  f"same train.fsdp setting and process count, or pick a new output_dir")
    if sharded:  # FSDP replaces the parameters: the optimiser and the named groups are made after it, by name
        group_names = {name: [n for n, p in model.named_parameters() if id(p) in {id(q) for q in params}]
                       for name, params in (named_groups or {}).items()}
        shard(model, accelerator.device, precision)
        by_name = dict(model.named_parameters())
        named_groups = {name: [by_name[n] for n in names] for name, names in group_names.items()}
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(parameters, named_groups, config.lr, config.lr_scales),
                                  lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)
    if checkpoint is not None:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = contents["state"]
        metrics.truncate_after(state["step"])
    if sharded:  # sharded already; accelerate keeps the process group, data sharding and accumulation
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if checkpoint is not None:
        set_rng_state(saved["rng"])

    def epoch_loader(epoch: int):
        # The order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches.
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        loader = torch.utils.data.DataLoader([train_set[i] for i in order.tolist()], batch_size=config.batch_size,
                                             shuffle=False, collate_fn=collate, drop_last=len(train_set) >= config.batch_size)
        return accelerator.prepare_data_loader(loader)

    last_good = checkpoint
    stopped_early = False
    started = time.perf_counter() - state["seconds"]
    progress = tqdm(total=config.max_steps, initial=state["step"], desc=f"train {output_dir.name}",
                    disable=not accelerator.is_main_process)
    model.train()
    while state["step"] < config.max_steps and not stopped_early:
        loader = epoch_loader(state["epoch"])
        batches = accelerator.skip_first_batches(loader, state["batches_in_epoch"]) if state["batches_in_epoch"] else loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                if not bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()):
                    progress.close()
                    where = f"the last good checkpoint, {last_good}, is intact" if last_good else "no checkpoint was written yet"
                    raise NonFiniteLossError(f"the loss became {loss.item()} at step {state['step'] + 1}; {where}. "
                                             f"Lower train.lr or set train.max_grad_norm, then resume.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state["batches_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            row = {"step": state["step"], "loss": accelerator.gather(loss.detach().reshape(1)).mean().item(),
                   "lr": scheduler.get_last_lr()[0]}
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}")
            done = state["step"] >= config.max_steps
            if validate is not None and (state["step"] % config.eval_every == 0 or done):
                model.eval()
                row.update(validate(accelerator.unwrap_model(model)))
                model.train()
                watched = stopping_value(row, config.early_stopping_metric)
                if state["best_val_loss"] is None or watched < state["best_val_loss"] - config.early_stopping_min_delta:
                    state["best_val_loss"], state["bad_evals"] = watched, 0
                else:
                    state["bad_evals"] += 1
                patience = config.early_stopping_patience
                stopped_early = patience is not None and state["bad_evals"] >= patience
            metrics.log(row)
            state["seconds"] = time.perf_counter() - started
            if state["step"] % config.save_every == 0 or done or stopped_early:
                trainable, optimizer_state = _checkpoint_contents(accelerator.unwrap_model(model), optimizer, sharded)
                if accelerator.is_main_process:
                    last_good = _save_checkpoint(output_dir, trainable, optimizer_state, scheduler, state,
                                                 run_config, sharded)
            accelerator.wait_for_everyone()
            if done or stopped_early:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    progress.close()
    metrics.close()
    if sharded:
        _unshard(model)
    return FitResult(steps=state["step"], history=metrics.history(), seconds=state["seconds"],
                     stopped_early=stopped_early)
