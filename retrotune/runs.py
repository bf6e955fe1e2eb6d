"""Stage 4, training: an assembled model + its training data -> trained weights in `output_dir/final/`
({retro/, adapter/, run.json, manifest.json}) and metrics (metrics.jsonl, CSV, TensorBoard, a PNG).

`final/` is sealed like a checkpoint (the size and checksum of each file in `manifest.json`, written last) and
checked with `verify_final` wherever a run is read back: evaluated, or used as `init_from`.

Two stages of training: the retro-fit (RETRO's added layers on corpus sequences of the index, built here) and
fine-tuning (the PEFT method on a task's records with neighbours, through the QA contract, loss on the answer).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval.integrity import files_under, seal_directory, verify_sealed
from retro import reusing_neighbours
from retro.qa import labelled_loss
from retrotune.config import RunConfig
from retrotune.controls import control_records, donors
from retrotune.metrics import score_task
from retrotune.trainer import fit

FINAL = "final"
IGNORE = -100


def forward_keys(model_kind: str) -> tuple[str, ...]:
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    return keys + ("neighbours",) if model_kind == "retro" else keys


def make_loss(model_kind: str):
    """Loss through the module the loop holds (the DDP wrapper under torchrun), so gradients are synchronised."""
    keys = forward_keys(model_kind)

    def loss(model, batch):
        return labelled_loss(model, {k: batch[k] for k in keys if k in batch})

    return loss


# ---- retro-fit data: corpus sequences of whole chunks from one document, with their precomputed neighbours ----

def corpus_sequences(retriever, sequence_chunks: int, k: int, validation_fraction: float, seed: int = 0,
                     self_neighbour_rate: float = 0.0, exclude_groups=()):
    """Cut every document into runs of up to `sequence_chunks` chunks; each chunk's neighbours come from other
    documents (RETRO's rule). Whole documents are held out for validation. Returns (train, validation) lists of
    {"tokens": (n*m,) with -1 padding, "neighbours": (n, K, R)}.

    `self_neighbour_rate`: the share of chunks whose first neighbour is the chunk itself with its continuation, as a
    duplicate of the document in the database would give. Neighbours from other documents of a small corpus carry
    topic but almost nothing the next chunk needs, so a retro-fit on them alone learns to ignore its neighbours;
    a neighbour that holds the continuation is what teaches CCA to read. The leak is explicit and seeded, and the
    same share applies to the validation documents.

    `exclude_groups`: documents of these groups (title, or the id's part before '#') give no sequence at all, so an
    evaluation's articles are never trained on; they stay in the database and may be neighbours."""
    db = retriever.db
    doc = np.asarray(db.doc)
    excluded = {i for i, (doc_id, title) in enumerate(zip(db.doc_ids, db.titles))
                if title in exclude_groups or str(doc_id).split("#")[0] in exclude_groups} if exclude_groups else set()
    neighbours = _chunk_neighbours(retriever, k)
    rng = np.random.default_rng(seed)
    if self_neighbour_rate > 0:
        chosen = np.flatnonzero(rng.random(len(doc)) < self_neighbour_rate)
        neighbours[chosen, 0] = db.neighbour_tokens(chosen)
    documents = np.array([d for d in np.unique(doc) if d not in excluded])
    held = set(rng.choice(documents, size=max(1, round(validation_fraction * len(documents))), replace=False).tolist())
    train, validation = [], []
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    ends = np.r_[starts[1:], len(doc)]
    for start, end in zip(starts, ends):
        if int(doc[start]) in excluded:
            continue
        for lo in range(start, end, sequence_chunks):
            hi = min(end, lo + sequence_chunks)
            item = {"tokens": np.asarray(db.tokens[lo:hi], np.int64).reshape(-1), "neighbours": neighbours[lo:hi]}
            (validation if int(doc[start]) in held else train).append(item)
    return train, validation


def _chunk_neighbours(retriever, k: int, batch: int = 512) -> np.ndarray:
    out = np.full((len(retriever.db), k, retriever.neighbour_length), -1, np.int64)
    for lo in tqdm(range(0, len(out), batch), desc="chunk neighbours", unit="batch"):
        ids = np.arange(lo, min(len(out), lo + batch))
        out[lo:lo + len(ids)] = retriever.chunk_neighbours(ids, k).tokens
    return out


def collate_sequences(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad corpus sequences; -1 tokens (a document's short last chunk) are padding too."""
    T = max(len(item["tokens"]) for item in items)
    L = max(len(item["neighbours"]) for item in items)
    K, R = items[0]["neighbours"].shape[1:]
    tokens = torch.full((len(items), T), -1, dtype=torch.long)
    neighbours = torch.full((len(items), L, K, R), -1, dtype=torch.long)
    for b, item in enumerate(items):
        tokens[b, :len(item["tokens"])] = torch.as_tensor(item["tokens"])
        neighbours[b, :len(item["neighbours"])] = torch.as_tensor(item["neighbours"])
    mask = (tokens >= 0).long()
    ids = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_token_id))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "labels": torch.where(mask.bool(), tokens, torch.full_like(tokens, IGNORE)), "neighbours": neighbours}


@torch.no_grad()
def mean_loss(model, batches, keys, drop_neighbours: bool = False) -> float:
    """Token-weighted mean loss; `drop_neighbours` marks every neighbour missing (RETRO then equals its base)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        inputs = {k: batch[k].to(device) for k in keys if k in batch}
        if drop_neighbours:
            inputs["neighbours"] = torch.full_like(inputs["neighbours"], -1)
        tokens = int((inputs["labels"][:, 1:] != IGNORE).sum())
        total += float(labelled_loss(model, inputs)) * tokens
        count += tokens
    return total / max(count, 1)


def shuffled_sequences(items: list[dict]) -> list[dict]:
    """Retro-fit sequences with another sequence's neighbours (cut or -1 padded to this one's chunk count)."""
    donor = donors([str(i) for i in range(len(items))])
    out = []
    for item, d in zip(items, donor):
        theirs, L = items[d]["neighbours"], len(item["neighbours"])
        pad = np.full((max(0, L - len(theirs)),) + theirs.shape[1:], -1, theirs.dtype)
        out.append({**item, "neighbours": np.concatenate([theirs[:L], pad])})
    return out


# ---- training ----

def _spread(items: list, limit: int | None) -> list:
    """At most `limit` items taken evenly across the list, so every article of a validation split keeps a share."""
    if limit is None or limit >= len(items):
        return items
    if limit == 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def train(config: RunConfig, model, tokenizer, retriever, identity: dict, qa=None, train_set=None, val_set=None,
          output_dir: Path | None = None) -> dict:
    """Train the model a cell assembled and write `output_dir/final/`; returns the summary stored in
    `final/run.json`. The retro-fit trains on corpus sequences of the index; fine-tuning on the task records
    `train_set` through the QA contract `qa`, validating on `val_set` (loss with true and shuffled neighbours, and
    EM/F1 of a few generated answers)."""
    from peft_methods import count_trainable, save_peft
    from retro.checkpoint import save_retro

    output_dir = Path(output_dir or config.output_dir)
    keys = forward_keys(config.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = config.train.batch_size

    if config.stage == "retrofit":
        train_set, val_set = corpus_sequences(retriever, config.data.sequence_chunks, config.neighbours,
                                              config.data.validation_fraction, config.train.seed,
                                              config.data.self_neighbour_rate,
                                              set(config.data.exclude_groups or ()))
        collate = lambda items: collate_sequences(items, pad)  # noqa: E731
        val_batches = [collate(val_set[i:i + bs]) for i in range(0, len(val_set), bs)]

        shuffled_batches = [collate(part[i:i + bs]) for part in [shuffled_sequences(val_set)]
                            for i in range(0, len(part), bs)]

        def validate(m):
            # a model that reads its neighbours has val_loss well below val_loss_shuffled; val_loss_base is the base
            with reusing_neighbours(m):  # the shuffled batches read the same neighbours
                return {"val_loss": mean_loss(m, val_batches, keys),
                        "val_loss_shuffled": mean_loss(m, shuffled_batches, keys),
                        "val_loss_base": mean_loss(m, val_batches, keys, drop_neighbours=True)}
    else:
        collate = qa.encode_batch
        val_set = _spread(val_set, config.data.validation_loss_size)
        val_batches = [collate(val_set[i:i + bs]) for i in range(0, len(val_set), bs)]
        shuffled_set = control_records(val_set, "shuffled")
        shuffled_batches = [collate(shuffled_set[i:i + bs]) for i in range(0, len(shuffled_set), bs)]
        generated = [r for r in val_set if not r.get("options")][:config.data.validation_generate]

        def validate(m):
            with reusing_neighbours(m):
                row = {"val_loss": mean_loss(m, val_batches, keys),
                       "val_loss_shuffled": mean_loss(m, shuffled_batches, keys)}
            if generated:
                predictions = []
                for lo in range(0, len(generated), bs):
                    predictions += qa.generate(qa.encode_batch([{k: v for k, v in r.items() if k != "answer"}
                                                                for r in generated[lo:lo + bs]]),
                                               max_new_tokens=config.generation_length)
                golds = [r["answers"] for r in generated]
                scores = score_task(("em", "f1"), predictions, golds)
                row.update(val_em=scores["em"], val_f1=scores["f1"])
            return row

        if not val_batches:
            validate = None  # validation_loss_size 0: no validation during training
    run_config = {**config.to_dict(), **{key: identity[key] for key in ("index_hash",)}}
    retro_model = next((m for m in model.modules() if hasattr(m, "retro_parameter_groups")), None)
    named_groups = retro_model.retro_parameter_groups() if retro_model is not None else None
    result = fit(model, train_set, collate, make_loss(config.model), config.train, output_dir, run_config,
                 validate=validate, named_groups=named_groups)
    if config.stage == "retrofit":
        retro = sum(p.numel() for p in model.retro_parameters())
        counts = {"retro": retro, "trainable": retro, "total": sum(p.numel() for p in model.parameters())}
    else:
        counts = count_trainable(model)
    summary = {"identity": identity, "config": config.to_dict(), "trainable_parameters": counts,
               "train_seconds": result.seconds, "steps": result.steps, "stopped_early": result.stopped_early,
               "last": result.history[-1] if result.history else {}}
    if int(os.environ.get("RANK", "0")) == 0:
        _write_final(output_dir, model, config, summary, save_retro, save_peft)
    return summary


def _write_final(output_dir: Path, model, config: RunConfig, summary: dict, save_retro, save_peft) -> None:
    """`final/` appears complete or not at all: written in a staging folder, then renamed."""
    staging = Path(tempfile.mkdtemp(prefix=".final-", dir=output_dir))
    try:
        if config.stage == "finetune":
            from retrotune.models import hub_id

            save_peft(model, staging / "adapter", base_model=hub_id(config.decoder))
            if config.model == "retro":
                shutil.copytree(output_dir / "retro-init", staging / "retro")
        else:
            save_retro(model, staging / "retro")
        (staging / "run.json").write_text(json.dumps(summary, indent=2, default=str))
        seal_directory(staging, "run", files_under(staging))  # last
        target = output_dir / FINAL
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_final(run_dir: str | Path, what: str = "run") -> Path:
    """`run_dir/final/`, checked against its manifest (sizes and checksums); FileNotFoundError when the run has not
    finished, IntegrityError naming the file when it is damaged or unsealed. Returns the folder."""
    final = Path(run_dir) / FINAL
    if not (final / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished {what} (no {FINAL}/run.json); train it first, or resume "
                                f"it with the same train.py command")
    verify_sealed(final, "run", f"delete {final} and rerun the run's train.py command: it writes {FINAL}/ again "
                                f"from the last checkpoint")
    return final
