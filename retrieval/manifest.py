"""Manifests and fingerprints: what an index directory was built from, written atomically and checked on load.

A directory is an index only once `manifest.json` exists; it is written last, through a temporary file and
`os.replace`, so an interrupted build never looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class RetrievalIndexError(RuntimeError):
    """Base of the index errors below."""


class IncompleteIndexError(RetrievalIndexError):
    """The directory holds no valid manifest: a build never finished there (or it is not an index)."""


class IndexMismatchError(RetrievalIndexError):
    """The index was built with another tokenizer, chunk size or embedder than the caller asked for."""


def write_json_atomic(path: str | Path, obj: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str | Path, kind: str = "index") -> dict:
    """The manifest of a finished `kind` directory, or IncompleteIndexError saying why there is none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        hint = ("a build was started there but never finished: rerun the same build command to resume it, "
                "or pass --overwrite to start again") if Path(directory).is_dir() and any(Path(directory).iterdir()) \
            else "build one with `python -m retrieval build`"
        raise IncompleteIndexError(f"{directory}: no {MANIFEST}, so this is not a finished {kind}; {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise IncompleteIndexError(f"{path}: unreadable manifest ({e.msg}); rebuild with --overwrite") from None
    if manifest.get("kind") != kind or manifest.get("format_version") != FORMAT_VERSION:
        raise IncompleteIndexError(f"{path}: expected a {kind} manifest of format version {FORMAT_VERSION}, found "
                                   f"kind={manifest.get('kind')!r} version={manifest.get('format_version')!r}; "
                                   f"rebuild it with this version of the code")
    return manifest


def tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): equal fingerprints mean equal token ids for the same text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def embedder_name(embedder) -> str:
    try:
        return str(embedder[0].auto_model.config.name_or_path)
    except (AttributeError, IndexError, TypeError, KeyError):
        return type(embedder).__name__


def embedder_dimension(embedder) -> int:
    getter = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(getter())


def embedder_fingerprint(embedder) -> str:
    """sha256 over every parameter's name, shape and first 1,024 values: cheap, and different weights differ."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in embedder.state_dict().items():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(p.detach().flatten()[:1024].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def check_or_record(path: Path, settings: dict, error: type[Exception], remedy: str) -> None:
    """Record the settings of a build step the first time; later, refuse to continue it with other settings."""
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise error(f"{path.parent} holds unfinished work made with other settings ({', '.join(diff)}); {remedy}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)
