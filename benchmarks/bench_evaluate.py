"""Per-query matching and end-to-end latency at corpus sizes 1k/10k/100k (the efficiency probe of stages.evaluate).

    PYTHONPATH=. python benchmarks/bench_evaluate.py                          # CPU, K = 1 and 42 units of 512
    PYTHONPATH=. python benchmarks/bench_evaluate.py --device cuda --query-batch 64
    PYTHONPATH=. python benchmarks/bench_evaluate.py --sizes 1000 10000 --units 42 --text-encoder none

Matching scores one batch of query embeddings against a random corpus of the stated shape (max-over-units cosine,
then each query's top 100 videos); end to end adds encoding the same batch of captions with a CLIP ViT-B/32 text
tower (random weights: the time does not depend on them). On the CPU, corpora that would leave less than 4 GiB of
memory free are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

from stages.evaluate.efficiency import EfficiencyConfig, bytes_per_video, parameter_counts, probe_latency
from stages.evaluate.retrieval import ScoringConfig, resolve_device
from stages.models.clip_backbone import ClipArch, text_token_features, tokenize

CAPTIONS = [
    "a man opens the fridge and takes out a bottle of milk",
    "the woman laughs after the dog jumps onto the sofa",
    "two people shake hands in front of the office building",
    "someone pours water into a glass on the kitchen table",
]


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (the whole machine's memory elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def eot_features(clip: torch.nn.Module, text_ids: torch.Tensor) -> torch.Tensor:
    """The query embedding of each caption: the last-layer feature at its EOT token."""
    features = text_token_features(clip, text_ids)
    return features[torch.arange(text_ids.shape[0]), text_ids.argmax(dim=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--units", type=int, nargs="+", default=[1, 42], help="vectors cached per video")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--query-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0)
    parser.add_argument("--text-encoder", choices=["clip-b32", "none"], default="clip-b32")
    args = parser.parse_args()

    device = resolve_device(args.device)
    scoring = ScoringConfig(memory_budget_mb=args.memory_budget_mb, device=str(device))
    captions = (CAPTIONS * args.query_batch)[: args.query_batch]
    encode_queries = None
    if args.text_encoder == "clip-b32":
        torch.manual_seed(0)
        clip = ClipArch(embed_dim=args.dim).build().to(device).eval()
        total = parameter_counts(clip)["params_total"]
        print(f"query encoder: the text tower of a CLIP ViT-B/32 ({total:,} parameters in the whole CLIP)")
        encode_queries = functools.partial(eot_features, clip, tokenize(captions, 32).to(device))
    queries = torch.randn(args.query_batch, args.dim, device=device)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, query batch {args.query_batch}, "
        f"median of {args.repeats} runs after a warm-up, top 100 videos per query"
    )
    print(f"{'units':>5} {'KiB/video':>9} {'videos':>7} {'matching ms/query':>18} {'total ms/query':>15}")
    for units in args.units:
        per_video = bytes_per_video((units, args.dim), torch.float32)
        for size in args.sizes:
            if device.type == "cpu" and size * per_video > available_bytes() - 4 * 2**30:
                print(f"{units:>5} {per_video / 1024:>9.1f} {size:>7} skipped: corpus + 4 GiB exceed the free memory")
                continue
            config = EfficiencyConfig(corpus_sizes=(size,), repeats=args.repeats)
            result = probe_latency(
                queries, (units, args.dim), torch.float32, config, scoring, encode_queries=encode_queries
            )
            matching = result["matching_ms_per_query"][str(size)]
            total = result.get("total_ms_per_query", {}).get(str(size), float("nan"))
            print(f"{units:>5} {per_video / 1024:>9.1f} {size:>7} {matching:>18.3f} {total:>15.3f}", flush=True)


if __name__ == "__main__":
    main()
