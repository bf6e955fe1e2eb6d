"""integrity.py: sizes and checksums recorded for a directory's files catch truncation, overwritten bytes and an
edited manifest; big files are hashed once after they change (stamps), every time with checksums=True."""
import json
import os

import pytest

import retrieval.integrity as integrity
from retrieval.integrity import (IntegrityError, file_digest, files_under, json_digest, record_files, seal,
                                 seal_intact, stamp_verified, verify_files)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(os.urandom(200_000))
    (tmp_path / "sub" / "b.txt").write_text("hello\n" * 100)
    (tmp_path / ".hidden").write_text("not recorded")
    return tmp_path, record_files(tmp_path, files_under(tmp_path))


def test_records_cover_every_visible_file(folder):
    d, files = folder
    assert sorted(files) == ["a.bin", "sub/b.txt"]
    assert files["a.bin"]["size"] == 200_000
    assert integrity.default_algorithm() in files["a.bin"]
    assert verify_files(d, files, "rebuild", checksums=True) == ["a.bin", "sub/b.txt"]


def test_truncation_is_caught_by_size_even_without_checksums(folder):
    d, files = folder
    with open(d / "a.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IntegrityError, match=r"a\.bin: 1,000 bytes, but 200,000 were written.*; run this") as e:
        verify_files(d, files, "run this", checksums=False)
    assert e.value.path == d / "a.bin"


def test_overwritten_bytes_are_caught_by_checksum(folder):
    d, files = folder
    with open(d / "a.bin", "r+b") as f:
        f.seek(5000)
        f.write(os.urandom(64 * 1024))
    assert verify_files(d, files, "x", checksums=False) == []  # same size: sizes alone cannot tell
    with pytest.raises(IntegrityError, match=r"a\.bin: its .* checksum differs"):
        verify_files(d, files, "x", checksums="auto")


def test_missing_file(folder):
    d, files = folder
    (d / "sub" / "b.txt").unlink()
    with pytest.raises(IntegrityError, match=r"b\.txt: missing"):
        verify_files(d, files, "x")


def test_big_files_are_hashed_on_first_use_then_when_changed(folder, monkeypatch):
    d, files = folder
    monkeypatch.setattr(integrity, "AUTO_HASH_BYTES", 1000)  # a.bin counts as big, b.txt as small
    assert verify_files(d, files, "x", "auto") == ["a.bin", "sub/b.txt"]  # first use: both hashed, a.bin stamped
    assert verify_files(d, files, "x", "auto") == ["sub/b.txt"]  # unchanged big file: stamp trusted
    assert verify_files(d, files, "x", True) == ["a.bin", "sub/b.txt"]  # --verify: everything
    with open(d / "a.bin", "r+b") as f:  # same size, new bytes: its stat changes, so it is hashed again
        f.seek(10)
        f.write(b"\0" * 100)
    with pytest.raises(IntegrityError, match="checksum differs"):
        verify_files(d, files, "x", "auto")


def test_stamps_record_written_files(folder, monkeypatch):
    d, files = folder
    monkeypatch.setattr(integrity, "AUTO_HASH_BYTES", 1000)
    stamp_verified(d, ["a.bin"], files)
    assert verify_files(d, files, "x", "auto") == ["sub/b.txt"]


def test_sha256_records_are_checked_too(folder):
    d, _ = folder
    files = record_files(d, ["a.bin"], algorithm="sha256")
    assert files["a.bin"]["sha256"] == file_digest(d / "a.bin", "sha256")
    (d / "a.bin").write_bytes(b"\1" * 200_000)
    with pytest.raises(IntegrityError, match="sha256 checksum differs"):
        verify_files(d, files, "x")


def test_json_digest_is_canonical_and_sensitive():
    a = {"num_chunks": 4968, "chunk_size": 64, "files": {"x": {"size": 1}}}
    b = json.loads(json.dumps(a, indent=4))
    assert json_digest(a) == json_digest(dict(reversed(list(b.items()))))
    assert json_digest(a) != json_digest({**a, "chunk_size": 32})


def test_seal_detects_edits_and_names_its_algorithm():
    sealed = seal({"num_chunks": 4968, "chunk_size": 64})
    assert sealed["checksum"].startswith(integrity.default_algorithm() + ":")
    assert seal_intact(sealed) is True
    assert seal_intact({**sealed, "chunk_size": 32}) is False
    assert seal_intact({"chunk_size": 64}) is None  # no seal: nothing to compare
    sha = {**{"a": 1}, "checksum": "sha256:" + json_digest({"a": 1}, "sha256")}
    assert seal_intact(sha) is True and seal_intact({**sha, "a": 2}) is False
