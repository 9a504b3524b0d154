"""A copy of this repository as a DVC project in a temporary folder, for tests and benchmarks that run `dvc`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.videos import make_video

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def merge(target: dict, update: dict) -> None:
    """Merge `update` into `target`, nested mappings key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


def copy_tracked_tree(destination: Path) -> None:
    """The files git tracks, without the tests and benchmarks."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO / name
        if source.is_file() and not name.startswith(("tests/", "benchmarks/")):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def environment() -> dict[str, str]:
    """The environment of `dvc` and `python pipeline.py` in the project (this interpreter first on PATH)."""
    return {**os.environ, "PATH": str(BIN) + os.pathsep + os.environ["PATH"], "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@localhost",
            "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@localhost"}  # fmt: skip


def run(args: list[str], cwd: Path, timeout: float = 900) -> str:
    """Run a command in the project; its stdout and stderr (the command must succeed)."""
    result = subprocess.run(args, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def dvc(project: Path, *args: str) -> str:
    """`dvc ARGS` in the project."""
    return run([str(BIN / "dvc"), *args], project)


def init_project(project: Path, params_update: dict) -> None:
    """Copy the repository to `project`, merge `params_update` into its params.yaml, commit it to a fresh git."""
    copy_tracked_tree(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    merge(params, params_update)
    if "files" in params_update.get("prepare", {}):  # a dataset's splits replace the others, as layered files do
        params["prepare"]["files"] = params_update["prepare"]["files"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "project"], project)


def toy_dataset(project: Path, clip_weights: Path, videos: int, seconds: float = 4.0) -> dict:
    """`videos` small mp4s and TVR-format annotations under data/toy, and the params that point at them."""
    root = project / "data" / "toy"
    lines = {"train": [], "test": []}
    for i in range(videos):
        make_video(root / "videos" / f"v{i}.mp4", seconds, seed=i)
        split = "test" if i % 4 == 3 else "train"
        line = {"desc_id": f"v{i}#0", "desc": f"bar {i}", "vid_name": f"v{i}", "duration": seconds, "ts": [0, 1]}
        lines[split].append(json.dumps(line) + "\n")
    files = {}
    for split, text in lines.items():
        files[split] = f"data/toy/annotations/toy_{split}.jsonl"
        (project / files[split]).parent.mkdir(parents=True, exist_ok=True)
        (project / files[split]).write_text("".join(text))
    (project / "weights").mkdir(exist_ok=True)
    shutil.copy2(clip_weights, project / "weights" / "clip.safetensors")
    return {
        "base": {"dataset": "toy", "clip_weights": "weights/clip.safetensors", "clip_arch": "vit-w128-l2-p32-r64"},
        "prepare": {"files": files, "annotation_dir": "data/toy/annotations"},
        "decode": {"video_dir": "data/toy/videos", "size": 64, "workers": 1},
        "features": {"workers": 0},
    }


def disk_bytes(path: Path) -> int:
    """Bytes of the files under `path` (each hard-linked file once)."""
    seen, total = set(), 0
    for item in [path] if path.is_file() else path.rglob("*"):
        stat = item.lstat()
        if item.is_file() and (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_size
    return total
