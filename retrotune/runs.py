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
from retrotune.trainer import fit, seed_everything

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

def corpus_sequences(retriever, sequence_chunks: int, k: int, validation_fraction: float, seed: int = 0,
                     self_neighbour_rate: float = 0.0):
    """Cut every document into runs of up to `sequence_chunks` chunks; each chunk's neighbours come from other
    documents (RETRO's rule). Whole documents are held out for validation. Returns (train, validation) lists of
    {"tokens": (n*m,) with -1 padding, "neighbours": (n, K, R)}.

    `self_neighbour_rate`: the share of chunks whose first neighbour is the chunk itself with its continuation, as a
    duplicate of the document in the database would give. Neighbours from other documents of a small corpus carry
    topic but almost nothing the next chunk needs, so a retro-fit on them alone learns to ignore its neighbours;
    a neighbour that holds the continuation is what teaches CCA to read. The leak is explicit and seeded, and the
    same share applies to the validation documents."""
    db = retriever.db
    doc = np.asarray(db.doc)
    neighbours = _chunk_neighbours(retriever, k)
    rng = np.random.default_rng(seed)
    if self_neighbour_rate > 0:
        chosen = np.flatnonzero(rng.random(len(doc)) < self_neighbour_rate)
        neighbours[chosen, 0] = db.neighbour_tokens(chosen)
    documents = np.unique(doc)
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


# ---- retrieval-gain controls: the same questions with another question's neighbours, or with none ----

CONTROLS = ("shuffled", "none")


def donors(groups: list[str]) -> list[int]:
    """For each example, the example whose neighbours it gets in the shuffled control: never itself when there are
    two or more, and from another group (article) wherever the split allows, so the donor's neighbours are unlikely
    to hold this example's answer. Deterministic."""
    n = len(groups)
    order = sorted(range(n), key=lambda i: (groups[i], i))  # grouped, then rolled by half: groups meet others
    shift = max(1, n // 2) if n > 1 else 0
    donor = [0] * n
    for j, i in enumerate(order):
        donor[i] = order[(j + shift) % n]
    return donor


def control_records(records: list[dict], control: str) -> list[dict]:
    """QA records under a control: `shuffled` gives each question the neighbours (tokens and texts alike) of a
    question of another article; `none` gives it no neighbours (RETRO then computes exactly its base model; GPT
    gets the closed-book prompt)."""
    if control == "none":
        return [{**r, "neighbour_tokens": np.full_like(np.asarray(r["neighbour_tokens"]), -1), "neighbour_texts": []}
                for r in records]
    if control != "shuffled":
        raise ValueError(f"unknown control {control!r}; choose from {CONTROLS}")
    donor = donors([str(r.get("group", i)) for i, r in enumerate(records)])
    return [{**r, "neighbour_tokens": records[d]["neighbour_tokens"], "neighbour_texts": records[d]["neighbour_texts"]}
            for r, d in zip(records, donor)]


def shuffled_sequences(items: list[dict]) -> list[dict]:
    """Retro-fit sequences with another sequence's neighbours (cut or -1 padded to this one's chunk count)."""
    donor = donors([str(i) for i in range(len(items))])
    out = []
    for item, d in zip(items, donor):
        theirs, L = items[d]["neighbours"], len(item["neighbours"])
        pad = np.full((max(0, L - len(theirs)),) + theirs.shape[1:], -1, theirs.dtype)
        out.append({**item, "neighbours": np.concatenate([theirs[:L], pad])})
    return out


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


def evaluate_with_controls(qa, records: list[dict], out: Path, batch_size: int = 8, max_new_tokens: int = 16,
                           k: int | None = None, controls=CONTROLS, desc: str = "evaluate") -> dict:
    """Scores with the true neighbours plus, under `controls`, the same questions with shuffled neighbours and with
    none. Each evaluation writes `out/<true|control>/predictions.jsonl` and `scores.json`; a score a previous run
    left is read back, so an interrupted evaluation resumes."""
    def cached(folder: Path, recs: list[dict], label: str) -> dict:
        file = folder / "scores.json"
        if file.is_file():
            return json.loads(file.read_text())
        scores, rows = evaluate_qa(qa, recs, batch_size, max_new_tokens, k, label)
        write_jsonl(folder / "predictions.jsonl", rows)
        file.write_text(json.dumps(scores, indent=2))
        return scores

    scores = dict(cached(out / "true", records, desc))
    scores["controls"] = {c: cached(out / c, control_records(records, c), f"{desc} [{c}]") for c in controls}
    if "shuffled" in scores["controls"]:
        scores["retrieval_gain_f1"] = scores["f1"] - scores["controls"]["shuffled"]["f1"]
    return scores


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
    seed_everything(config.train.seed, config.train.deterministic)  # new layers start from the run's seed
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
                                              config.data.validation_fraction, config.train.seed,
                                              config.data.self_neighbour_rate)
        collate = lambda items: collate_sequences(items, pad)  # noqa: E731
        val_batches = [collate(val_set[i:i + bs]) for i in range(0, len(val_set), bs)]

        shuffled_batches = [collate(part[i:i + bs]) for part in [shuffled_sequences(val_set)]
                            for i in range(0, len(part), bs)]

        def validate(m):
            # a model that reads its neighbours has val_loss well below val_loss_shuffled; val_loss_base is the base
            return {"val_loss": mean_loss(m, val_batches, keys),
                    "val_loss_shuffled": mean_loss(m, shuffled_batches, keys),
                    "val_loss_base": mean_loss(m, val_batches, keys, drop_neighbours=True)}
    else:
        from accelerate import PartialState

        with PartialState().main_process_first():  # under torchrun one process fills the neighbour cache
            train_set, val_set = (with_neighbours(config, retriever, part) for part in qa_split(config))
        qa = pipeline.qa_interface(config, model, tokenizer, retriever)
        collate = qa.encode_batch
        val_batches = [collate(val_set[i:i + bs]) for i in range(0, len(val_set), bs)]
        shuffled_set = control_records(val_set, "shuffled")
        shuffled_batches = [collate(shuffled_set[i:i + bs]) for i in range(0, len(shuffled_set), bs)]

        def validate(m):
            row = {"val_loss": mean_loss(m, val_batches, keys), "val_loss_shuffled": mean_loss(m, shuffled_batches, keys)}
            if config.data.validation_generate:
                scores, _ = evaluate_qa(pipeline.qa_interface(config, m, tokenizer, retriever),
                                        val_set[:config.data.validation_generate], bs, config.max_new_tokens,
                                        config.neighbours, desc="validate")
                row.update(val_em=scores["em"], val_f1=scores["f1"])
            return row

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
