"""File identity: what re-runs of decode and index compare, without reading a file twice."""

from __future__ import annotations

import os
from pathlib import Path

from stages.data.files import current_fingerprint, file_fingerprint, same_file


def test_a_recorded_fingerprint_is_reused_only_while_size_and_mtime_match(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    path.write_bytes(b"frames")
    recorded = file_fingerprint(path)
    assert current_fingerprint(path, {**recorded, "sha256": "known"})["sha256"] == "known"  # not read again
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same content, new mtime
    touched = current_fingerprint(path, recorded)
    assert touched["sha256"] == recorded["sha256"] and touched["mtime_ns"] == stat.st_mtime_ns + 10**9
    assert same_file(path, recorded) and same_file(path, touched)
    path.write_bytes(b"other frames")
    assert current_fingerprint(path, recorded)["sha256"] != recorded["sha256"]
    assert current_fingerprint(path, {})["sha256"] == file_fingerprint(path)["sha256"]
