"""The zarr v3 frame cache (write, publish, read with tensorstore or zarr-python) and the frame Dataset: batches
decoded into shared memory without copies, JPEG frames shipped compressed and decoded like the workers decode them."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stages.data.errors import PipelineError
from stages.data.frame_cache import (
    FrameCache,
    FrameStorage,
    ensure_cache,
    new_staging_path,
    publish_video,
    staging_dir,
    write_video,
)
from stages.data.frame_dataset import EncodedFrames, FrameDataset, collate_frames, stack_frames
from stages.data.sampling import eval_indices, train_indices


def _frames(num_frames: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Frames whose first pixel encodes their index, on random content."""
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(num_frames)
    return frames


def _store(root: Path, video_id: str, frames: np.ndarray, storage: FrameStorage | None = None) -> None:
    staged = new_staging_path(root, video_id)
    write_video(staged, frames, {"fps": 3.0, "frame_count": len(frames)}, storage or FrameStorage())
    publish_video(staged, root, video_id)


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    root = tmp_path / "frames.zarr"
    ensure_cache(root)
    _store(root, "short", _frames(5, seed=1))
    _store(root, "long", _frames(40, seed=2))
    return root


def test_layout_is_one_shard_per_video_and_plain_zarr_v3(cache_root: Path) -> None:
    meta = json.loads((cache_root / "long" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["shape"] == [40, 16, 16, 3] and meta["data_type"] == "uint8"
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, 16, 16, 3]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [40, 16, 16, 3]
    files = sorted(
        p.relative_to(cache_root / "long").as_posix() for p in (cache_root / "long").rglob("*") if p.is_file()
    )
    assert files == ["c/0/0/0/0", "zarr.json"]
    group = zarr.open_group(str(cache_root), mode="r")
    assert sorted(group.array_keys()) == ["long", "short"]
    np.testing.assert_array_equal(group["long"][:], _frames(40, seed=2))


def test_read_scattered_repeated_and_all(cache_root: Path) -> None:
    cache = FrameCache(cache_root)
    expected = _frames(40, seed=2)
    assert cache.video_ids() == ["long", "short"]
    assert cache.num_frames("long") == 40 and cache.num_frames("short") == 5
    assert cache.attrs("long") == {"fps": 3.0, "frame_count": 40}
    picks = [39, 3, 3, 17, 0]
    got = cache.read("long", picks)
    assert got.dtype == np.uint8 and got.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(got, expected[picks])
    np.testing.assert_array_equal(cache.read("long", np.arange(10, 20)), expected[10:20])
    np.testing.assert_array_equal(cache.read("long"), expected)
    np.testing.assert_array_equal(cache.read("short", eval_indices(5, 8)), _frames(5, seed=1)[[0, 1, 2, 3, 4, 4, 4, 4]])


def test_read_errors_name_the_video(cache_root: Path) -> None:
    cache = FrameCache(cache_root)
    with pytest.raises(IndexError, match="'short'"):
        cache.read("short", [5])
    with pytest.raises(PipelineError, match="'nope'.*run `python pipeline.py decode`"):
        cache.read("nope", [0])


def test_staged_arrays_are_invisible_until_published(tmp_path: Path) -> None:
    root = tmp_path / "frames.zarr"
    ensure_cache(root)
    staged = write_video(new_staging_path(root, "vid"), _frames(3), {}, FrameStorage())
    assert FrameCache(root).video_ids() == []
    assert staged.parent == staging_dir(root)
    ensure_cache(root)  # a new run removes what an interrupted one left behind
    assert not staged.exists()
    _store(root, "vid", _frames(3))
    _store(root, "vid", _frames(4))  # a newer version replaces the old one
    assert FrameCache(root).video_ids() == ["vid"] and FrameCache(root).num_frames("vid") == 4


def test_jpeg_storage_is_lossy_small_and_readable_by_zarr(tmp_path: Path) -> None:
    root = tmp_path / "frames.zarr"
    ensure_cache(root)
    ramp = np.broadcast_to(np.linspace(20, 230, 64)[None, None, :, None], (6, 64, 64, 3))
    noise = np.random.default_rng(0).normal(0, 3, ramp.shape)
    smooth = np.clip(ramp + noise, 0, 255).astype(np.uint8)  # camera-like: smooth content plus sensor noise
    _store(root, "j", smooth, FrameStorage(codec="jpeg", jpeg_quality=90))
    _store(root, "z", smooth)
    cache = FrameCache(root)
    got = cache.read("j", [5, 0])
    assert np.abs(got.astype(int) - smooth[[5, 0]]).mean() < 4.0
    assert (root / "j" / "c/0/0/0/0").stat().st_size < (root / "z" / "c/0/0/0/0").stat().st_size
    np.testing.assert_array_equal(zarr.open_array(str(root / "j"), mode="r")[1:3], cache.read("j", [1, 2]))


def test_cache_pickles_without_handles(cache_root: Path) -> None:
    cache = FrameCache(cache_root)
    cache.read("long", [1])
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._layouts == {} and clone.path == cache.path
    np.testing.assert_array_equal(clone.read("long", [1, 2]), cache.read("long", [1, 2]))


def test_dataset_items_are_uint8_and_follow_the_sampling_rules(cache_root: Path) -> None:
    ids = ["long", "short"]
    evaluation = FrameDataset(cache_root, ids, nf=8, train=False)
    frames, index = evaluation[0]
    assert frames.dtype == torch.uint8 and frames.shape == (8, 16, 16, 3) and index == 0
    assert frames[:, 0, 0, 0].tolist() == eval_indices(40, 8).tolist()
    training = FrameDataset(str(cache_root), ids, nf=8, train=True, tail_fix=True, seed=7)
    training.set_epoch(3)
    expected = train_indices(40, 8, np.random.RandomState([7, 3, 0]), tail_fix=True)
    assert training[0][0][:, 0, 0, 0].tolist() == expected.tolist()
    assert training[0][0].equal(training[0][0])  # deterministic
    training.set_epoch(4)
    assert not np.array_equal(training.indices(0), expected)


def test_dataloader_workers_give_the_same_batches(cache_root: Path) -> None:
    ids = ["long", "short", "long", "long"]
    dataset = FrameDataset(FrameCache(cache_root), ids, nf=8, train=True, seed=1)
    dataset[0]  # the parent opened handles: forked workers must not reuse them
    batches = {}
    for workers in (0, 2):
        dataset.set_epoch(2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, multiprocessing_context=None)
        batches[workers] = [(frames.clone(), index.clone()) for frames, index in loader]
    for (a, ia), (b, ib) in zip(batches[0], batches[2], strict=True):
        assert a.equal(b) and ia.equal(ib)


def _natural(num_frames: int, size: int = 32) -> np.ndarray:
    """Smooth frames with noise (what JPEG is for), the first pixel still counting frames."""
    ramp = np.linspace(20, 230, size)[None, None, :, None] + 10 * np.arange(num_frames)[:, None, None, None] % 50
    noise = np.random.default_rng(3).normal(0, 3, (num_frames, size, size, 3))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def jpeg_root(tmp_path: Path) -> Path:
    root = tmp_path / "jpeg.zarr"
    ensure_cache(root)
    for name, count in (("a", 12), ("b", 7), ("c", 20)):
        _store(root, name, _natural(count), FrameStorage(codec="jpeg", jpeg_quality=85))
    return root


def test_jpeg_frames_decode_to_the_pixels_of_pillow(jpeg_root: Path) -> None:
    from PIL import Image

    cache = FrameCache(jpeg_root)
    encoded = cache.read_encoded("c", [3, 0, 3])
    pillow = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in encoded])
    np.testing.assert_array_equal(cache.read("c", [3, 0, 3]), pillow)
    _store(jpeg_root, "z", _frames(4))
    with pytest.raises(PipelineError, match="not JPEG-coded"):
        FrameCache(jpeg_root).read_encoded("z", [0])


