"""Checks of a run's inputs that take milliseconds, made before any model is loaded: the PEFT method and its
fields, the model names, the index (manifest, file sizes and checksums), the QA data and `init_from`. A bad value
stops the command with one message instead of a traceback after seconds of loading.

Also the command lines' error path: `EXPECTED` lists the errors a user can cause (printed as `error: ...`, exit 2);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
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

        known = {f.name for f in dataclasses.fields(TrainConfig)} | {"warmup_ratio"}  # a share of max_steps
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"{where}.train: unknown field(s) {unknown}; it takes train settings such as lr, "
                              f"warmup_steps (or warmup_ratio), max_steps")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_peft_fits(config: RunConfig, where: str = "peft") -> None:
    """The run's PEFT method against its model, before the model exists: prefix_tuning on RETRO, RETRO-only targets
    on the GPT baseline, 'retro_encoder' under joint CCA, bitfit on a decoder without biases (seen on the decoder
    built on the meta device, without weights)."""
    from peft_methods import check_fits, peft_config_from_dict
    from peft_methods.hparams import split_peft_entry

    method = peft_config_from_dict(split_peft_entry(config.peft, where)[0], where)  # valid: see check_peft
    base = _meta_decoder(config.decoder) if method.method == "bitfit" else None
    try:
        check_fits(method, config.model == "retro", _retro_attention(config) != "joint", base)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def check_experiment_peft(exp) -> None:
    """Every PEFT entry of an experiment (an `ExperimentConfig`) against every model of its grid, with the
    experiment's `retro_peft` merged into the RETRO cells' entries as the grid does, before anything runs."""
    for i, entry in enumerate(exp.peft):
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"peft[{i}]: {entry!r} is not a PEFT entry; give a mapping such as "
                              f"{{method: lora, r: 8}}")
        for model in exp.models:
            method = {key: value for key, value in entry.items() if key != "seeds"}  # seeds are the grid's
            peft = {**method, **exp.retro_peft} if model == "retro" else method
            where = f"peft[{i}] ({peft.get('method')!r} on model {model})"
            check_peft(peft, where)
            check_peft_fits(RunConfig(**{**exp.run, "stage": "finetune", "model": model, "peft": peft}), where)


def check_positive(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: must be a positive integer, got {value!r}; give 1 or more")


def _retro_attention(config: RunConfig) -> str:
    """RETRO's attention kind: the retro-fit run's (`init_from`) when there is one, else the run's `retro` field."""
    import json

    from retro.config import RetroConfig

    saved = Path(config.init_from or "") / "final" / "retro" / "retro.json"
    if config.init_from and saved.is_file():
        try:
            return json.loads(saved.read_text())["retro_config"].get("attention", RetroConfig.attention)
        except (ValueError, KeyError, AttributeError):
            pass  # a damaged file is reported by check_init_from
    return config.retro.get("attention", RetroConfig.attention)


@functools.lru_cache(maxsize=8)
def _meta_decoder(name: str):
    from backbones.meta import meta_decoder

    return meta_decoder(decoder_config(name))


def decoder_config(name: str):
    """The decoder's config without its weights; ConfigError naming the `decoder` field when it cannot be read (a
    hub id that is not in the local cache, a folder without config.json)."""
    from backbones.meta import decoder_config as read

    try:
        return read(name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"decoder: {name!r} has no readable model config ({reason}); give a built-in alias, a local "
                          f"model folder, or a Hugging Face id that is downloaded (HF_HUB_OFFLINE=1 reads only the "
                          f"local cache)") from None


def _hub_id(name: str) -> bool:
    from backbones.resolve import DECODER_ALIASES

    return name not in DECODER_ALIASES and not Path(name).expanduser().is_dir()


def shipped_corpus(index: str) -> str | None:
    """The shipped corpus an index of that name is built from (`indexes/squad-open` <- `data/squad-open/`), if any."""
    corpus = Path("data") / Path(index).name / "passages.jsonl"
    return str(corpus) if corpus.is_file() else None


def check_index(index: str, retriever: str | None = None) -> None:
    """The index: finished, and the files `retriever` reads intact (None: every file)."""
    from retrieval.manifest import MANIFEST, build_command, read_manifest, verify_directory

    if not (Path(index) / MANIFEST).is_file() and not (Path(index).is_dir() and any(Path(index).iterdir())):
        raise FileNotFoundError(f"{index}: no index there (no {MANIFEST}); build it with: "
                                f"{build_command(shipped_corpus(index), index)}")
    verify_directory(index, read_manifest(index), retriever=retriever)


def check_init_from(run_dir: str) -> None:
    """A finished retro-fit run, intact (its sealed `final/`), holding RETRO weights."""
    from retrotune.runs import verify_final

    try:
        final = verify_final(run_dir, "retro-fit run")
    except FileNotFoundError as error:
        raise ConfigError(f"init_from: {error}") from None
    if not (final / "retro").is_dir():
        raise ConfigError(f"init_from: {run_dir} holds no retro-fit run (no final/retro); give the output_dir of a "
                          f"run trained with a retrofit config")


def check_run(config: RunConfig, index: bool = True, data: bool = True) -> None:
    """Everything of `config` that can be checked without loading a model."""
    from backbones import check_quantise

    check_model_name(config.decoder, "decoder")
    if _hub_id(config.decoder):
        decoder_config(config.decoder)  # a hub id: its config is in the cache (or can be downloaded)
    check_model_name(config.embedder, "embedder")
    check_quantise(config.quantise)  # CUDA and bitsandbytes, before anything loads
    if config.stage == "finetune":
        check_peft(config.peft)
        check_peft_fits(config)
    if config.init_from:
        check_init_from(config.init_from)
    if data and config.stage == "finetune":
        from retrotune.cell import task_data

        try:
            task_data(config)
        except ValueError as error:  # QADataError, or an empty split
            raise ConfigError(f"data.qa: {error}") from None
    if index:
        check_index(config.index, retriever=config.retriever)
