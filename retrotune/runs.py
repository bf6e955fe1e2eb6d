"""One training run end to end, and QA evaluation of a model: what train.py, eval.py and experiments call.

train_run: RunConfig -> trained weights in `output_dir/final/` ({retro/, adapter/, run.json}) + metrics.
evaluate_qa: a QA contract (RETRO or GPT) + examples with neighbours -> EM/F1/ROUGE-L, answer recall@k and
per-example predictions.
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

from retrotune import pipeline
from retrotune.config import RunConfig
from retrotune.metrics import exact_match, f1_score, rouge_l, score_answers
from retrotune.qa import load_qa, split_by_group, take
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
        return model(**{k: batch[k] for k in keys if k in batch}).loss

    return loss


# ---- retro-fit data: corpus sequences of whole chunks from one document, with their precomputed neighbours ----

def corpus_sequences(retriever, sequence_chunks: int, k: int, validation_fraction: float, seed: int = 0):
    """Cut every document into runs of up to `sequence_chunks` chunks; each chunk's neighbours come from other
    documents (RETRO's rule). Whole documents are held out for validation. Returns (train, validation) lists of
    {"tokens": (n*m,) with -1 padding, "neighbours": (n, K, R)}."""
    db = retriever.db
    doc = np.asarray(db.doc)
    neighbours = _chunk_neighbours(retriever, k)
    documents = np.unique(doc)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(documents, size=max(1, round(validation_fraction * len(documents))), replace=False).tolist())
    train, validation = [], []
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    ends = np.r_[starts[1:], len(doc)]
    for start, end in zip(starts, ends):
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
        total += float(model(**inputs).loss) * tokens
        count += tokens
    return total / max(count, 1)


# ---- QA evaluation ----

def evaluate_qa(qa, records: list[dict], batch_size: int = 8, max_new_tokens: int = 16, k: int | None = None,
                desc: str = "evaluate") -> tuple[dict, list[dict]]:
    """Generate an answer for every record and score it; answer recall@k shows whether the retriever found it."""
    from retrieval import has_answer

    predictions = []
    for lo in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        chunk = [{key: value for key, value in r.items() if key != "answer"} for r in records[lo:lo + batch_size]]
        predictions.extend(qa.generate(qa.encode_batch(chunk), max_new_tokens=max_new_tokens))
    golds = [r["answers"] for r in records]
    scores = score_answers(predictions, golds)
    found = [any(has_answer(text, r["answers"]) for text in r["neighbour_texts"][:k]) for r in records]
    scores["answer_recall"] = 100 * sum(found) / len(found)
    scores["n"] = len(records)
    rows = [{"id": r["id"], "question": r["question"], "prediction": p, "answers": r["answers"],
             "em": exact_match(p, r["answers"]), "f1": f1_score(p, r["answers"]), "rouge_l": rouge_l(p, r["answers"]),
             "answer_in_neighbours": hit} for r, p, hit in zip(records, predictions, found)]
    return scores, rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def qa_split(config: RunConfig):
    """(train, validation) QA examples, split by article and cut to the configured data scale."""
    examples = load_qa(config.data.qa)
    split = split_by_group(examples, config.data.validation_groups, config.data.validation_fraction, config.train.seed)
    train = take(split.train, config.data.train_size, config.train.seed)
    validation = take(split.validation, config.data.validation_size, config.train.seed)
    if not train:
        raise ValueError(f"{config.data.qa}: the training split is empty (validation holds "
                         f"{list(split.validation_groups)}); give more articles or fewer validation_groups")
    if not validation:
        raise ValueError(f"{config.data.qa}: the validation split is empty; set data.validation_groups")
    return train, validation


def neighbours_cache(config: RunConfig) -> Path:
    return Path(config.neighbours_cache or Path(config.output_dir) / "neighbours")


def with_neighbours(config: RunConfig, retriever, examples) -> list[dict]:
    neighbours = pipeline.question_neighbours(retriever, examples, config.neighbours, neighbours_cache(config))
    return pipeline.qa_records(examples, neighbours, with_answers=True)


# ---- training ----

def train_run(config: RunConfig, device: str | None = None) -> dict:
    """Train one run and write `output_dir/final/`; returns the summary stored in `final/run.json`."""
    from peft_methods import apply_peft, count_trainable, save_peft
    from retro.checkpoint import save_retro

    output_dir = Path(config.output_dir)
    base, tokenizer = pipeline.build_backbone(config, device=device)
    retriever = pipeline.open_index(config, tokenizer)
    identity = pipeline.run_identity(config, retriever, base)
    model = pipeline.build_model(config, base, retriever, with_peft=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.stage == "finetune":
        if config.model == "retro":  # the RETRO weights the adapter is trained on top of, kept for evaluation
            save_retro(model, output_dir / "retro-init")
        model = apply_peft(model, config.peft)
    keys = forward_keys(config.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = config.train.batch_size

    if config.stage == "retrofit":
        train_set, val_set = corpus_sequences(retriever, config.data.sequence_chunks, config.neighbours,
                                              config.data.validation_fraction, config.train.seed)
        collate = lambda items: collate_sequences(items, pad)  # noqa: E731
        val_batches = [collate(val_set[i:i + bs]) for i in range(0, len(val_set), bs)]

        def validate(m):
            return {"val_loss": mean_loss(m, val_batches, keys),
                    "val_loss_base": mean_loss(m, val_batches, keys, drop_neighbours=True)}
    else:
        from accelerate import PartialState

        with PartialState().main_process_first():  # under torchrun one process fills the neighbour cache
            train_set, val_set = (with_neighbours(config, retriever, part) for part in qa_split(config))
        qa = pipeline.qa_interface(config, model, tokenizer, retriever)
        collate = qa.encode_batch
        val_batches = [collate(val_set[i:i + bs]) for i in range(0, len(val_set), bs)]

        def validate(m):
            row = {"val_loss": mean_loss(m, val_batches, keys)}
            if config.data.validation_generate:
                scores, _ = evaluate_qa(pipeline.qa_interface(config, m, tokenizer, retriever),
                                        val_set[:config.data.validation_generate], bs, config.max_new_tokens,
                                        config.neighbours, desc="validate")
                row.update(val_em=scores["em"], val_f1=scores["f1"])
            return row

    run_config = {**config.to_dict(), **{key: identity[key] for key in ("index_hash",)}}
    result = fit(model, train_set, collate, make_loss(config.model), config.train, output_dir, run_config,
                 validate=validate)
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
        target = output_dir / FINAL
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_trained(run_dir: Path, config_index: str | None = None, decoder: str | None = None,
                 device: str | None = None):
    """Rebuild a trained run for evaluation: (qa contract, run summary, retriever). `config_index` and `decoder`
    replace the run's own; another index or another base model than the run was trained with is refused."""
    from peft_methods import load_peft
    from retro.checkpoint import load_retro

    final = Path(run_dir) / FINAL
    if not (final / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no {FINAL}/run.json); train it first or resume "
                                f"it with the same train.py command")
    summary = json.loads((final / "run.json").read_text())
    replaced = {"index": config_index, "decoder": decoder}
    config = RunConfig(**{**summary["config"], **{k: v for k, v in replaced.items() if v}})
    base, tokenizer = pipeline.build_backbone(config, device=device)
    retriever = pipeline.open_index(config, tokenizer)
    pipeline.check_identity(summary["identity"], config.index, retriever, base, final)
    model = base
    if config.model == "retro":
        model = load_retro(final / "retro", base, chunk_size=retriever.chunk_size)
    if (final / "adapter").is_dir():
        model = load_peft(model, final / "adapter")
    model.eval()
    return pipeline.qa_interface(config, model, tokenizer, retriever), summary, retriever
