"""Checksums of an export folder, so that a corrupted or truncated file is an error at load time.

A flipped byte inside a packed weight would otherwise load without complaint and silently change
the model's outputs; every file the folder holds (weights, model and scheduler configs) is listed in
``qsearch_config.json`` with its size and sha256, and ``verify`` checks them all before anything is
read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qsearch.export.serialize import LoadError

_CHUNK = 1 << 20


class IntegrityError(LoadError):
    """A file of an export folder is missing, truncated or corrupted."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(root: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {bytes, sha256}}`` of every file under ``root``."""
    return {
        path.relative_to(root).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def verify(root: Path, records: dict[str, dict[str, object]]) -> None:
    """Raise ``IntegrityError`` unless every recorded file is present with its size and sha256."""
    for rel, record in records.items():
        path = root / rel
        if not path.is_file():
            raise IntegrityError(f"{root}: file {rel} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "longer than written"
            raise IntegrityError(f"{path}: {what} ({size} bytes, expected {record['bytes']})")
        if sha256_file(path) != record["sha256"]:
            raise IntegrityError(f"{path}: checksum mismatch (the file is corrupted or was modified)")
