"""One GPU check (H100/H200, a few minutes): a ProPy training step at paper size, the data stall, bf16 vs fp32.

    python benchmarks/gpu_check.py                                  # JSON to $OUT/gpu_check.json (else --out)
    python benchmarks/gpu_check.py --fixtures ../shared/fixtures    # the official fixture for part 3
    python benchmarks/gpu_check.py --tiny --device cpu              # the small CPU run of tests/test_gpu_check.py

1. step: ViT-B/32 with random weights (OpenAI layout) under the paper's ProPy (Nf 32, 42 events, Nvp 4, adapters
   384), 24 videos with 4 captions of 32 tokens each, bf16 autocast, one AdamW update through the training loop
   (`Trainer`, `PropyStep`): median step time after warm-up, model FLOPs of one step (torch FlopCounterMode),
   MFU against the GPU's dense bf16 peak, peak memory; for the fast path and the faithful path (the official
   computation), and the ratio.
2. stall: the same step fed by the training loader from a JPEG q90 frame cache of natural-looking synthetic 224 px
   videos, with the frames decoded by CPU workers into shared slots or shipped compressed and decoded on the GPU
   (`decode_on_device`); stall = 1 - (step time on a batch already on the GPU) / (step time with the loader).
3. fixtures: the official fixture `propy_official/cfg32` run in fp32 and in bf16 autocast on the device: the max
   abs error of every output against the official fp32 outputs, and the share of best events that agree.

Every part is timed and written to the JSON as soon as it ends; a part that fails records its error and the others
still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.data import frame_cache  # noqa: E402
from stages.data.frame_dataset import EncodedFrames, FrameDataset  # noqa: E402
from stages.models.clip_backbone import ClipArch, tokenize  # noqa: E402
from stages.models.propy import ProPy, ProPyConfig  # noqa: E402
from stages.models.pyramid import PyramidConfig  # noqa: E402
from stages.train.distributed import GlobalBatchSampler, WorldInfo, epoch_loader  # noqa: E402
from stages.train.loop import LoopConfig, Trainer  # noqa: E402
from stages.train.optim import WarmupCosine, build_adamw  # noqa: E402
from stages.train.train_propy import CaptionCollate, PropyStep  # noqa: E402

# Dense bf16 peak of the GPUs this check is meant for (FLOP/s), by a substring of torch.cuda.get_device_name().
BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


def paper_size(tiny: bool) -> dict[str, Any]:
    """The sizes of the check: the paper's (batch 24, Nf 32, ViT-B/32), or tiny ones for a CPU smoke run."""
    if tiny:
        arch = ClipArch(
            embed_dim=48, vision_width=64, vision_layers=2, patch_size=32, image_size=64, text_width=64, text_layers=2
        )
        model = ProPyConfig(
            pyramid=PyramidConfig(num_frames=4, offset=(1, 1)), num_visual_prompts=2, adapter_channels=8
        )
        return {"arch": arch, "model": model, "videos": 2, "captions": 2, "words": 12, "warmup": 1, "steps": 2}
    return {
        "arch": ClipArch(),
        "model": ProPyConfig(),
        "videos": 24,
        "captions": 4,
        "words": 32,
        "warmup": 3,
        "steps": 10,
    }


def build(size: dict[str, Any], device: torch.device, fast_path: bool) -> tuple[ProPy, Trainer, PropyStep]:
    """A randomly initialised ProPy, its optimiser and loop (the training code's), on `device`."""
    torch.manual_seed(0)
    model = ProPy(size["arch"].build(), size["arch"], replace(size["model"], fast_path=fast_path)).to(device).train()
    for adapter in model.adapters:  # non-zero adapters, so that they do real work
        torch.nn.init.normal_(adapter.conv.weight, std=0.02)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(model.named_parameters(), 8e-4, 0.2)
    loop = LoopConfig(epochs=1, steps_per_epoch=10_000, progress=False)
    trainer = Trainer(parameters, optimizer, WarmupCosine(8e-4, 10_000), device, True, loop)
    return model, trainer, PropyStep(model, trainer, device)


