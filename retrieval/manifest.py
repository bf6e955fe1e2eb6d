"""Manifests and fingerprints: what an index directory was built from, written atomically and checked on load.

A directory is an index only once `manifest.json` exists; it is written last, through a temporary file and
`os.replace`, so an interrupted build never looks complete. It records the size and checksum of every file of the
directory (`files`, see integrity.py) and a checksum of its own content (`checksum`), so a damaged file or an
edited manifest is reported when the directory is opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

from .integrity import MANIFEST, IntegrityError, record_files, seal, seal_intact

FORMAT_VERSION = 1
LEXICAL_DIR = "bm25"  # the optional BM25 index inside an index directory (lexical.py)


class RetrievalIndexError(RuntimeError):
    """Base of the index errors below."""


class IncompleteIndexError(RetrievalIndexError):
    """The directory holds no valid manifest: a build never finished there (or it is not an index)."""


class IndexMismatchError(RetrievalIndexError):
    """The index was built with another tokenizer, chunk size or embedder than the caller asked for."""


class IndexCorruptError(RetrievalIndexError):
    """A file of the directory, or the manifest itself, differs from what the build wrote."""


def write_manifest(directory: str | Path, manifest: dict, files: list[str]) -> dict:
    """Record `files` (relative to `directory`) and the manifest's own checksum, then write it atomically (last)."""
    manifest = seal({**manifest, "files": record_files(directory, files)})
    write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


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
        raise IndexCorruptError(f"{path}: unreadable manifest ({e.msg}); {remedy(directory, kind)}") from None
    except UnicodeDecodeError:
        raise IndexCorruptError(f"{path}: the manifest is not UTF-8 text; {remedy(directory, kind)}") from None
    if not isinstance(manifest, dict):
        raise IndexCorruptError(f"{path}: the manifest is not a JSON object; {remedy(directory, kind)}")
    if seal_intact(manifest) is False:  # None: no seal (older manifest) or sealed with xxh3 and no xxhash here
        raise IndexCorruptError(f"{path}: the manifest was edited after the build (its checksum no longer "
                                    f"matches its content); {remedy(directory, kind)}")
    if manifest.get("kind") != kind or manifest.get("format_version") != FORMAT_VERSION:
        raise IncompleteIndexError(f"{path}: expected a {kind} manifest of format version {FORMAT_VERSION}, found "
                                   f"kind={manifest.get('kind')!r} version={manifest.get('format_version')!r}; "
                                   f"rebuild it with this version of the code")
    return manifest


def build_command(corpus: str | Path | None, out: str | Path) -> str:
    """The `python -m retrieval build` command line for `corpus` (CORPUS when unknown) into `out`, shell-quoted."""
    corpus = shlex.quote(str(corpus)) if corpus else "CORPUS"
    return f"python -m retrieval build --corpus {corpus} --out {shlex.quote(str(out))}"


def lexical_command(index_dir: str | Path) -> str:
    """The command line that rebuilds the BM25 index (bm25/) of a finished index, shell-quoted."""
    return f"python -m retrieval lexical --index {shlex.quote(str(index_dir))} --overwrite"


def remedy(directory: str | Path, kind: str = "index", manifest: dict | None = None) -> str:
    """What to run when a directory of `kind` is damaged."""
    if kind == "bm25":  # `directory` is the index's bm25/
        return (f"rebuild the BM25 index: {lexical_command(Path(directory).parent)} (with the --k1, --b and "
                f"--no-title of the original; dense search does not read it)")
    if kind != "index":
        return f"delete {directory} and compute it again (it is recomputed when missing)"
    return (f"rebuild the index: {build_command((manifest or {}).get('corpus'), directory)} --overwrite "
            f"(with the flags of the original build)")


def verify_directory(directory: str | Path, manifest: dict, checksums="auto", kind: str = "index",
                     retriever: str | None = None) -> None:
    """Check every file the manifest lists (sizes always, checksums per `checksums`, see integrity.verify_files).
    For an index, `retriever` ("dense", "bm25", "hybrid"; None: all) says which parts are read: the BM25 index in
    bm25/ is checked only for "bm25", "hybrid" and None, against its own manifest when that records its files, and
    a damaged one names the command that rebuilds just it."""
    files = manifest.get("files")
    if files is None:
        import warnings

        warnings.warn(f"{Path(directory) / MANIFEST} records no file sizes or checksums (written before integrity "
                      f"checks existed), so damaged files cannot be detected; {remedy(directory, kind, manifest)} "
                      f"to add them", stacklevel=2)
        return
    from .integrity import verify_files

    lexical = {n for n in files if n.startswith(f"{LEXICAL_DIR}/")} if kind == "index" else set()
    try:
        verify_files(directory, files, remedy(directory, kind, manifest), checksums,
                     only=[n for n in files if n not in lexical])
        bm25 = Path(directory) / LEXICAL_DIR
        if kind == "index" and retriever != "dense" and (lexical or (bm25 / MANIFEST).is_file()):
            own = read_manifest(bm25, kind="bm25").get("files") if (bm25 / MANIFEST).is_file() else None
            if own is not None:  # rewritten by `python -m retrieval lexical`, so newer than the index's record
                verify_files(bm25, own, remedy(bm25, "bm25"), checksums)
            elif lexical:
                verify_files(directory, files, remedy(bm25, "bm25"), checksums, only=lexical)
    except IntegrityError as e:
        raise IndexCorruptError(str(e)) from None


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
