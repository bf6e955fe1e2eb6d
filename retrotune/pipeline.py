"""Composition of the stages for one run: a `RunConfig` -> backbone, index, neighbours, RETRO or GPT + PEFT method.

Both models get the same neighbours: one search per question, stored once per run (`neighbours/`), whose chunk
ids give RETRO its tokens and the GPT baseline the text of exactly the same chunks and continuations.
Legend: N examples, K neighbours, R neighbour length (2m), m chunk size.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retrotune.config import RunConfig
from retrotune.models import load_decoder, load_embedder
from retrotune.qa import QAExample


class RunMismatchError(ValueError):
    pass


def open_index(config: RunConfig, tokenizer, embedder=None):
    """The run's index, refused if it was built with another tokenizer (or chunk size, for RETRO)."""
    from retrieval import Retriever, is_index

    if not is_index(config.index):
        raise FileNotFoundError(f"{config.index} is not a finished index (no valid manifest.json). Build it with: "
                                f"python -m retrieval build --corpus data/squad-demo/passages.jsonl "
                                f"--out {config.index}")
    chunk_size = config.retro.get("chunk_size") if config.model == "retro" else None
    if embedder is None and config.retriever != "bm25":
        embedder = load_embedder(config.embedder)
    return Retriever.load(config.index, tokenizer=tokenizer, chunk_size=chunk_size, embedder=embedder,
                          retriever=config.retriever)


def index_hash(retriever) -> str:
    data = (Path(retriever.directory) / "manifest.json").read_bytes()
    how = retriever.describe() if hasattr(retriever, "describe") else {"kind": "dense"}
    if how != {"kind": "dense"}:  # the same index searched another way gives other neighbours
        data += json.dumps(how, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class Neighbours:
    ids: np.ndarray  # (N, K) chunk ids, -1 where missing
    tokens: np.ndarray  # (N, K, R) RETRO's view, -1 padded
    texts: list[list[str]]  # (N, K) the GPT baseline's view of the same chunks


def question_neighbours(retriever, examples: list[QAExample], k: int, cache_dir: Path) -> Neighbours:
    """Top-k chunks for each question (the question is the query), stored under `cache_dir` and reused."""
    from retrieval import IncompleteIndexError, IndexCorruptError, PrecomputedNeighbours, precompute_neighbours

    questions = [e.question for e in examples]
    key = hashlib.sha256(json.dumps([index_hash(retriever), k, questions]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / key
    try:
        store = PrecomputedNeighbours.load(path)
    except (IncompleteIndexError, IndexCorruptError) as error:
        if isinstance(error, IndexCorruptError):  # a cache: say so, and compute it again
            print(f"warning: {error}; recomputing these neighbours", file=sys.stderr)
        store = precompute_neighbours(retriever, questions, path, k, chunked=False)
    return _with_texts(retriever, np.asarray(store.ids), np.asarray(store.tokens))


def _with_texts(retriever, ids: np.ndarray, tokens: np.ndarray) -> Neighbours:
    texts = [[retriever.db.neighbour_text(int(i)) if i >= 0 else "" for i in row] for row in ids]
    return Neighbours(ids=ids, tokens=tokens.astype(np.int64), texts=texts)


def qa_records(examples: list[QAExample], neighbours: Neighbours, with_answers: bool) -> list[dict]:
    """What the QA contract encodes: question, neighbour tokens and texts, and (for training) the first gold answer."""
    return [{"id": e.id, "question": e.question, "answers": list(e.answers), "group": e.group,
             **({"answer": e.answers[0]} if with_answers else {}),
             "neighbour_tokens": neighbours.tokens[i], "neighbour_texts": neighbours.texts[i]}
            for i, e in enumerate(examples)]


def build_backbone(config: RunConfig, device: str | None = None, dtype: torch.dtype = torch.float32):
    return load_decoder(config.decoder, dtype=dtype, device=device, quantise=config.quantise)


def build_model(config: RunConfig, base, retriever, with_peft: bool = True):
    """The model of this run, before training: RETRO (retro-fitted, or loaded from `init_from`) or the GPT base,
    with the run's PEFT method applied for the finetune stage. Returns the model to train or evaluate."""
    from peft_methods import apply_peft
    from retro import RetroConfig, retrofit
    from retro.checkpoint import load_retro

    if config.model == "gpt":
        return apply_peft(base, config.peft) if with_peft else base
    if config.init_from:
        model = load_retro(Path(config.init_from) / "final" / "retro", base, chunk_size=retriever.chunk_size)
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
    return RetroQA(model, tokenizer, retrieve=retriever)


def run_identity(config: RunConfig, retriever, base) -> dict:
    """What a trained run depends on; evaluation refuses a checkpoint whose identity differs from its setting."""
    from retro.checkpoint import base_identity

    return {"decoder": config.decoder, "index": str(config.index), "index_hash": index_hash(retriever),
            "base_model": base_identity(base), "model": config.model, "stage": config.stage,
            "peft": config.peft, "retro": config.retro, "neighbours": config.neighbours}


def check_identity(saved: dict, config_index: str, retriever, base, where: Path) -> None:
    from retro.checkpoint import base_identity

    here = index_hash(retriever)
    if saved["index_hash"] != here:
        raise RunMismatchError(f"{where} was trained with the neighbours of index {saved['index']} (manifest hash "
                               f"{saved['index_hash']}); the index given, {config_index}, has hash {here}. Evaluate "
                               f"it with the index it was trained on, or retrain")
    identity = base_identity(base)
    if saved["base_model"]["embedding_sha256"] != identity["embedding_sha256"]:
        raise RunMismatchError(f"{where} was trained on base model {saved['decoder']!r}; the base model given "
                               f"({identity['name_or_path']!r}) has other weights. Pass --decoder "
                               f"{saved['decoder']}")