def synthetic_batch(size: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 frames [B, Nf, S, S, 3], caption tokens and labels, already on `device`."""
    generator = torch.Generator().manual_seed(1)
    nf, image = size["model"].pyramid.num_frames, size["arch"].image_size
    frames = torch.randint(0, 256, (size["videos"], nf, image, image, 3), dtype=torch.uint8, generator=generator)
    captions = [f"a person number {i} opens the door and walks out" for i in range(size["videos"] * size["captions"])]
    labels = torch.arange(size["videos"]).repeat_interleave(size["captions"])
    return frames.to(device), tokenize(captions, size["words"]).to(device), labels.to(device)


def timed(fn: Callable[..., Any], device: torch.device, *args: Any) -> float:
    """Wall seconds of `fn(*args)` (the device synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def train_step(trainer: Trainer, step: PropyStep, batch: tuple[torch.Tensor, ...]) -> None:
    """One update of the training loop on a batch already on the device."""
    trainer.step(step, batch)


def step_part(size: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Part 1: time, FLOPs, MFU and peak memory of one training step, fast and faithful paths."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = synthetic_batch(size, device)
    peak = next((v for k, v in BF16_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    result: dict[str, Any] = {"videos": size["videos"], "captions": size["videos"] * size["captions"]}
    for path in ("fast", "faithful"):
        _, trainer, step = build(size, device, fast_path=path == "fast")
        for _ in range(size["warmup"]):
            train_step(trainer, step, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed(train_step, device, trainer, step, batch) for _ in range(size["steps"])]
        with FlopCounterMode(display=False) as counter:
            train_step(trainer, step, batch)
        seconds, flops = float(np.median(times)), counter.get_total_flops()
        result[path] = {
            "step_s": seconds,
            "step_s_all": times,
            "flops": flops,
            "tflops_per_s": flops / seconds / 1e12,
            "mfu": flops / seconds / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        del trainer, step
    result["faithful_over_fast"] = result["faithful"]["step_s"] / result["fast"]["step_s"]
    result["bf16_peak_flops"] = peak
    return result


def natural_frames(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth moving colour fields with sensor-like noise (JPEG sizes like real video, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    frames = []
    for t in range(count):
        channels = [127 + 100 * np.sin(2 * np.pi * (x * (1 + c) + y * (2 - c) + 0.05 * t) + phase[c]) for c in range(3)]
        frame = np.stack(channels, axis=-1) + rng.normal(0, 4, (size, size, 3))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def jpeg_cache(root: Path, videos: int, frames: int, size: int) -> Path:
    """A JPEG q90 frame cache of `videos` synthetic videos."""
    cache = root / "frames.zarr"
    frame_cache.ensure_cache(cache)
    storage = frame_cache.FrameStorage(codec="jpeg", jpeg_quality=90)
    for v in range(videos):
        staged = frame_cache.new_staging_path(cache, f"v{v}")
        frame_cache.write_video(staged, natural_frames(frames, size, v), {}, storage)
        frame_cache.publish_video(staged, cache, f"v{v}")
    return cache


def stall_part(size: dict[str, Any], device: torch.device, workers: int, root: Path) -> dict[str, Any]:
    """Part 2: step time with the training loader (JPEG decoded by CPU workers / on the device) vs compute only."""
    nf, image, batch_videos = size["model"].pyramid.num_frames, size["arch"].image_size, size["videos"]
    videos = batch_videos * (size["warmup"] + size["steps"])
    started = time.perf_counter()
    cache = jpeg_cache(root, videos, 3 * nf, image)
    result: dict[str, Any] = {"workers": workers, "cache_build_s": time.perf_counter() - started}
    ids = frame_cache.FrameCache(cache).video_ids()
    captions = [[f"caption {k} of video {v}" for k in range(size["captions"])] for v in range(len(ids))]
    collate = CaptionCollate(captions, size["words"])
    _, trainer, step = build(size, device, fast_path=True)
    batch = synthetic_batch(size, device)
    compute = [timed(train_step, device, trainer, step, batch) for _ in range(size["steps"])]
    result["compute_only_step_s"] = float(np.median(compute[1:] if len(compute) > 1 else compute))
    for mode in ("cpu_workers", "on_device"):
        dataset = FrameDataset(cache, ids, nf, train=True, encoded=mode == "on_device")
        if mode == "cpu_workers":
            dataset.share_batches(batch_videos, slots=2 * workers + 2)
        sampler = GlobalBatchSampler(len(ids), batch_videos, WorldInfo(), seed=0)
        options = {"num_workers": workers, "pin_memory": device.type == "cuda", "collate_fn": collate}

        times, last = [], time.perf_counter()
        for frames, text_ids, labels in epoch_loader(dataset, sampler, 0, 0, **options):
            taken = dataset.take(frames)
            taken = taken.decode(device) if isinstance(taken, EncodedFrames) else taken.to(device)
            train_step(trainer, step, (taken, text_ids.to(device), labels.to(device)))
            dataset.give_back(frames)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            times.append(now - last)
            last = now
        seconds = float(np.median(times[size["warmup"] :]))
        result[mode] = {"step_s": seconds, "stall": 1.0 - result["compute_only_step_s"] / seconds, "step_s_all": times}
    return result


def fixture_part(fixtures: Path, device: torch.device) -> dict[str, Any]:
    """Part 3: the official fixture in fp32 and in bf16 autocast on `device`, against the official outputs."""
    from stages.models.propy import propy_loss
    from stages.models.propy_import import build_from_official, load_official_state

    prefix = fixtures / "propy_official" / "cfg32"
    official = json.loads(Path(f"{prefix}_config.json").read_text())
    payload = load_official_state(f"{prefix}_official_ckpt.pth.tar")
    pyramid = PyramidConfig.from_official(official.get("pyr_config"), "fixture pyr_config")
    io = {key: torch.from_numpy(value) for key, value in np.load(f"{prefix}_io.npz").items()}
    model, _ = build_from_official(payload, pyramid, official, fast_path=True)
    model = model.to(device)
    result: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else None
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            text = model.encode_queries(io["text_ids"].to(device)).float()
            events = model.encode_videos(io["video"].to(device)).float()
            logits, best = model.similarity(text, events, return_best_event=True)
            loss = propy_loss(logits, io["text_labels"].to(device))[0]
        outputs = {"text_features": text, "event_features": events, "logits": logits, "loss": loss}
        errors = {name: float((ours.cpu().double() - io[name].double()).abs().max()) for name, ours in outputs.items()}
        errors["best_event_agreement"] = float((best.cpu() == io["best_event"]).float().mean())
        result[precision] = errors
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "bench_out")))
    parser.add_argument(
        "--fixtures", type=Path, default=Path(os.environ.get("PRVR_FIXTURES", REPO.parent / "shared" / "fixtures"))
    )
    parser.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--tiny", action="store_true", help="small sizes (a CPU smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    size = paper_size(args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    report["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as scratch:
        parts = {
            "step": lambda: step_part(size, device),
            "stall": lambda: stall_part(size, device, args.workers, Path(scratch)),
            "fixtures": lambda: fixture_part(args.fixtures, device),
        }
        for name, part in parts.items():
            started = time.perf_counter()
            try:
                report[name] = part()
            except Exception as exc:  # noqa: BLE001 - a failed part is recorded, the others still run
                report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            report[name]["part_s"] = time.perf_counter() - started
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
            print(
                f"{name}: {json.dumps({k: v for k, v in report[name].items() if k != 'traceback'})[:600]}", flush=True
            )
    return report


if __name__ == "__main__":
    main()
