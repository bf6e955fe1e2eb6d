"""Corpus readers: JSONL, BEIR `corpus.jsonl`, a folder of `.txt` files or a Hugging Face dataset -> `Document`s.

Every reader validates as it goes and fails with a `CorpusError` that names the file, the line and the field, so a
user with a 10 GB corpus learns about line 7,341 before any embedding time is spent.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

CORPUS_FORMATS = ("auto", "jsonl", "beir", "txt", "hf")


class CorpusError(ValueError):
    """A corpus that cannot be read as given; the message says where and what to change."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass
class CorpusSpec:
    """Where a corpus lives and how to read it (the CLI's `--corpus/--format/--*-field` flags)."""

    path: str  # a JSONL file, BEIR folder, folder of .txt files or Hugging Face dataset id
    format: str = "auto"  # auto | jsonl | beir | txt | hf
    id_field: str = "id"  # the document id's field
    title_field: str | None = "title"  # the title's field; None: no titles
    text_field: str = "text"  # the text's field
    hf_split: str = "train"  # the split read from a Hugging Face dataset

    def __post_init__(self):
        if self.format not in CORPUS_FORMATS:
            raise CorpusError(f"unknown corpus format {self.format!r}; choose one of {CORPUS_FORMATS}")
        if not self.text_field:
            raise CorpusError("text_field is empty; name the field that holds each document's text")


BEIR_HINT = ("a BEIR corpus.jsonl names its fields '_id', 'title' and 'text' (--id-field and --text-field do not "
             "apply to it); fix the file, or read it as plain JSONL with --format jsonl and --id-field/--text-field")


def _validated(records: Iterable[tuple[str, dict]], where: str, id_field: str | None, title_field: str | None,
               text_field: str, beir: bool = False) -> Iterator[Document]:
    """Turn (location, record) pairs into Documents, refusing missing fields and duplicate ids. `beir`: the
    fields are BEIR's fixed ones, so a missing one is not fixed with a flag."""
    seen: dict[str, str] = {}
    for loc, rec in records:
        if not isinstance(rec, dict):
            raise CorpusError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
        if text_field not in rec:
            raise CorpusError(f"{loc}: field {text_field!r} is missing (fields present: {sorted(rec)}); "
                              + (BEIR_HINT if beir else "pass --text-field to name the text field"))
        text = rec[text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{loc}: field {text_field!r} must be a string, got {type(text).__name__}")
        if id_field is None:
            doc_id = loc
        elif id_field not in rec:
            raise CorpusError(f"{loc}: field {id_field!r} is missing (fields present: {sorted(rec)}); "
                              + (BEIR_HINT if beir else "pass --id-field to name the document id field"))
        else:
            doc_id = str(rec[id_field])
        if doc_id in seen:
            raise CorpusError(f"{loc}: duplicate document id {doc_id!r} (first seen at {seen[doc_id]}); "
                              f"document ids must be unique in {where}")
        seen[doc_id] = loc
        title = rec.get(title_field) if title_field else None
        yield Document(doc_id, str(title) if title is not None else "", text)


def utf8_error(where: str, data: bytes, error: UnicodeDecodeError) -> CorpusError:
    """A CorpusError naming the line and column of the first byte that is not UTF-8."""
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return CorpusError(f"{where}:{line}: byte 0x{data[error.start]:02x} at column {column} is not UTF-8 ("
                       f"{error.reason}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > NEW")


def read_utf8(path: Path) -> str:
    """A whole text file, or a CorpusError naming the line of its first invalid byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(str(path), data, e) from None


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                err = utf8_error(str(path), raw, e)
                raise CorpusError(str(err).replace(f"{path}:1:", f"{path}:{lineno}:", 1)) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: malformed JSON ({e.msg} at {json_column(line, e)}); "
                                  f"fix or remove this line") from None
            yield f"{path}:{lineno}", rec


def json_column(line: str, error: json.JSONDecodeError) -> str:
    """Where on its line a JSONL record stops parsing: "column N", or "the end of the line (column N)" when the
    record is cut short (the parser then points past the newline, at a line that does not exist)."""
    end = len(line.rstrip("\r\n"))
    column = min(error.pos, end) + 1
    return f"the end of the line (column {column})" if error.pos >= end else f"column {column}"


def read_jsonl(path: str | Path, id_field: str | None = "id", title_field: str | None = "title",
               text_field: str = "text", beir: bool = False) -> list[Document]:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    docs = _validated(jsonl_records(path), str(path), id_field, title_field, text_field, beir)
    return _non_empty(list(docs), path)


def read_beir(path: str | Path) -> list[Document]:
    """A BEIR corpus: a folder holding `corpus.jsonl` (or that file itself) with `_id`, `title`, `text`."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    return read_jsonl(path, id_field="_id", title_field="title", text_field="text", beir=True)


def read_txt_folder(path: str | Path) -> list[Document]:
    """Every `*.txt` below `path` is one document; its id is the relative path and its title the file stem."""
    root = Path(path)
    files = sorted(root.rglob("*.txt"))
    docs = [Document(str(f.relative_to(root)), f.stem, read_utf8(f)) for f in files]
    return _non_empty(docs, root)


def read_hf_dataset(path: str, split: str = "train", id_field: str | None = "id", title_field: str | None = "title",
                    text_field: str = "text") -> list[Document]:
    """A dataset saved with `save_to_disk`, a local data file/folder, or a hub name when a hub is reachable."""
    import datasets

    p = Path(path)
    if p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CorpusError(f"{path}: split {split!r} not found (splits: {list(ds)}); pass --hf-split")
            ds = ds[split]
    elif p.is_file():
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
        if builder is None:
            raise CorpusError(f"{path}: cannot tell the data format from suffix {p.suffix!r}")
        ds = datasets.load_dataset(builder, data_files=str(p), split=split)
    else:
        ds = datasets.load_dataset(path, split=split)
    records = ((f"{path}[{split}] row {i}", rec) for i, rec in enumerate(ds))
    return _non_empty(list(_validated(records, path, id_field, title_field, text_field)), path)


def _non_empty(docs: list[Document], where) -> list[Document]:
    if not docs:
        raise CorpusError(f"{where}: the corpus is empty (no documents found); check the path and format")
    return docs


def load_corpus(spec: CorpusSpec) -> list[Document]:
    """Read the corpus `spec` describes; `auto` picks BEIR for a folder with corpus.jsonl, txt for other folders,
    jsonl for `.jsonl` files and a Hugging Face dataset otherwise."""
    path, fmt = Path(spec.path), spec.format
    if fmt == "auto":
        if path.is_dir():
            saved = any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json"))
            fmt = "beir" if (path / "corpus.jsonl").exists() else ("hf" if saved else "txt")
        elif path.suffix == ".jsonl":
            fmt = "beir" if path.name == "corpus.jsonl" else "jsonl"
        else:
            fmt = "hf"
    if fmt == "beir":
        return read_beir(path)
    if fmt == "jsonl":
        return read_jsonl(path, spec.id_field, spec.title_field, spec.text_field)
    if fmt == "txt":
        if not path.is_dir():
            raise CorpusError(f"{path}: format 'txt' expects a folder of .txt files")
        return read_txt_folder(path)
    return read_hf_dataset(spec.path, spec.hf_split, spec.id_field, spec.title_field, spec.text_field)


def corpus_hash(docs: Iterable[Document]) -> str:
    """A content hash of the corpus (ids, titles and texts, in order): two builds of one corpus agree on it."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.id, d.title, d.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()
