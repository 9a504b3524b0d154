"""File helpers every stage shares: content hashes and atomic writes (never a truncated file)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, int | str]:
    """What identifies a file's content: size, mtime (ns) and sha256."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def current_fingerprint(path: str | Path, known: dict) -> dict[str, int | str]:
    """`path`'s `file_fingerprint`, taken from `known` (one recorded earlier, e.g. when the file was decoded) while the
    file's size and mtime are still the recorded ones, so that it is not read again."""
    stat = Path(path).stat()
    if (known.get("size"), known.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns) and "sha256" in known:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": known["sha256"]}
    return file_fingerprint(path)


def same_file(path: str | Path, recorded: dict) -> bool:
    """Whether `path` still holds the content `recorded` (a `file_fingerprint`): same size and mtime or, if only
    the mtime changed (a copy, a checkout), the same sha256."""
    stat = Path(path).stat()
    if recorded.get("size") != stat.st_size:
        return False
    return recorded.get("mtime_ns") == stat.st_mtime_ns or recorded.get("sha256") == file_sha256(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary name beside `path`, then rename it into place; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
