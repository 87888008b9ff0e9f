"""Benchmark: the demo's teacher (PyTorch) vs its distilled student (PyTorch) vs that student exported to
CTranslate2 int8, on the same test inputs in one evaluate stage: BLEU and sequences/s side by side.

    python eval/bench_export.py [--runs-dir runs] [--batch-sizes 16,64,256]

It runs the demo recipe (finished stages are reused from RUNS_DIR/demo), then an `export` stage of the
distilled student and, per batch size, an `evaluate` stage of the three (greedy, the median of 3 timed passes
each over the 300 test inputs). Goal
(issue 20): the int8 student >= 10x the PyTorch teacher's throughput at >= 97% of the PyTorch student's BLEU.
Needs the export extra: pip install -e ".[export]".
"""
from __future__ import annotations

import argparse
import json

import yaml

from common import ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--batch-sizes", default="16,64,256")
    parser.add_argument("--quantization", default="int8", help="int8 on a CPU; int8_float16 or float16 on a GPU")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override the demo recipe (eval/gpu_check.sh's SMOKE mode shrinks it)")
    args = parser.parse_args()
    from nlgkd.recipe import parse_recipe
    from nlgkd.runner import Runner

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    raw = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    raw["stages"].append({"name": "distill_int8", "kind": "export", "model": "distill",
                          "quantization": args.quantization})
    for size in sizes:
        raw["stages"].append({"name": f"bench_export_{size}", "kind": "evaluate",
                              "models": ["teacher", "distill", "distill_int8"], "timing_passes": 3,
                              "timing_examples": 10_000,
                              "decoding": {"strategy": "greedy", "batch_size": size, "max_new_tokens": 64}})
    runner = Runner(parse_recipe(raw, source="recipes/demo.yaml", overrides=args.set), runs_root=args.runs_dir)
    runner.run()
    for size in sizes:
        metrics = json.loads((runner.run_dir / f"bench_export_{size}" / "metrics.json").read_text())
        print(f"\nbatch size {size}:")
        for name in ("teacher", "distill", "distill_int8"):
            m = metrics[name]
            print(f"  {name:13s} {m['backend']:17s} BLEU {m['bleu']:6.2f}  {m['seq_per_s']:8.1f} seq/s "
                  f"(±{50 * (m['latency_spread'] or 0):.0f}%)  {m['weights_mb']:6.2f} MB")
        teacher, student, exported = metrics["teacher"], metrics["distill"], metrics["distill_int8"]
        print(f"  {args.quantization} student / PyTorch teacher throughput: {exported['seq_per_s'] / teacher['seq_per_s']:.1f}x "
              "(goal >= 10x)")
        print(f"  int8 student / PyTorch student throughput: {exported['seq_per_s'] / student['seq_per_s']:.1f}x")
        kept = f"{100 * exported['bleu'] / student['bleu']:.1f}%" if student["bleu"] else "n/a (student BLEU 0)"
        print(f"  {args.quantization} student BLEU / PyTorch student BLEU: {kept} (goal >= 97%)")


if __name__ == "__main__":
    main()
