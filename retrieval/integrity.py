"""File integrity: sizes and checksums of the files of a directory, recorded when it is written and checked when
it is read, so a truncated, overwritten or edited file is reported instead of silently read.

One implementation for every kind of directory the project writes (indexes, training checkpoints, finished
runs). The checksum is xxh3-128 (`xxhash`) when installed, else sha256; each record names its algorithm, so a
directory written with one is still checked on a machine that only has the other (sha256 is always there; xxh3
records need `xxhash`). The manifest's own checksum is unkeyed: it catches damage and edits by mistake, not a
crafted directory, which is why nothing read from one is unpickled.

Record of a file (relative path -> {"size": bytes, "xxh3_128" or "sha256": hex digest}).

Checking (`verify_files`):
  - sizes: always (a stat per file);
  - checksums: `checksums=True` hashes every file; `"auto"` hashes files up to `AUTO_HASH_BYTES` every time and
    larger ones only when they changed since they were last verified (size, mtime, ctime and inode recorded in
    `STAMPS` beside them), i.e. on their first use after they were written, copied or touched.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Literal

try:
    import xxhash
except ImportError:  # pragma: no cover - sha256 is the fallback
    xxhash = None

BLOCK = 1 << 22  # bytes read at a time
AUTO_HASH_BYTES = 1 << 30  # "auto": files up to this size are hashed at every check
STAMPS = ".verified.json"  # stat of files whose checksum was verified, for "auto"
ALGORITHMS = ("xxh3_128", "sha256")
Checksums = bool | Literal["auto"]


class IntegrityError(RuntimeError):
    """A file does not match its record: missing, of another size or with another checksum."""

    def __init__(self, path: Path | str, problem: str, remedy: str):
        self.path, self.problem, self.remedy = Path(path), problem, remedy
        super().__init__(f"{path}: {problem}; {remedy}")


def default_algorithm() -> str:
    return "xxh3_128" if xxhash is not None else "sha256"


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise ImportError("this record was written with xxh3_128; install xxhash (pip install xxhash) to check it")
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {ALGORITHMS}")


def file_digest(path: str | Path, algorithm: str | None = None) -> str:
    """Hex digest of a file's bytes, read in blocks."""
    h = _hasher(algorithm or default_algorithm())
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def bytes_digest(data: bytes, algorithm: str | None = None) -> str:
    h = _hasher(algorithm or default_algorithm())
    h.update(data)
    return h.hexdigest()


def json_digest(obj: dict, algorithm: str | None = None) -> str:
    """Digest of a JSON object's canonical form (sorted keys, no spaces): the self-check of a manifest."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return bytes_digest(text.encode("utf-8"), algorithm)


def seal(obj: dict) -> dict:
    """`obj` with "checksum": "ALGORITHM:HEX" of its canonical JSON (without that key): a manifest's self-check."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    algorithm = default_algorithm()
    return {**body, "checksum": f"{algorithm}:{json_digest(body, algorithm)}"}


def seal_intact(obj: dict) -> bool | None:
    """Whether a sealed object is unchanged; None when it carries no seal or this machine lacks its algorithm."""
    seal_value = obj.get("checksum")
    if not isinstance(seal_value, str) or ":" not in seal_value:
        return None if seal_value is None else False
    algorithm, digest = seal_value.split(":", 1)
    if algorithm not in ALGORITHMS:
        return False
    if algorithm == "xxh3_128" and xxhash is None:
        return None
    return json_digest({k: v for k, v in obj.items() if k != "checksum"}, algorithm) == digest


def record_file(path: str | Path, algorithm: str | None = None) -> dict:
    algorithm = algorithm or default_algorithm()
    return {"size": os.path.getsize(path), algorithm: file_digest(path, algorithm)}


def record_files(directory: str | Path, names: Iterable[str], algorithm: str | None = None) -> dict[str, dict]:
    """{relative name: record} for `names` under `directory` (POSIX separators)."""
    d = Path(directory)
    return {Path(n).as_posix(): record_file(d / n, algorithm) for n in sorted(names)}


