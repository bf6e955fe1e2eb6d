"""Stage 3, model + PEFT: a `RunConfig` and its retrieval -> the backbone, RETRO (retro-fitted, or loaded from a
retro-fit run) or the GPT baseline, the run's PEFT method, and the QA contract both are trained and evaluated
through. Also what a trained run depends on (its identity) and the check made when it is evaluated again.
"""
from __future__ import annotations

import os

from pathlib import Path

import torch

from retrotune.config import RunConfig
from retrotune.models import load_decoder
from retrotune.neighbours import retrieval_identity


class RunMismatchError(ValueError):
    pass


def evaluation_device() -> str | None:
    """Where evaluation runs: this process's GPU when there is one (under torchrun, LOCAL_RANK's), else the CPU."""
    if not torch.cuda.is_available():
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def build_backbone(config: RunConfig, device: str | None = None, dtype: torch.dtype = torch.float32):
    return load_decoder(config.decoder, dtype=dtype, device=device)


def build_model(config: RunConfig, base, retriever, with_peft: bool = True):
    """The model of this run, before training: RETRO (retro-fitted, or loaded from `init_from`) or the GPT base,
    with the run's PEFT method applied for the finetune stage. Returns the model to train or evaluate."""
    from peft_methods import apply_peft
    from retro import RetroConfig, retrofit
    from retro.checkpoint import load_retro

    if config.model == "gpt":
        return apply_peft(base, config.peft) if with_peft else base
    if config.init_from:
        from retrotune.runs import verify_final

        final = verify_final(config.init_from, "retro-fit run")
        model = load_retro(final / "retro", base, chunk_size=retriever.chunk_size)
    else:
        fields = {"chunk_size": retriever.chunk_size, "num_neighbours": config.neighbours, **config.retro}
        model = retrofit(base, RetroConfig(**fields))
    if model.config.num_neighbours != config.neighbours:
        raise RunMismatchError(f"the RETRO weights use {model.config.num_neighbours} neighbours, the run asks for "
                               f"neighbours={config.neighbours}; use the same k for both")
    if config.stage == "retrofit":
        for p in model.parameters():
            p.requires_grad = False
        for p in model.retro_parameters():
            p.requires_grad = True
        return model
    return apply_peft(model, config.peft) if with_peft else model


def qa_interface(config: RunConfig, model, tokenizer, retriever):
    from retro.qa import GPTQA, RetroQA

    if config.model == "gpt":
        return GPTQA(model, tokenizer, num_neighbours=config.neighbours, budget=config.prompt_budget)
    # corpus neighbours are searched again for chunks the answer completes; a document index is not (the question's
    # neighbours serve the whole answer)
    return RetroQA(model, tokenizer, retrieve=retriever if hasattr(retriever, "db") else None)


def run_identity(config: RunConfig, retriever, base) -> dict:
    """What a trained run depends on: evaluation refuses other base weights and neighbours it cannot read."""
    from retro.checkpoint import base_identity

    return {"decoder": config.decoder, "index": str(config.index), "task": config.task,
            "retrieval": retrieval_identity(retriever), "index_hash": retrieval_identity(retriever)["index_hash"],
            "base_model": base_identity(base), "model": config.model, "stage": config.stage,
            "peft": config.peft, "retro": config.retro, "neighbours": config.neighbours}


def check_identity(saved: dict, retriever, base, where: Path) -> dict:
    """Refuse a base model with other weights, or neighbours the checkpoint cannot read (another tokenizer, chunk
    size or neighbour length). Another corpus is allowed: returns {trained_on, evaluated_on, same_corpus}, which
    evaluation records beside the scores."""
    from retro.checkpoint import base_identity

    identity = base_identity(base)
    if saved["base_model"]["embedding_sha256"] != identity["embedding_sha256"]:
        raise RunMismatchError(f"{where} was trained on base model {saved['decoder']!r}; the base model given "
                               f"({identity['name_or_path']!r}) has other weights. Pass --decoder "
                               f"{saved['decoder']}")
    here = retrieval_identity(retriever)
    trained = saved.get("retrieval") or {"corpus": saved.get("index"), "index_hash": saved.get("index_hash")}
    for key, what in (("tokenizer", "tokenizer"), ("chunk_size", "chunk size"),
                      ("neighbour_length", "neighbour length")):
        if key in trained and trained[key] != here[key] and (key != "chunk_size" or saved.get("model") == "retro"):
            raise RunMismatchError(f"{where} was trained on neighbours of {what} {trained[key]}; the index given, "
                                   f"{here['corpus']}, has {here[key]}, so the checkpoint cannot read its neighbours. "
                                   f"Build the index with the run's {what}, or retrain")
    return {"trained_on": trained.get("corpus"), "evaluated_on": here["corpus"],
            "same_corpus": trained.get("index_hash") == here["index_hash"]}
