"""Question answering with RETRO and with the GPT baseline behind one contract that train.py and eval.py share.

Takes examples (mappings or objects with `question`, optional `prompt` (a task's template text, asked instead of
'Question: <question>'), optional `answer`, `neighbour_tokens` (K, R) ids -1 padded, `neighbour_texts` list[str]);
gives batches of tensors, a loss, answer log-likelihoods and generated answer strings:

    qa = RetroQA(retro_model, tokenizer)   or   GPTQA(hf_model, tokenizer, num_neighbours=k)
    batch = qa.encode_batch(examples)      # dict of tensors
    qa.loss(batch)                         # mean cross-entropy over answer tokens only
    qa.answer_log_likelihood(batch)        # (B,) summed log-probability of each answer (multiple-choice scoring)
    qa.generate(batch, max_new_tokens)     # list[str], one per example, from the prompt part of the batch

Layout (RETRO's QA fine-tuning): the prompt is left-padded so that it ends on a chunk boundary and the answer starts
a new chunk; every chunk that holds prompt or answer gets the question's neighbours, chunks of pure padding get none.
The GPT baseline uses the same layout with chunk size 1 and the neighbour texts written into the prompt instead.
Legend: B batch, T tokens, L chunks, K neighbours, R neighbour length, m chunk size.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .generate import generate, positions_from_mask

IGNORE = -100


def labelled_loss(model, inputs: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions `inputs["labels"]` scores (-100 elsewhere), as HF computes it
    from `labels`, but with the vocabulary projection only from the first position that predicts a label on: in a
    QA batch the answer is the last few tokens, and projecting every prompt token costs SmolLM2 about 15% of a
    GPT + neighbours training step for logits nobody reads (`benchmarks/bench_study_cell.py`). Sequences scored
    throughout take HF's own path."""
    labels = inputs["labels"]
    scored = (labels[:, 1:] != IGNORE).any(0).nonzero()
    first = int(scored[0]) if len(scored) else 0  # the first position whose next token is scored
    if first == 0:
        return model(**inputs).loss
    kept = labels.shape[1] - first
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=kept).logits
    targets = labels[:, first + 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE)


def _field(example, name: str, default=None):
    if isinstance(example, Mapping):
        return example.get(name, default)
    return getattr(example, name, default)