def test_runs_of_consecutive_frames_and_raw_arrays_read_like_single_frames(tmp_path: Path, cache_root: Path) -> None:
    cache = FrameCache(cache_root)
    picks = np.array([0, 1, 2, 3, 9, 10, 30, 31, 32, 39])
    out = np.zeros((len(picks), 16, 16, 3), np.uint8)
    cache.read_into("long", picks, out)
    np.testing.assert_array_equal(out, np.stack([cache.read("long", [i])[0] for i in picks]))
    raw = tmp_path / "raw.zarr"  # an uncompressed one-shard array: read with one preadv per run, no decode
    frames = _frames(9)
    array = zarr.create_array(
        str(raw / "r"), shape=frames.shape, dtype="uint8", chunks=(1, 16, 16, 3), shards=frames.shape, compressors=None
    )
    array[:] = frames
    assert FrameCache(raw).codec("r") == "raw" and cache.codec("long") == "zstd"
    np.testing.assert_array_equal(FrameCache(raw).read("r", [8, 2, 3, 4, 4]), frames[[8, 2, 3, 4, 4]])


def test_a_truncated_shard_is_a_clear_error(cache_root: Path) -> None:
    shard = cache_root / "long" / "c/0/0/0/0"
    data = shard.read_bytes()
    index = data[-(16 * 40 + 4) :]
    shard.write_bytes(data[: len(data) // 2] + b"\0" * 10 + index)  # the index survives, frames do not
    with pytest.raises(PipelineError, match="shorter than its index"):
        FrameCache(cache_root).read("long", [39])


def test_batches_are_built_in_shared_memory_and_passed_on_without_a_copy(cache_root: Path) -> None:
    ids = ["long", "short", "long", "long"]
    dataset = FrameDataset(FrameCache(cache_root), ids, nf=8, train=True, seed=1)
    items = dataset.__getitems__([0, 1])
    frames, indices = collate_frames(items)
    assert frames.data_ptr() == items[0][0].data_ptr() and indices.tolist() == [0, 1]  # the batch itself
    assert torch.equal(frames[1], dataset[1][0])
    swapped = stack_frames([items[1][0], items[0][0]])  # not the batch's rows in order: a stacked copy
    assert swapped.data_ptr() != frames.data_ptr() and torch.equal(swapped, torch.stack([frames[1], frames[0]]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_frames)
    for batch, (frames, indices) in zip(([0, 1], [2, 3]), loader, strict=True):
        assert frames.is_shared() and indices.tolist() == batch
        assert torch.equal(frames, torch.stack([dataset[i][0] for i in batch]))


def test_encoded_frames_decoded_in_the_trainer_equal_the_workers_decoding(jpeg_root: Path) -> None:
    ids = ["a", "b", "c", "a"]
    decoded = FrameDataset(jpeg_root, ids, nf=8, train=True, seed=2)
    encoded = FrameDataset(jpeg_root, ids, nf=8, train=True, seed=2, encoded=True)
    expected = torch.stack([decoded[i][0] for i in range(4)])
    loader = torch.utils.data.DataLoader(encoded, batch_size=4, num_workers=2, collate_fn=collate_frames)
    (batch, indices), *_ = list(loader)
    assert isinstance(batch, EncodedFrames) and batch.shape == (4, 8, 32, 32, 3) and indices.tolist() == [0, 1, 2, 3]
    assert len(batch.data) < expected.numel() / 3
    assert torch.equal(batch.decode(torch.device("cpu")), expected)


def test_shared_slots_are_reused_and_hold_the_same_batches(cache_root: Path) -> None:
    ids = ["long", "short", "long", "long", "short", "long"]
    plain = FrameDataset(FrameCache(cache_root), ids, nf=8, train=True, seed=1)
    shared = FrameDataset(FrameCache(cache_root), ids, nf=8, train=True, seed=1)
    shared.share_batches(batch_size=2, slots=6)
    for epoch in (0, 1):
        shared.set_epoch(epoch)
        plain.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(shared, batch_size=2, num_workers=2, collate_fn=collate_frames)
        slots = []
        for batch, (frames, indices) in zip(([0, 1], [2, 3], [4, 5]), loader, strict=True):
            slots.append(frames.slot)
            assert indices.tolist() == batch
            assert torch.equal(shared.take(frames), torch.stack([plain[i][0] for i in batch]))
            shared.give_back(frames)
        assert set(slots) <= set(range(6))


def test_a_consumer_that_keeps_every_slot_gets_a_clear_error(cache_root: Path) -> None:
    dataset = FrameDataset(FrameCache(cache_root), ["long", "short"], nf=8, train=False)
    dataset.share_batches(batch_size=1, slots=1)
    dataset.shared.timeout = 0.2
    kept = dataset.__getitems__([0])[0][0]
    with pytest.raises(PipelineError, match="give every batch back"):
        dataset.__getitems__([1])
    dataset.give_back(kept)  # now the slot is free again
    frames, _ = collate_frames(dataset.__getitems__([1]))
    expected = FrameDataset(FrameCache(cache_root), ["long", "short"], nf=8, train=False)[1][0]
    assert frames.slot == kept.slot and torch.equal(dataset.take(frames)[0], expected)
