"""Run configuration: YAML files under configs/ plus `key.sub=value` overrides -> a validated `RunConfig`.

Every field is checked when the config is built, with a message that names the field and what to change,
so a bad value stops the run before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STAGES = ("retrofit", "finetune")
MODELS = ("retro", "gpt")
RETRIEVERS = ("dense", "bm25", "hybrid")
SCHEDULES = ("linear", "cosine", "constant")
STOPPING_METRICS = ("val_loss", "reading_gap")
LR_GROUPS = ("gate", "cca_qk", "induction", "cca", "encoder")  # RetroModel.retro_parameter_groups()
RETRO_LR_SCALES = {"gate": 50, "cca_qk": 10, "induction": 0.1, "cca": 0.1, "encoder": 0.1}


class ConfigError(ValueError):
    pass


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimiser steps of the run
    batch_size: int = 4  # sequences or questions per step and process, before accumulation
    grad_accum: int = 1  # micro-batches accumulated into one optimiser step
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    schedule: str = "linear"  # learning-rate decay after warm-up: linear | cosine | constant
    warmup_steps: int = 0  # steps of linear warm-up from zero; below max_steps
    max_grad_norm: float = 1.0  # gradient-norm clipping
    eval_every: int = 50  # steps between validations (loss with true and shuffled neighbours)
    save_every: int = 50  # steps between checkpoints (the trained state, optimiser, scheduler, RNG)
    early_stopping_patience: int | None = None  # evaluations without a better validation loss
    # what early stopping watches: val_loss, or reading_gap (val_loss_shuffled - val_loss, which grows while a
    # RETRO learns to read its neighbours); an evaluation counts as better only by more than min_delta
    early_stopping_metric: str = "val_loss"
    early_stopping_min_delta: float = 0.0  # how much better an evaluation must be to reset the patience
    precision: str = "auto"  # auto | fp32 | bf16 | fp16, training and evaluation (see retrotune.precision)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (decoder, CCA, encoder)
    # shard the model across the processes of `torchrun`/`accelerate launch` with FSDP2 instead of copying it whole
    # into each (data-parallel); checkpoints hold the same whole trained state either way
    fsdp: bool = False
    seed: int = 0  # seeds the data order and the initialisation of new parameters
    # Learning-rate multipliers for RETRO's added layers, by group: gate (the CCA gates and null-slot scores),
    # cca_qk (content heads' query/key projections), induction (the induction path's token projections), cca (the
    # rest of CCA), encoder. The default opens the gates fast, lets content heads learn where to look at 10x the
    # rate, and moves what CCA starts as (the induction path and the copy path, `cca_init: copy`) slowly, so
    # training refines a path that already reads rather than scrambling it. No effect on other parameters.
    lr_scales: dict = field(default_factory=lambda: dict(RETRO_LR_SCALES))
    deterministic: bool | None = None  # deterministic algorithms, seeded init; None: on CPU only (docs/integrity.md)

    def __post_init__(self):
        for name in ("lr", "weight_decay", "max_grad_norm", "early_stopping_min_delta"):
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise ConfigError(f"train.{name} must be a number, got {getattr(self, name)!r}") from None
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every"):
            _need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        _need(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _need(self.schedule in SCHEDULES, f"train.schedule {self.schedule!r} is unknown; choose one of {SCHEDULES}")
        _need(self.early_stopping_metric in STOPPING_METRICS,
              f"train.early_stopping_metric {self.early_stopping_metric!r} is unknown; choose one of "
              f"{STOPPING_METRICS}")
        _need(self.precision in ("auto", "fp32", "bf16", "fp16"),
              f"train.precision {self.precision!r} is unknown; choose auto, fp32, bf16 or fp16")
        _need(isinstance(self.lr_scales, dict), f"train.lr_scales must be a mapping such as {{gate: 100}}, "
                                                 f"got {self.lr_scales!r}")
        for name, scale in self.lr_scales.items():
            _need(name in LR_GROUPS, f"train.lr_scales: unknown group {name!r}; choose from {LR_GROUPS}")
            _need(isinstance(scale, (int, float)) and scale > 0,
                  f"train.lr_scales.{name} must be a positive number, got {scale!r}")
        _need(0 <= self.warmup_steps < self.max_steps,
              f"train.warmup_steps ({self.warmup_steps}) must be >= 0 and below train.max_steps ({self.max_steps})")


@dataclass
class DataConfig:
    qa: str = "data/squad-demo"  # the task's data: a file, a folder of split files or a Hugging Face dataset id
    eval_qa: str | None = None  # a separate evaluation file; None: the source's eval_split, or a split by group
    train_split: str = "train"  # split names in a folder of split files or a hub dataset
    eval_split: str = "validation"  # the evaluation split's name, as train_split
    train_size: int | None = None  # the data-scale axis: None = all training questions
    validation_groups: list[str] | None = None  # articles held out; None = a seeded share of them
    validation_fraction: float = 0.25  # share of articles held out when validation_groups is None
    validation_size: int | None = 64  # validation questions (loss during training, EM/F1 at evaluation)
    validation_generate: int = 32  # of those, how many are answered for EM/F1 at each validation during training
    # of those, how many give the validation loss during training (spread evenly over them; None: all; 0: no
    # validation during training, where the evaluation after it scores the same questions anyway)
    validation_loss_size: int | None = None
    sequence_chunks: int = 4  # retrofit: corpus sequences of this many chunks
    self_neighbour_rate: float = 0.0  # retrofit: share of chunks given themselves + continuation as first neighbour
    # retrofit: documents of these groups (a title, or an id's part before '#') stay out of the training and
    # validation sequences; they stay in the index as neighbours. An experiment fills it with its evaluation articles
    exclude_groups: list[str] | None = None
    max_question_tokens: int = 64  # questions are cut to this many tokens
    max_answer_tokens: int = 16  # training answers are cut to this many tokens

    def __post_init__(self):
        _need(self.train_size is None or self.train_size >= 1, "data.train_size must be >= 1 or null (all)")
        _need(0 < self.validation_fraction < 1, "data.validation_fraction must be in (0, 1)")
        _need(self.validation_loss_size is None or self.validation_loss_size >= 0,
              "data.validation_loss_size must be >= 0 (0: no validation loss) or null (all validation questions)")
        _need(self.sequence_chunks >= 1, "data.sequence_chunks must be >= 1")
        _need(isinstance(self.self_neighbour_rate, (int, float)) and 0 <= self.self_neighbour_rate <= 1,
              f"data.self_neighbour_rate must be a number in [0, 1], got {self.self_neighbour_rate!r}")


@dataclass
class RunConfig:
    stage: str = "finetune"  # retrofit (RETRO's added layers on corpus text) | finetune (QA with a PEFT method)
    model: str = "retro"  # retro (neighbours through cross-attention) | gpt (neighbour text in the prompt)
    task: str = "squad_open"  # retrotune.tasks: squad_open, nq_open, triviaqa, narrativeqa, qasper, quality, qmsum
    decoder: str = "smollm2-135m"  # base decoder: an alias, a local folder or a Hugging Face model id
    embedder: str = "minilm"  # sentence embedder of the index: an alias, a local folder or a model id
    index: str = "indexes/squad-demo"  # the index folder neighbours are retrieved from
    retriever: str = "dense"  # dense, bm25 or hybrid (bm25 and hybrid need the index's bm25/)
    quantise: str | None = None  # nf4 | int8: the frozen base quantised through bitsandbytes (QLoRA; CUDA only)
    output_dir: str = "runs/default"  # checkpoints, metrics and final weights; rerunning resumes from it
    neighbours_cache: str | None = None  # where question neighbours are stored; default OUTPUT_DIR/neighbours
    init_from: str | None = None  # a retro-fit run's output folder, to fine-tune from its RETRO weights
    neighbours: int = 2  # K, the same for both models
    retro: dict = field(default_factory=dict)  # RetroConfig fields
    peft: dict = field(default_factory=lambda: {"method": "lora"})  # method name + its config fields
    max_new_tokens: int | None = None  # generation length; None: the task's own
    eval_batch_size: int = 16  # questions answered together at evaluation
    prompt_budget: int = 384  # GPT baseline: tokens for neighbours + question
    train: TrainConfig = field(default_factory=TrainConfig)  # the train.* fields
    data: DataConfig = field(default_factory=DataConfig)  # the data.* fields

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = _build(TrainConfig, self.train, "train")
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "data")
        _need(self.stage in STAGES, f"stage {self.stage!r} is unknown; choose one of {STAGES}")
        _need(self.model in MODELS, f"model {self.model!r} is unknown; choose one of {MODELS}")
        _need(self.retriever in RETRIEVERS, f"retriever {self.retriever!r} is unknown; choose one of {RETRIEVERS}")
        _need(not (self.stage == "retrofit" and self.model != "retro"),
              "stage 'retrofit' trains RETRO's added layers; set model: retro (the GPT baseline has nothing to retro-fit)")
        _need(isinstance(self.neighbours, int) and self.neighbours >= 1, f"neighbours must be >= 1, got {self.neighbours!r}")
        _need(isinstance(self.peft, dict) and "method" in self.peft,
              "peft must be a mapping with a 'method' key, e.g. {method: lora, r: 8}")
        _need(self.quantise in (None, "nf4", "int8"),
              f"quantise {self.quantise!r} is unknown; choose nf4 (4-bit NormalFloat, QLoRA), int8 or null")
        _need(not (self.quantise and self.stage == "finetune" and self.peft.get("method") == "full"),
              f"quantise={self.quantise} keeps the base frozen in low precision, and peft.method=full trains it; "
              f"choose a PEFT method (lora, ...) or set quantise=null")
        from retrotune.tasks import TASKS

        _need(self.task in TASKS, f"task {self.task!r} is unknown; choose one of {sorted(TASKS)}")
        _need(isinstance(self.prompt_budget, int) and self.prompt_budget >= self.data.max_question_tokens,
              f"prompt_budget ({self.prompt_budget!r}) must be at least data.max_question_tokens "
              f"({self.data.max_question_tokens}): a prompt no longer than a question leaves the GPT baseline no room "
              f"for its neighbours; raise prompt_budget (the shipped configs use 384)")
        _need(self.max_new_tokens is None or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1),
              f"max_new_tokens must be a positive integer or null (the task's own), got {self.max_new_tokens!r}")
        _need(not (self.stage == "finetune" and self.data.validation_loss_size == 0
                   and self.train.early_stopping_patience is not None),
              "train.early_stopping_patience watches the validation loss, which data.validation_loss_size: 0 switches "
              "off; set validation_loss_size >= 1 or early_stopping_patience: null")

    @property
    def generation_length(self) -> int:
        from retrotune.tasks import get_task

        return self.max_new_tokens or get_task(self.task).max_new_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _matches(value, hint) -> bool:
    """Whether a YAML value fits a field's type; types this does not know are left to __post_init__."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, str):
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is list or origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping"}
    return names.get(hint, "a mapping" if dataclasses.is_dataclass(hint) else getattr(hint, "__name__", str(hint)))


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        scope = f"{where}: unknown field(s)" if where else "unknown top-level field(s)"
        raise ConfigError(f"{scope} {unknown}; known fields are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _matches(value, hints[name]):
            raise ConfigError(f"{where + '.' if where else ''}{name} must be {_describe(hints[name])}, got "
                              f"{value!r}; fix it in the config file or the key=value override")
    return cls(**values)


def _parse_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`train.lr=3e-4 peft.r=16 model=gpt`: dotted keys into the nested mapping, values parsed as YAML.

    `peft.method=NAME` naming another method than the file's starts that mapping afresh: the old method's fields
    are dropped (they may not exist for the new one), and the new method's fields come from the other `peft.*`
    overrides, in any order."""
    values = dict(values)
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        *parents, leaf = key.split(".")
        parsed.append((parents, leaf, _parse_value(raw)))
    for parents, leaf, value in parsed:
        if parents and parents[-1] == "peft" and leaf == "method":
            target = _nested(values, parents)
            if target.get("method") != value:
                target.clear()
    for parents, leaf, value in parsed:
        _nested(values, parents)[leaf] = value
    return values


def _nested(values: dict, parents: list[str]) -> dict:
    """The mapping at `parents` below `values`, copied on the way down (the caller's dicts stay as they were)."""
    target = values
    for parent in parents:
        existing = target.get(parent)
        target[parent] = dict(existing) if isinstance(existing, dict) else {}
        target = target[parent]
    return target


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    values = dict(base or {})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{file}: no such config file (shipped ones are in configs/)")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of config fields")
        values.update(loaded)
    values = apply_overrides(values, list(overrides))
    try:
        return _build(RunConfig, values, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None
