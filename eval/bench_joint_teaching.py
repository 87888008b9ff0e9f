"""Benchmark: step time of Joint-Teaching (student_ratio 0.5) vs plain logits KD, side by side in one run
on the demo task (same student, teacher, data, steps and seed).

    python eval/bench_joint_teaching.py [--steps 60] [--runs-dir runs]

Target: Joint-Teaching step <= 1.5 x plain logits-KD step. A Joint-Teaching student step samples a
prefix with the student (no gradient) before the KD forward; training time excludes validation.
"""
from __future__ import annotations

import argparse
import json

from common import demo_with, stage_record, train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    common = {"kind": "distill", "student": "student", "teacher": "teacher", "objective": "logits_kd",
              "max_steps": args.steps, "batch_size": 32, "lr": 1e-3, "eval_samples": 0, "eval_every": 100000,
              "save_every": None, "seed": 2}
    stages = [
        {"name": "bench_plain_kd", **common},
        {"name": "bench_joint_teaching", **common, "joint_teaching": {"student_ratio": 0.5}},
    ]
    runner = demo_with(stages, runs_dir=args.runs_dir)
    plain = train_seconds(runner, "bench_plain_kd") / args.steps
    joint = train_seconds(runner, "bench_joint_teaching") / args.steps
    jt = stage_record(runner, "bench_joint_teaching")["joint_teaching"]
    print(f"\nplain logits KD:        {1000 * plain:8.1f} ms/step")
    print(f"Joint-Teaching r=0.5:   {1000 * joint:8.1f} ms/step  ({jt['student_steps']} student steps of {args.steps})")
    print(f"ratio:                  {joint / plain:8.3f}  (target <= 1.5)")
    print(json.dumps({"plain_ms": 1000 * plain, "joint_ms": 1000 * joint, "ratio": joint / plain}))


if __name__ == "__main__":
    main()