def files_under(directory: str | Path, exclude: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of every regular file below `directory`, except names in `exclude` and dot-files."""
    d = Path(directory)
    skip = set(exclude)
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_file() and rel not in skip and not any(part.startswith(".") for part in Path(rel).parts):
            out.append(rel)
    return out


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamps(directory: Path) -> dict:
    try:
        return json.loads((directory / STAMPS).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamps(directory: Path, stamps: dict) -> None:
    """Best effort (a read-only directory is simply hashed again next time)."""
    tmp = directory / f"{STAMPS}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(stamps, sort_keys=True))
        os.replace(tmp, directory / STAMPS)
    except OSError:
        tmp.unlink(missing_ok=True)


def stamp_verified(directory: str | Path, names: Iterable[str], files: dict[str, dict]) -> None:
    """Record that `names` were just written or verified (their current stat matches their record)."""
    d = Path(directory)
    stamps = _read_stamps(d)
    for name in names:
        st = os.stat(d / name)
        stamps[name] = {"stat": _stat_key(st), "record": files[name]}
    _write_stamps(d, stamps)


def verify_files(directory: str | Path, files: dict[str, dict], remedy: str, checksums: Checksums = "auto",
                 only: Iterable[str] | None = None) -> list[str]:
    """Check files against their records (see the module docstring); raise IntegrityError naming the first file
    that differs, with `remedy`. Returns the names whose checksum was computed."""
    d = Path(directory)
    names = sorted(files) if only is None else [n for n in sorted(set(only)) if n in files]
    stats = {}
    for name in names:  # sizes first: a stat each, and truncation is the common damage
        path = d / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise IntegrityError(path, "missing (the manifest lists it)", remedy) from None
        if st.st_size != files[name]["size"]:
            raise IntegrityError(path, f"{st.st_size:,} bytes, but {files[name]['size']:,} were written "
                                       f"(truncated or replaced)", remedy)
        stats[name] = st
    if checksums is False:
        return []
    stamps = _read_stamps(d) if checksums == "auto" else {}
    hashed = []
    for name in names:
        st, rec = stats[name], files[name]
        if checksums == "auto" and st.st_size > AUTO_HASH_BYTES:
            seen = stamps.get(name)
            if seen and seen.get("stat") == _stat_key(st) and seen.get("record") == rec:
                continue
        algorithm = next((a for a in ALGORITHMS if a in rec), None)
        if algorithm is None:
            raise IntegrityError(d / name, f"its record has no checksum of a known kind ({sorted(rec)})", remedy)
        if algorithm == "xxh3_128" and xxhash is None:
            algorithm = None  # cannot check here; sizes were
        if algorithm is not None:
            if file_digest(d / name, algorithm) != rec[algorithm]:
                raise IntegrityError(d / name, f"its {algorithm} checksum differs from the one written with it "
                                               f"(the bytes were changed after it was written)", remedy)
            hashed.append(name)
    big = [n for n in hashed if stats[n].st_size > AUTO_HASH_BYTES]
    if big:
        stamp_verified(d, big, files)
    return hashed


MANIFEST = "manifest.json"


def seal_directory(directory: str | Path, kind: str, names: Iterable[str], **fields) -> dict:
    """Write `directory/manifest.json`: `kind`, `fields`, and the size and checksum of each of `names`, sealed.
    Call it last, once every listed file is complete; `verify_sealed` checks the directory against it."""
    manifest = seal({"kind": kind, **fields, "files": record_files(directory, names)})
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_sealed(directory: str | Path, kind: str, remedy: str, checksums: Checksums = True) -> dict:
    """Check a directory written with `seal_directory`: its manifest (present, readable, unedited, of `kind`),
    then the size and checksum of every file it lists. A directory without a manifest is refused. IntegrityError
    naming the file and `remedy` otherwise; returns the manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise IntegrityError(path, f"missing, so the files of this {kind} cannot be checked and are not read", remedy)
    try:
        manifest = json.loads(path.read_text())
        intact = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) \
            and manifest.get("kind") == kind and seal_intact(manifest) is not False
    except ValueError:  # not JSON, or not UTF-8
        intact = False
    if not intact:
        raise IntegrityError(path, "unreadable or edited", remedy)
    verify_files(directory, manifest["files"], remedy, checksums)
    return manifest
