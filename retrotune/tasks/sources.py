"""Where a task's rows come from: local JSONL, JSON or parquet files (one split each, or a folder of splits), or a
Hugging Face dataset by id. Every row travels with `where` (file and line or row, or dataset and row), so an
adapter can name the exact place of a bad record.

A folder holds its splits as `<split>.jsonl`, `<split>.json`, `<split>.parquet`, `<split>-*.parquet` or a
`<split>/` sub-folder of such files (QMSum's release: one JSON file per meeting).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from retrotune.qa import QADataError, jsonl_rows

SUFFIXES = (".jsonl", ".json", ".parquet")
Row = tuple[str, dict]


def is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or path.suffix in SUFFIXES or source.startswith((".", "/", "~")) \
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of `split` in a folder of splits ([] when it has none)."""
    found = [folder / f"{split}{suffix}" for suffix in SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    found += sorted(folder.glob(f"{split}-*.parquet"))
    sub = folder / split
    if sub.is_dir():
        found += sorted(p for p in sub.iterdir() if p.suffix in SUFFIXES)
    return found


def has_split(source: str, split: str) -> bool:
    """Whether the source names its splits (a folder of split files, or a hub dataset) and holds `split`."""
    path = Path(source).expanduser()
    if path.is_dir():
        return bool(split_files(path, split))
    return not is_local(source)


_jsonl = jsonl_rows


def _json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise QADataError(f"{path}: byte offset {error.start} is not UTF-8; convert the file to UTF-8") from None
    except json.JSONDecodeError as error:
        raise QADataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if isinstance(data, list):
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise QADataError(f"{path}, item {i}: a JSON {type(row).__name__}, not an object")
            yield f"{path}, item {i}", row
    elif isinstance(data, dict):
        # one record per file (a QMSum meeting), or the original TriviaQA / Qasper releases: unwrapped by adapters
        yield str(path), {"_file": path.stem, **data}
    else:
        raise QADataError(f"{path}: expected a JSON object or a list of objects, found a {type(data).__name__}")


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file: the user's to fix
        raise QADataError(f"{path}: not a readable parquet file ({str(error).splitlines()[0][:200]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}, row {i}", row


def read_file(path: Path) -> Iterator[Row]:
    reader = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}.get(path.suffix)
    if reader is None:
        raise QADataError(f"{path}: unknown file type {path.suffix!r}; give .jsonl, .json or .parquet")
    yield from reader(path)


def read_rows(source: str, split: str = "train", hub: tuple[str, str | None] | None = None) -> list[Row]:
    """Rows of `split` from a file (the file is the split), a folder of splits, or a hub dataset (`hub`: the
    configuration name to pass with it, e.g. ('tau/scrolls', 'qasper') when `source` is 'tau/scrolls')."""
    path = Path(source).expanduser()
    if path.is_file():
        return list(read_file(path))
    if path.is_dir():
        files = split_files(path, split)
        if not files:
            raise QADataError(f"{path}: no {split!r} split here; expected {split}.jsonl, {split}.json, "
                              f"{split}.parquet or a {split}/ folder of them")
        return [row for file in files for row in read_file(file)]
    if is_local(source):
        raise QADataError(f"{source}: no such file or folder; give a .jsonl/.json/.parquet file, a folder of "
                          f"split files, or a Hugging Face dataset id")
    import datasets

    name = hub[1] if hub and hub[0] == source else None
    try:
        rows = datasets.load_dataset(source, name, split=split)
    except Exception as error:  # noqa: BLE001 - the hub, the network or the name: all the user's to fix
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise QADataError(f"{source}{f' ({name})' if name else ''}[{split}]: not a local file or folder, and "
                          f"loading it as a Hugging Face dataset failed ({first}); check the path, or the dataset "
                          f"name and your connection, or download it and point the task at local files") from None
    return [(f"{source}[{split}] row {i}", dict(row)) for i, row in enumerate(rows)]
