"""ProPy fast path versus the official computation: forward and forward+backward time at the paper's full size.

    PYTHONPATH=. python benchmarks/bench_propy.py     # ViT-B/32 (random init), Nf 32, 2 videos, 5 captions, CPU
    PYTHONPATH=. python benchmarks/bench_propy.py --device cuda --videos 24 --captions 120 --repeats 5

Prints the time of each path (best of --repeats; one warm-up run first on GPUs), the speed-up and the largest
difference of the event features between the two paths (they must agree to 1e-4).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from stages.models.clip_backbone import ClipArch
from stages.models.propy import ProPy, ProPyConfig, propy_loss


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of `fn` over `repeats` runs (after one warm-up run on GPUs)."""
    if device.type == "cuda":
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--words", type=int, default=20, help="tokens per caption")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    arch = ClipArch()
    clip = arch.build()
    fast_model = ProPy(clip, arch, ProPyConfig(fast_path=True)).to(device)
    faithful_model = ProPy(clip, arch, ProPyConfig(fast_path=False)).to(device)
    faithful_model.load_trainable_state_dict(fast_model.trainable_state_dict())
    for adapter in fast_model.adapters:  # non-zero adapters, so that they do real work
        torch.nn.init.normal_(adapter.conv.weight, std=0.02)
    faithful_model.load_trainable_state_dict(fast_model.trainable_state_dict())
    nf = fast_model.pyramid.num_frames
    frames = torch.randn(args.videos, nf, 3, arch.image_size, arch.image_size, device=device)
    text = torch.randint(1, arch.vocab_size - 1, (args.captions, args.words), device=device)
    text[:, 0], text[:, -1] = arch.vocab_size - 2, arch.vocab_size - 1
    labels = torch.arange(args.captions, device=device) % args.videos
    print(
        f"ProPy {arch.name}, Nf {nf}, {fast_model.pyramid.num_events} events, {args.videos} videos, "
        f"{args.captions} captions x {args.words} tokens, {device}, {torch.get_num_threads()} threads"
    )

    results = {}
    for name, model in (("faithful", faithful_model), ("fast", fast_model)):
        model.train()

        def forward(model: ProPy = model) -> None:
            with torch.no_grad():
                model.encode_videos(frames)
                model.encode_queries(text)

        def forward_backward(model: ProPy = model) -> None:
            logits = model.similarity(model.encode_queries(text), model.encode_videos(frames))
            propy_loss(logits, labels)[0].backward()
            model.zero_grad(set_to_none=True)

        results[name] = (best_time(forward, args.repeats, device), best_time(forward_backward, args.repeats, device))
        print(f"{name:>9}: forward {results[name][0]:8.2f} s   forward+backward {results[name][1]:8.2f} s", flush=True)
    speed_fwd = results["faithful"][0] / results["fast"][0]
    speed_train = results["faithful"][1] / results["fast"][1]
    print(f"  speed-up: forward {speed_fwd:.2f}x   forward+backward {speed_train:.2f}x")
    with torch.no_grad():
        fast_model.eval(), faithful_model.eval()
        difference = (fast_model.encode_videos(frames) - faithful_model.encode_videos(frames)).abs().max()
    print(f"max |fast - faithful| event features: {difference.item():.2e}")
    if fast_model.config != replace(faithful_model.config, fast_path=True):
        raise RuntimeError("the two models must differ only in fast_path")


if __name__ == "__main__":
    main()