def qa_layout(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]] | None, chunk_size: int,
              pad_token_id: int, neighbours: Sequence | None = None, num_neighbours: int | None = None,
              neighbour_length: int | None = None) -> dict[str, torch.Tensor]:
    """Batch (prompt, answer, neighbours) triples; `answers=None` builds prompts only (for generation).

    Returns input_ids/attention_mask/position_ids (B, T), labels (B, T) with -100 outside answers (when answers are
    given), neighbours (B, L, K, R) with L = ceil(T / m) (when neighbours are given), and prompt_length (0-d): every
    prompt occupies positions [0, prompt_length), so prompt_length is a multiple of m.
    """
    if not prompts:
        raise ValueError("qa_layout: empty batch")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("qa_layout: a prompt has no tokens; every question must tokenize to at least one token")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"qa_layout: {len(prompts)} prompts but {len(answers)} answers")
    m, B = chunk_size, len(prompts)
    P = max(-(-len(p) // m) * m for p in prompts)
    A = max((len(a) for a in answers), default=0) if answers is not None else 0
    T = P + A
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):P] = torch.as_tensor(list(p))
        mask[b, P - len(p):P] = 1
        if answers is not None and len(answers[b]):
            a = torch.as_tensor(list(answers[b]))
            ids[b, P:P + len(a)], mask[b, P:P + len(a)], labels[b, P:P + len(a)] = a, 1, a
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask),
             "prompt_length": torch.tensor(P)}
    if answers is not None:
        batch["labels"] = labels
    if neighbours is not None:
        if len(neighbours) != B:
            raise ValueError(f"qa_layout: {B} prompts but {len(neighbours)} neighbour arrays")
        nbs = [np.full((0, 0), -1) if n is None else np.asarray(n) for n in neighbours]
        for b, n in enumerate(nbs):
            if n.size and n.ndim != 2:
                raise ValueError(f"qa_layout: example {b}: neighbour_tokens must be (K, R), got shape {n.shape}")
        K = num_neighbours or max((n.shape[0] for n in nbs if n.size), default=1)
        R = neighbour_length or max((n.shape[1] for n in nbs if n.size), default=1)
        L = -(-T // m)
        out = torch.full((B, L, K, R), -1, dtype=torch.long)
        for b, n in enumerate(nbs):
            n = torch.as_tensor(n[:K, :R], dtype=torch.long)
            first = (P - len(prompts[b])) // m  # chunks before this one are pure padding
            if n.numel():
                out[b, first:, :n.shape[0], :n.shape[1]] = n
        batch["neighbours"] = out
    return batch


def format_question(question: str, tokenizer, passages: Sequence[str] | None = None,
                    prompt: str | None = None) -> list[int]:
    """Prompt token ids: the chat template's user turn when the tokenizer has one, else '...\\nAnswer:'. The
    text asked is `prompt` (a task's template, e.g. a question with its options) or else 'Question: <question>'."""
    content = ""
    if passages:
        content = "".join(f"[{i + 1}] {p}\n" for i, p in enumerate(passages)) + "\n"
    content += prompt.strip() if prompt else f"Question: {question.strip()}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(content + "\nAnswer:", add_special_tokens=False)["input_ids"]


def format_answer(answer: str, tokenizer) -> list[int]:
    text = answer.strip() if getattr(tokenizer, "chat_template", None) else " " + answer.strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _equal_shares(lengths: Sequence[int], budget: int) -> list[int]:
    """Split `budget` tokens equally; a passage shorter than its share hands the rest to the longer ones."""
    shares, left = [0] * len(lengths), max(budget, 0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for n, i in enumerate(order):
        shares[i] = min(lengths[i], left // (len(order) - n))
        left -= shares[i]
    return shares


def gpt_prompt(question: str, neighbour_texts: Sequence[str], tokenizer, budget: int,
               prompt: str | None = None) -> list[int]:
    """The GPT baseline's prompt: neighbour passages, then the question, within `budget` tokens.

    Truncation rule: the question (and the template around it) is never truncated; the tokens left in the budget are
    shared equally among the passages, each cut to its share from the end (a shorter passage passes on what it does
    not use). Passages cut to nothing are dropped. A question longer than the budget gets no passages.
    """
    return gpt_prompt_fit(question, neighbour_texts, tokenizer, budget, prompt)[0]


def gpt_prompt_fit(question: str, neighbour_texts: Sequence[str], tokenizer, budget: int,
                   prompt: str | None = None) -> tuple[list[int], bool]:
    """`gpt_prompt`, and whether any neighbour text was cut to fit the budget."""
    texts = [t for t in neighbour_texts if t and t.strip()]
    if not texts:
        return format_question(question, tokenizer, prompt=prompt), False
    overhead = len(format_question(question, tokenizer, ["" for _ in texts], prompt))
    toks = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    room = budget - overhead
    for _ in range(4):  # re-tokenising at passage edges can add a token or two; shrink until it fits
        shares = _equal_shares([len(t) for t in toks], room)
        kept = [tokenizer.decode(t[:s]) for t, s in zip(toks, shares) if s > 0]
        ids = format_question(question, tokenizer, kept, prompt) if kept \
            else format_question(question, tokenizer, prompt=prompt)
        if len(ids) <= budget or not kept:
            return ids, any(s < len(t) for t, s in zip(toks, shares))
        room -= len(ids) - budget
    return format_question(question, tokenizer, prompt=prompt), True


def _decode(tokenizer, tokens: torch.Tensor) -> list[str]:
    out = []
    for row in tokens.tolist():
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def _answers(examples) -> list[str] | None:
    answers = [_field(ex, "answer") for ex in examples]
    if all(a is None for a in answers):
        return None
    if any(a is None for a in answers):
        missing = [i for i, a in enumerate(answers) if a is None]
        raise ValueError(f"examples {missing} have no `answer` while others do; encode answered and unanswered "
                         f"examples in separate batches")
    return answers


def prompt_part(batch: dict, chunk_size: int, device=None) -> dict[str, torch.Tensor]:
    """The generation inputs of a `qa_layout` batch: its prompts (and their chunks' neighbours), answers cut off."""
    P = int(batch["prompt_length"])
    part = {"input_ids": batch["input_ids"][:, :P], "attention_mask": batch["attention_mask"][:, :P]}
    if "neighbours" in batch:
        part["neighbours"] = batch["neighbours"][:, :P // chunk_size]
    return {k: v.to(device) for k, v in part.items()} if device is not None else part


class RetroQA:
    """QA contract for a `RetroModel`, or a module wrapping one (a PEFT method's wrapper); `retrieve` (texts ->
    (N, K, R), or a `Retriever`) enables re-retrieval."""

    def __init__(self, model, tokenizer, retrieve=None, max_prompt_tokens: int | None = None):
        from .model import RetroModel

        self.model, self.tokenizer, self.retrieve = model, tokenizer, retrieve
        self.max_prompt_tokens = max_prompt_tokens
        inner = [m for m in model.modules() if isinstance(m, RetroModel)]
        if not inner:
            raise TypeError(f"RetroQA needs a RetroModel (or a wrapper of one), got {type(model).__name__}")
        self.retro_config = inner[0].config

    def encode_batch(self, examples, tokenizer=None) -> dict[str, torch.Tensor]:
        tok = tokenizer or self.tokenizer
        cfg = self.retro_config
        prompts = [format_question(_field(ex, "question"), tok, prompt=_field(ex, "prompt")) for ex in examples]
        if self.max_prompt_tokens:
            prompts = [p[-self.max_prompt_tokens:] for p in prompts]
        answers = _answers(examples)
        return qa_layout(prompts, None if answers is None else [format_answer(a, tok) for a in answers],
                         cfg.chunk_size, _pad_id(tok), [_field(ex, "neighbour_tokens") for ex in examples],
                         cfg.num_neighbours, cfg.neighbour_length)

    def loss(self, batch: dict) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("RetroQA.loss: the batch has no labels; encode examples that carry an `answer`")
        dev = self.model.get_input_embeddings().weight.device
        keys = ("input_ids", "attention_mask", "position_ids", "neighbours", "labels")
        return labelled_loss(self.model, {k: batch[k].to(dev) for k in keys})

    def answer_log_likelihood(self, batch: dict) -> torch.Tensor:
        return _answer_log_likelihood(self.model, batch, ("input_ids", "attention_mask", "position_ids",
                                                          "neighbours"))

    def generate(self, batch: dict, max_new_tokens: int = 32, **kwargs) -> list[str]:
        return _answer(self.model, self.tokenizer, batch, self.retro_config.chunk_size, max_new_tokens,
                       retrieve=self.retrieve, **kwargs)


class GPTQA:
    """QA contract for a plain HF causal LM with the first `num_neighbours` neighbour texts written into the prompt."""

    def __init__(self, model, tokenizer, num_neighbours: int = 2, budget: int = 1024):
        if num_neighbours < 0 or budget < 1:
            raise ValueError(f"GPTQA: num_neighbours must be >= 0 and budget >= 1, got {num_neighbours}, {budget}")
        self.model, self.tokenizer = model, tokenizer
        self.num_neighbours, self.budget = num_neighbours, budget
        self.neighbours_cut = 0  # examples encoded so far whose neighbour text did not fit the budget whole

    def _texts(self, example) -> list[str]:
        return list(_field(example, "neighbour_texts") or [])[:self.num_neighbours]

    def encode_batch(self, examples, tokenizer=None) -> dict[str, torch.Tensor]:
        tok = tokenizer or self.tokenizer
        fitted = [gpt_prompt_fit(_field(ex, "question"), self._texts(ex), tok, self.budget, _field(ex, "prompt"))
                  for ex in examples]
        prompts = [ids for ids, _ in fitted]
        self.neighbours_cut += sum(cut for _, cut in fitted)
        answers = _answers(examples)
        return qa_layout(prompts, None if answers is None else [format_answer(a, tok) for a in answers], 1,
                         _pad_id(tok))

    def loss(self, batch: dict) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("GPTQA.loss: the batch has no labels; encode examples that carry an `answer`")
        dev = self.model.get_input_embeddings().weight.device
        keys = ("input_ids", "attention_mask", "position_ids", "labels")
        return labelled_loss(self.model, {k: batch[k].to(dev) for k in keys})

    def answer_log_likelihood(self, batch: dict) -> torch.Tensor:
        return _answer_log_likelihood(self.model, batch, ("input_ids", "attention_mask", "position_ids"))

    def generate(self, batch: dict, max_new_tokens: int = 32, **kwargs) -> list[str]:
        return _answer(self.model, self.tokenizer, batch, 1, max_new_tokens, **kwargs)


def _answer(model, tokenizer, batch: dict, chunk_size: int, max_new_tokens: int, **kwargs) -> list[str]:
    """Decode answers from the prompt part of `batch` in eval mode, restoring the model's mode afterwards."""
    dev = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        new = generate(model, **prompt_part(batch, chunk_size, dev), max_new_tokens=max_new_tokens,
                       tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
                       **kwargs)
    finally:
        model.train(was_training)
    return _decode(tokenizer, new)


@torch.no_grad()
def _answer_log_likelihood(model, batch: dict, keys: tuple[str, ...]) -> torch.Tensor:
    """(B,) summed log-probability of each example's answer tokens (its labels) given its prompt: how a multiple-
    choice option is scored."""
    if "labels" not in batch:
        raise ValueError("answer_log_likelihood: the batch has no labels; encode examples that carry an `answer`")
    dev = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        logits = model(**{k: batch[k].to(dev) for k in keys}).logits.float()  # (B, T, V)
    finally:
        model.train(was_training)
    labels = batch["labels"].to(dev)[:, 1:]  # (B, T-1): token t+1 is predicted at t
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * (labels != IGNORE)).sum(-1).cpu()


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
