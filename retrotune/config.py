"""Run configuration: YAML files under configs/ plus `key.sub=value` overrides -> a validated `RunConfig`.

Every field is checked when the config is built, with a message that names the field and what to change,
so a bad value stops the run before any model is loaded.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STAGES = ("retrofit", "finetune")
MODELS = ("retro", "gpt")
RETRIEVERS = ("dense", "bm25", "hybrid")
SCHEDULES = ("linear", "cosine", "constant")


class ConfigError(ValueError):
    pass


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    save_every: int = 50
    early_stopping_patience: int | None = None  # evaluations without a better validation loss
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (bf16/fp16 need a GPU; auto takes bf16 there)
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("lr", "weight_decay", "max_grad_norm"):
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise ConfigError(f"train.{name} must be a number, got {getattr(self, name)!r}") from None
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every"):
            _need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        _need(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _need(self.schedule in SCHEDULES, f"train.schedule {self.schedule!r} is unknown; choose one of {SCHEDULES}")
        _need(self.precision in ("auto", "fp32", "bf16", "fp16"),
              f"train.precision {self.precision!r} is unknown; choose auto, fp32, bf16 or fp16")
        _need(0 <= self.warmup_steps < self.max_steps,
              f"train.warmup_steps ({self.warmup_steps}) must be >= 0 and below train.max_steps ({self.max_steps})")


@dataclass
class DataConfig:
    qa: str = "data/squad-demo"  # QA file/folder/dataset for the finetune stage
    train_size: int | None = None  # the data-scale axis: None = all training questions
    validation_groups: list[str] | None = None  # articles held out; None = a seeded share of them
    validation_fraction: float = 0.25
    validation_size: int | None = 64  # validation questions (loss during training, EM/F1 at evaluation)
    validation_generate: int = 32  # of those, how many are answered for EM/F1 at each validation during training
    sequence_chunks: int = 4  # retrofit: corpus sequences of this many chunks
    max_question_tokens: int = 64
    max_answer_tokens: int = 16

    def __post_init__(self):
        _need(self.train_size is None or self.train_size >= 1, "data.train_size must be >= 1 or null (all)")
        _need(0 < self.validation_fraction < 1, "data.validation_fraction must be in (0, 1)")
        _need(self.sequence_chunks >= 1, "data.sequence_chunks must be >= 1")


@dataclass
class RunConfig:
    stage: str = "finetune"
    model: str = "retro"
    decoder: str = "smollm2-135m"
    embedder: str = "minilm"
    index: str = "indexes/squad-demo"
    retriever: str = "dense"  # dense, bm25 or hybrid (bm25 and hybrid need the index's bm25/)
    output_dir: str = "runs/default"
    neighbours_cache: str | None = None  # where question neighbours are stored; default OUTPUT_DIR/neighbours
    init_from: str | None = None  # a retro-fit run's output folder, to fine-tune from its RETRO weights
    neighbours: int = 2  # K, the same for both models
    retro: dict = field(default_factory=dict)  # RetroConfig fields
    peft: dict = field(default_factory=lambda: {"method": "lora"})  # method name + its config fields
    max_new_tokens: int = 16
    prompt_budget: int = 384  # GPT baseline: tokens for neighbours + question
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
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
    """`train.lr=3e-4 peft.r=16 model=gpt`: dotted keys into the nested mapping, values parsed as YAML."""
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            existing = target.get(parent)
            target[parent] = dict(existing) if isinstance(existing, dict) else {}
            target = target[parent]
        target[leaf] = _parse_value(raw)
    return values


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
        return _build(RunConfig, values, path or "config")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None
