"""The demo's claim over seeds: `recipes/demo.yaml` run once per seed (the seed changes the demo data, the
initialization, the batches and the sampled pseudo-targets), then its test BLEU per model, the distilled
student's gain over the cross-entropy student, and its share of the teacher, as mean ± sd.

    python eval/demo_seeds.py                       # seeds 0 1 2, runs in runs/demo-seed0, -seed1, -seed2
    python eval/demo_seeds.py --seeds 0 1 2 3 4 --runs-dir /tmp/runs

Each seed is a plain `nlgkd run recipes/demo.yaml --set seed=N --set name=demo-seedN`; a finished seed is
skipped like any finished run. Wall time and CPU time (user + sys, of the nlgkd processes) are printed per
seed: this project's 2-core VM stalls now and then, so CPU seconds are the steadier measure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, recipe: Path, runs_dir: Path) -> dict:
    name = f"{recipe.stem}-seed{seed}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    subprocess.run([sys.executable, "-m", "nlgkd", "run", str(recipe), "--runs-dir", str(runs_dir),
                    "--set", f"seed={seed}", "--set", f"name={name}"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = json.loads((runs_dir / name / "eval" / "metrics.json").read_text())
    return {"seed": seed, "wall_s": time.time() - started,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "bleu": {model: values["bleu"] for model, values in metrics.items()}}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    parser.add_argument("--runs-dir", default=os.environ.get("NLGKD_RUNS_DIR", "runs"))
    args = parser.parse_args()
    results = [run_seed(seed, Path(args.recipe), Path(args.runs_dir)) for seed in args.seeds]

    models = list(results[0]["bleu"])
    print("\nTest BLEU (greedy) per seed; gain = distill - student_ft; share = distill / teacher")
    print(f"{'seed':>4}  " + "  ".join(f"{m:>20}" for m in models) + f"  {'gain':>6}  {'share':>6}  {'wall s':>7}  "
          f"{'CPU s':>7}")
    for r in results:
        b = r["bleu"]
        print(f"{r['seed']:>4}  " + "  ".join(f"{b[m]:>20.2f}" for m in models)
              + f"  {b['distill'] - b['student_ft']:>+6.2f}  {100 * b['distill'] / b['teacher']:>5.1f}%"
              + f"  {r['wall_s']:>7.0f}  {r['cpu_s']:>7.0f}")
    gains = [r["bleu"]["distill"] - r["bleu"]["student_ft"] for r in results]
    shares = [100 * r["bleu"]["distill"] / r["bleu"]["teacher"] for r in results]
    print("mean  " + "  ".join(f"{mean_sd([r['bleu'][m] for r in results]):>20}" for m in models)
          + f"  {mean_sd(gains):>6}  {mean_sd(shares)}%")
    print(f"wall {mean_sd([r['wall_s'] for r in results])} s, CPU {mean_sd([r['cpu_s'] for r in results])} s per seed")


if __name__ == "__main__":
    main()
