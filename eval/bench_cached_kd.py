"""Benchmark: a KD epoch from a cached top-k teacher vs a cross-entropy epoch vs online KD, side by side
in one run on the demo task, with the students' test BLEU after the same steps.

    python eval/bench_cached_kd.py [--top-k 32] [--epochs 1] [--runs-dir runs]

Targets: cached KD epoch <= 1.15 x cross-entropy epoch (no teacher forward at all); online KD pays a
teacher forward per step. Training time excludes validation (`train_seconds` in stage.json).
"""
from __future__ import annotations

import argparse
import json

from common import demo_with, stage_record, train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    common = {"kind": "distill", "student": "student", "epochs": args.epochs, "batch_size": 32, "lr": 1e-3,
              "eval_samples": 0, "eval_every": 100000, "save_every": None, "seed": 1}
    stages = [
        {"name": "bench_cache", "kind": "cache_logits", "teacher": "teacher", "top_k": args.top_k},
        {"name": "bench_ce", **common, "objective": "finetune"},
        {"name": "bench_kd_cached", **common, "cached_teacher": "bench_cache"},
        {"name": "bench_kd_online", **common, "teacher": "teacher", "objective": "logits_kd"},
        {"name": "bench_eval", "kind": "evaluate", "models": ["bench_ce", "bench_kd_cached", "bench_kd_online"],
         "decoding": {"batch_size": 64}},
    ]
    runner = demo_with(stages, runs_dir=args.runs_dir, overrides=[])
    seconds = {name: train_seconds(runner, name) for name in ("bench_ce", "bench_kd_cached", "bench_kd_online")}
    bleu = stage_record(runner, "bench_eval")["metrics"]
    cache = stage_record(runner, "bench_cache")
    print(f"\ncache: top-{args.top_k}, {cache['cache']['tokens']} tokens, made in {cache['wall_seconds']:.1f}s")
    print(f"{'student':18s} {'train s/epoch':>14s} {'test BLEU':>10s}")
    for name, secs in seconds.items():
        print(f"{name:18s} {secs / args.epochs:14.2f} {bleu[name]['bleu']:10.2f}")
    print(f"\ncached KD / CE epoch:     {seconds['bench_kd_cached'] / seconds['bench_ce']:.3f}  (target <= 1.15)")
    print(f"online KD / CE epoch:     {seconds['bench_kd_online'] / seconds['bench_ce']:.3f}")
    print(f"cached KD / online KD:    {seconds['bench_kd_cached'] / seconds['bench_kd_online']:.3f}")
    print(json.dumps({"seconds": seconds, "bleu": {k: v["bleu"] for k, v in bleu.items()}}))


if __name__ == "__main__":
    main()
