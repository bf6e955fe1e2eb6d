"""Encoders: texts -> vectors for the two sides of dense retrieval.

One sentence-transformers model for queries and documents (MiniLM, E5, BGE), or two (DPR, Dragon+: a query
encoder and a passage encoder). Each side has a prompt prepended to its texts ("query: " / "passage: " for E5,
BGE's "Represent this sentence for searching relevant passages: " for queries); unless given, the prompts are the
model's own (`prompts` in its config_sentence_transformers.json, keys "query" and "document"/"passage"/"corpus").
Pooling and normalisation are the model's own (its Pooling and Normalize modules); `set_pooling` replaces the
pooling of a model shipped without a sentence-transformers config (DPR pools the [CLS] token).

`Encoding` is what an index records of this in its manifest, so that queries are later encoded the same way and a
search with another query encoder, prompt or pooling is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

DOCUMENT_PROMPT_KEYS = ("document", "passage", "corpus", "doc")


@dataclass
class Encoding:
    query_prompt: str = ""
    document_prompt: str = ""
    normalize: bool = True  # L2-normalise both sides (inner product = cosine); False for dot-product models
    query_pooling: str | None = None  # recorded from the models, checked on load
    document_pooling: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Encoding":
        """Indexes built before encodings were recorded: no prompts, normalised vectors."""
        return cls(**manifest.get("encoding", {}))


def _modules(model):
    return list(getattr(model, "_modules", {}).values())


def pooling_mode(model) -> str | None:
    for m in _modules(model):
        if type(m).__name__ == "Pooling":
            return str(m.get_config_dict().get("pooling_mode"))
    return None


def model_normalises(model) -> bool:
    return any(type(m).__name__ == "Normalize" for m in _modules(model))


def model_prompts(model) -> tuple[str, str]:
    """(query prompt, document prompt) from the model's own sentence-transformers config ('' when absent)."""
    prompts = getattr(model, "prompts", None) or {}
    doc = next((prompts[k] for k in DOCUMENT_PROMPT_KEYS if prompts.get(k)), "")
    return prompts.get("query") or "", doc


def set_pooling(model, mode: str):
    """Replace the model's pooling (e.g. 'cls' for DPR); returns the model."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    if mode not in Pooling.POOLING_MODES:
        raise ValueError(f"pooling {mode!r} is unknown; choose one of {Pooling.POOLING_MODES}")
    for name, m in model._modules.items():
        if type(m).__name__ == "Pooling":
            model._modules[name] = Pooling(m.get_config_dict()["embedding_dimension"], pooling_mode=mode)
            return model
    raise ValueError(f"{type(model).__name__} has no Pooling module to replace")


def resolve_encoding(document_model, query_model=None, *, query_prompt: str | None = None,
                     document_prompt: str | None = None, normalize: bool | None = None) -> Encoding:
    """The encoding of an index built with `document_model` (and `query_model` for queries, default the same):
    prompts and normalisation given here, or else the models' own."""
    query_model = query_model if query_model is not None else document_model
    own_query = model_prompts(query_model)[0]
    own_doc = model_prompts(document_model)[1]
    if normalize is None:
        normalize = model_normalises(document_model)
    return Encoding(query_prompt=own_query if query_prompt is None else query_prompt,
                    document_prompt=own_doc if document_prompt is None else document_prompt,
                    normalize=bool(normalize), query_pooling=pooling_mode(query_model),
                    document_pooling=pooling_mode(document_model))


def encode(model, texts: Sequence[str], *, prompt: str = "", normalize: bool = True, batch_size: int = 64,
           pool=None) -> np.ndarray:
    """(N,) texts -> (N, D) float32; `prompt` is prepended to every text."""
    from .embed import encode_texts

    return encode_texts(model, [prompt + t for t in texts] if prompt else list(texts), batch_size=batch_size,
                        pool=pool, normalize=normalize)


def document_encode_fn(encoding: Encoding):
    """An `encode` callable for `embed_chunk_db` that applies the document prompt and normalisation."""
    def fn(model, texts, batch_size=64, pool=None):
        return encode(model, texts, prompt=encoding.document_prompt, normalize=encoding.normalize,
                      batch_size=batch_size, pool=pool)
    return fn


def is_default(encoding: Encoding, asymmetric: bool) -> bool:
    """True for what every index was before encodings were recorded (one model, no prompts, normalised)."""
    return not asymmetric and not encoding.query_prompt and not encoding.document_prompt and encoding.normalize
