"""Bytes on disk after `dvc repro features` (prepare -> decode -> features): the workspace plus .dvc/cache, with this
repository's dvc.yaml (frame cache and feature store `cache: false`, stored once) and with those two flags removed
(DVC's default: every output copied into .dvc/cache as well, as before).

    PYTHONPATH=. python benchmarks/bench_storage.py                 # 40 videos of 8 s, 64 px frames
    PYTHONPATH=. python benchmarks/bench_storage.py --videos 100 --seconds 20

The dataset is tiny mp4s made by tests/videos.py; frames and features scale with frames x bytes per frame (README
gives the per-dataset estimates).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from stages.models.clip_backbone import ClipArch, save_clip
from tests.dvc_project import disk_bytes, dvc, init_project, toy_dataset

TINY_CLIP = ClipArch(
    embed_dim=48, vision_width=128, vision_layers=2, patch_size=32, image_size=64, text_width=64, text_layers=2
)


def measure(root: Path, videos: int, seconds: float, stored_once: bool) -> dict[str, int]:
    """Build the project, run the first three stages, return the bytes of the workspace outputs and .dvc/cache."""
    project = root / ("once" if stored_once else "twice")
    torch.manual_seed(0)
    save_clip(TINY_CLIP.build(), root / "clip.safetensors")
    params = toy_dataset(project, root / "clip.safetensors", videos, seconds)
    init_project(project, params)
    if not stored_once:
        dvc_yaml = project / "dvc.yaml"
        lines = dvc_yaml.read_text().splitlines(keepends=True)
        dvc_yaml.write_text("".join(line for line in lines if "cache: false      # stored once" not in line))
    dvc(project, "repro", "features")
    cache = project / "cache" / "toy"
    return {
        "frames.zarr": disk_bytes(cache / "frames.zarr"),
        "feature store": disk_bytes(cache / f"clip_{TINY_CLIP.name}.h5"),
        "workspace cache/": disk_bytes(project / "cache"),
        ".dvc/cache": disk_bytes(project / ".dvc" / "cache"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_storage_"))
    try:
        rows = {flag: measure(root, args.videos, args.seconds, flag) for flag in (True, False)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.videos} videos of {args.seconds:g} s, 64 px frames at 3 fps, after `dvc repro features`\n")
    print("| dvc.yaml | frames.zarr | feature store | workspace cache/ | .dvc/cache | total on disk |")
    print("|---|---|---|---|---|---|")
    for stored_once, sizes in rows.items():
        name = "frames and features `cache: false` (this repo)" if stored_once else "DVC default (cached outputs)"
        cells = " | ".join(f"{sizes[key] / 1e6:.2f} MB" for key in sizes)
        total = (sizes["workspace cache/"] + sizes[".dvc/cache"]) / 1e6
        print(f"| {name} | {cells} | {total:.2f} MB |")


if __name__ == "__main__":
    main()
