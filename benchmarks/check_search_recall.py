"""Done-when check of search: `index` + `search` with a trained model find each caption's video in their top 10 as
often as `evaluate` says (the same model's R@10 on the same videos), with the model's own windows; captions ranked
differently are listed with the score gap that decided them (fp16 storage of the units can swap near-ties).

    PYTHONPATH=. python benchmarks/check_search_recall.py                    # ProPy on the synthetic test split
    PYTHONPATH=. python benchmarks/check_search_recall.py --model msl        # any evaluated model

It runs the real commands: the split's videos are hard-linked into a temporary folder, `python pipeline.py index`
indexes them with the trained model, `python pipeline.py search --queries` searches every caption of the split
(top TOP_K), and the share of captions whose video is in the top 1, 5 and 10 is printed beside R1, R5 and R10 of
`metrics/<dataset>/<model>.json` (written by `python pipeline.py evaluate`), then every caption whose rank differs
from that file's per-query rank (`ranks`). For ProPy it also checks that every
result's window is one of the pyramid's event windows scaled to the video's duration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from stages.data.schema import read_queries
from stages.search.index import read_manifest
from stages.search.models import ModelChoice, PropySearchModel, load_search_model
from stages.search.store import UnitStore

REPO = Path(__file__).resolve().parents[1]
TOP_K = 20  # results per caption: ranks up to 20 are compared with evaluate's


def pipeline(*args: str) -> str:
    """Run `python pipeline.py ARGS` (stderr shown), return its stdout."""
    command = [sys.executable, str(REPO / "pipeline.py"), *args]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO).stdout


def link_videos(video_ids: list[str], source: Path, target: Path, extension: str) -> None:
    target.mkdir(parents=True)
    for video_id in video_ids:
        path = source / f"{video_id}.{extension}"
        try:
            os.link(path, target / path.name)
        except OSError:  # another file system
            shutil.copy2(path, target / path.name)


def window_share(index: Path, results: list[dict]) -> float:
    """Share of results whose [start, end] is a ProPy event window times the video's duration (1.0 expected)."""
    model = load_search_model(ModelChoice.from_dict(read_manifest(index)["model"], f"{index}/index.json:model"), "cpu")
    if not isinstance(model, PropySearchModel):
        return float("nan")
    windows = model.encoder.unit_windows.numpy()
    durations = {record.video_id: record.duration for record in UnitStore.open(index / "store").videos}
    hits = [
        np.abs(windows * durations[r["video_id"]] - [r["start"], r["end"]]).max(axis=1).min() < 2e-3
        for query in results
        for r in query["results"]
    ]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="propy")
    parser.add_argument("--split", default="test")
    parser.add_argument("--annotations", default="cache/synthetic/annotations.jsonl")
    parser.add_argument("--videos", default="data/synthetic/videos", help="the dataset's video folder")
    parser.add_argument("--extension", default="mp4")
    parser.add_argument("--metrics", default=None, help="default: metrics/synthetic/<model>.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes")
    args = parser.parse_args()
    metrics = json.loads(Path(args.metrics or f"metrics/synthetic/{args.model}.json").read_text())
    if metrics["split"] != args.split:
        raise SystemExit(f"the metrics file scores split {metrics['split']!r}, not {args.split!r}")
    queries = read_queries(args.annotations, args.split)
    video_ids = sorted({q.video_id for q in queries})
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="check_search_") as work:
        work = Path(work)
        link_videos(video_ids, Path(args.videos), work / "videos", args.extension)
        common = ("--params", args.params)
        print(pipeline(*common, "index", str(work / "videos"), "--model", args.model, "--out", str(work / "index")))
        (work / "captions.txt").write_text("".join(q.query.replace("\n", " ") + "\n" for q in queries))
        found = pipeline(
            *common, "search", str(work / "index"), "--queries", str(work / "captions.txt"), "--top-k", str(TOP_K)
        )
        results = [json.loads(line) for line in found.splitlines()]
        share = window_share(work / "index", results)
    if len(results) != len(queries):
        raise SystemExit(f"{len(results)} result lines for {len(queries)} captions")
    ranks, differences = [], []
    for query, result, expected in zip(queries, results, metrics["ranks"], strict=True):
        ids = [hit["video_id"] for hit in result["results"]]
        rank = ids.index(query.video_id) + 1 if query.video_id in ids else TOP_K + 1
        ranks.append(rank)
        if rank != expected and min(rank, expected) <= TOP_K:
            scores = [hit["score"] for hit in result["results"]]
            gap = abs(scores[rank - 1] - scores[expected - 1]) if max(rank, expected) <= TOP_K else float("nan")
            differences.append((query.query_id, expected, rank, gap))
    ranks = np.array(ranks)
    print(f"{args.model}, split {args.split}: {len(queries)} captions, {len(video_ids)} videos")
    print(f"{'':>10} {'search':>8} {'evaluate':>9}")
    for k in (1, 5, 10):
        print(f"{f'R@{k}':>10} {100 * np.mean(ranks <= k):>8.2f} {metrics[f'R{k}']:>9.2f}")
    print(f"captions ranked differently from evaluate (ranks <= {TOP_K}): {len(differences)}")
    for query_id, expected, rank, gap in differences:
        print(f"  {query_id}: evaluate rank {expected}, search rank {rank}, score gap {gap:.2e}")
    if not np.isnan(share):
        print(f"results whose window is a ProPy event window x duration: {100 * share:.1f} %")


if __name__ == "__main__":
    main()
