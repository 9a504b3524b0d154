"""The frame cache and the feature store take their size once (DVC tracks them without copying them into
.dvc/cache), and DVC still gives what it gives: a second `dvc repro` does nothing, a changed param re-runs exactly
what depends on it, a killed stage is redone (and resumes). A small DVC project of the real dvc.yaml and pipeline.py
(prepare -> decode -> features) on ten tiny videos; about a minute. The dataset's annotation files are tracked too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.dvc_project import BIN, disk_bytes, dvc, environment, init_project, toy_dataset

VIDEOS = 10


def _ran(log: str) -> list[str]:
    return [stage for stage in ("prepare", "decode", "features") if f"Running stage '{stage}'" in log]


def _codecs(frames: Path) -> dict[str, str]:
    codecs = {}
    for meta in frames.glob("*/zarr.json"):
        try:
            codecs[meta.parent.name] = json.loads(meta.read_text())["attributes"]["codec"]["name"]
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now
    return codecs


def _set(project: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_big_outputs_are_stored_once_and_dvc_still_tracks_them(tmp_path: Path, tiny_clip_weights: Path) -> None:
    project = tmp_path / "project"
    init_project(project, toy_dataset(project, tiny_clip_weights, VIDEOS))
    cache = project / "cache" / "toy"

    assert _ran(dvc(project, "repro", "features")) == ["prepare", "decode", "features"]
    frames, store = cache / "frames.zarr", cache / "clip_vit-w128-l2-p32-r64.h5"
    big = disk_bytes(frames) + disk_bytes(store)
    assert len(list(frames.glob("*/zarr.json"))) == VIDEOS
    assert disk_bytes(project / ".dvc" / "cache") < 0.1 * big  # only the small outputs are copied there
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    hashed = {out["path"]: out.get("md5") for out in lock["stages"]["decode"]["outs"]}
    assert hashed["cache/toy/frames.zarr"].endswith(".dir")  # hashed in dvc.lock all the same

    stamps = {p: p.stat().st_mtime_ns for p in [store, *frames.glob("*/zarr.json")]}
    again = dvc(project, "repro", "features")
    assert _ran(again) == [] and "up to date" in again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    native = project / "data" / "toy" / "annotations" / "toy_train.jsonl"  # the dataset's own files are tracked
    original = native.read_text()
    native.write_text(original + original.splitlines()[0].replace('"v0#0"', '"v0#9"') + "\n")
    assert "prepare:" in dvc(project, "status", "prepare")
    native.write_text(original)

    _set(project, "features", "batch_frames", 7)
    assert _ran(dvc(project, "repro", "features")) == ["features"]

    _set(project, "decode", "codec", "jpeg")  # every video is decoded again; the run is killed half-way
    command = [str(BIN / "dvc"), "repro", "features"]
    process = subprocess.Popen(command, cwd=project, env=environment(), start_new_session=True, **_quiet())
    deadline = time.monotonic() + 120
    while list(_codecs(frames).values()).count("jpeg") < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # dvc, the stage, its dask cluster and decoders
    process.wait()
    done = [vid for vid, codec in _codecs(frames).items() if codec == "jpeg"]
    assert 2 <= len(done) < VIDEOS, "the kill should land in the middle of the decode stage"
    assert "decode:" in dvc(project, "status", "--with-deps", "features")
    stamps = {vid: (frames / vid / "zarr.json").stat().st_mtime_ns for vid in done}
    assert _ran(dvc(project, "repro", "features")) == ["decode", "features"]
    assert set(_codecs(frames).values()) == {"jpeg"} and len(_codecs(frames)) == VIDEOS
    assert all((frames / vid / "zarr.json").stat().st_mtime_ns == stamp for vid, stamp in stamps.items())
    assert "up to date" in dvc(project, "status", "--with-deps", "features")


def _quiet() -> dict:
    return {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
