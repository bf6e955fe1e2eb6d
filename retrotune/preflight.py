"""Checks of a run's inputs that take milliseconds, made before any model is loaded: the PEFT method and its
fields, the model names, the index (manifest, file sizes and checksums), the QA data and `init_from`. A bad value
stops the command with one message instead of a traceback after seconds of loading.

Also the command lines' error path: `EXPECTED` lists the errors a user can cause (printed as `error: ...`, exit 2);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path

from retrotune.config import ConfigError, RunConfig


def expected_errors() -> tuple[type[BaseException], ...]:
    from retrieval.errors import expected_errors as retrieval_errors
    from retrotune.assemble import RunMismatchError
    from retrotune.qa import QADataError
    from backbones import QuantisationUnavailable
    from retrotune.trainer import CheckpointError, NonFiniteLossError

    return (ConfigError, QADataError, RunMismatchError, CheckpointError, NonFiniteLossError, QuantisationUnavailable,
            *retrieval_errors())


def check_model_name(name: str, kind: str) -> None:
    """An alias, a local folder or a hub id (without converting or loading anything)."""
    from backbones import check_model_name as check

    check(name, kind)


def check_peft(peft: dict, where: str = "peft") -> None:
    """A PEFT entry: its method fields, and its own `train:` settings where an experiment gives them."""
    from peft_methods import peft_config_from_dict
    from peft_methods.hparams import split_peft_entry

    try:
        fields, overrides = split_peft_entry(peft, where)
        peft_config_from_dict(fields, where)
        import dataclasses

        from retrotune.config import TrainConfig

        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ConfigError(f"{where}.train: unknown field(s) {unknown}; it takes train settings such as lr, "
                              f"warmup_steps, max_steps")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_index(index: str, corpus_hint: str = "data/squad-demo/passages.jsonl") -> None:
    from retrieval.manifest import MANIFEST, read_manifest, verify_directory

    if not (Path(index) / MANIFEST).is_file() and not (Path(index).is_dir() and any(Path(index).iterdir())):
        raise FileNotFoundError(f"{index}: no index there (no {MANIFEST}); build it with: python -m retrieval build "
                                f"--corpus {corpus_hint} --out {index}")
    verify_directory(index, read_manifest(index))


def check_run(config: RunConfig, index: bool = True, data: bool = True) -> None:
    """Everything of `config` that can be checked without loading a model."""
    from backbones import check_quantise

    check_model_name(config.decoder, "decoder")
    check_model_name(config.embedder, "embedder")
    check_quantise(config.quantise)  # CUDA and bitsandbytes, before anything loads
    if config.stage == "finetune":
        check_peft(config.peft)
    if config.init_from and not (Path(config.init_from) / "final" / "retro").is_dir():
        raise ConfigError(f"init_from: {config.init_from} holds no finished retro-fit run (no final/retro); train "
                          f"it first with a retrofit config, or fix the path")
    if data and config.stage == "finetune":
        from retrotune.cell import task_data

        try:
            task_data(config)
        except ValueError as error:  # QADataError, or an empty split
            raise ConfigError(f"data.qa: {error}") from None
    if index:
        check_index(config.index)
