"""Benchmark: step time of Joint-Teaching (student_ratio 0.5) vs plain logits KD, side by side in one run
on the demo task (same student, teacher, data, steps and seed): as the study defines it, with sampling ended
once 90% of the samples have (stop_share 0.9), and with that and one sampling call per 4 student steps
(steps_per_draw 4); and, at the study's settings, with the prefixes sampled by a CTranslate2 copy of the student
(float32 and int8) made every 20 optimizer steps (joint_teaching.engine); and with `mix: rows`, every step
both kinds of prefix for half the inputs (16 data rows and the student's 16 prefixes of the same sources, so a
step still trains on 32 rows), each source encoded once.

    python eval/bench_joint_teaching.py [--steps 200] [--runs-dir runs]

Target: a Joint-Teaching step <= 1.3 x a plain logits-KD step. A Joint-Teaching student step samples a
prefix with the student (no gradient) before the KD forward; training time excludes validation. Each stage
ends with one validation (loss and BLEU on 300 records), so a faster variant that learns worse shows it.
"""
from __future__ import annotations

import argparse
import json

from common import demo_with, stage_record, train_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override the demo recipe (eval/gpu_check.sh's SMOKE mode shrinks it)")
    args = parser.parse_args()
    common = {"kind": "distill", "student": "student", "teacher": "teacher", "objective": "logits_kd",
              "max_steps": args.steps, "batch_size": 32, "lr": 1e-3, "eval_samples": 300, "eval_every": args.steps,
              "save_every": None, "seed": 2}
    stages = [
        {"name": "bench_plain_kd", **common},
        {"name": "bench_joint_teaching", **common, "joint_teaching": {"student_ratio": 0.5}},
        {"name": "bench_joint_teaching_share", **common,
         "joint_teaching": {"student_ratio": 0.5, "stop_share": 0.9}},
        {"name": "bench_joint_teaching_k4", **common,
         "joint_teaching": {"student_ratio": 0.5, "stop_share": 0.9, "steps_per_draw": 4}},
        # the study's settings, the prefixes sampled by a CTranslate2 copy of the student made every 20 steps
        {"name": "bench_joint_teaching_engine", **common,
         "joint_teaching": {"student_ratio": 0.5, "engine": "ctranslate2", "engine_refresh_every": 20}},
        {"name": "bench_joint_teaching_engine_int8", **common,
         "joint_teaching": {"student_ratio": 0.5, "engine": "ctranslate2", "engine_refresh_every": 20,
                            "engine_quantization": "int8"}},
        # mix: rows, every step both kinds: 16 inputs and the student's 16 prefixes of them (a step of 32 rows, as
        # above), each source encoded once for both
        {"name": "bench_joint_teaching_rows", **common, "batch_size": 16, "joint_teaching": {"mix": "rows"}},
        {"name": "bench_joint_teaching_rows_engine", **common, "batch_size": 16,
         "joint_teaching": {"mix": "rows", "engine": "ctranslate2", "engine_refresh_every": 20}},
    ]
    runner = demo_with(stages, runs_dir=args.runs_dir, overrides=args.set)
    plain = train_seconds(runner, "bench_plain_kd") / args.steps
    rows = {"plain logits KD": ("bench_plain_kd", plain)}
    for name, label in (("bench_joint_teaching", "Joint-Teaching r=0.5"),
                        ("bench_joint_teaching_share", "  stop_share 0.9"),
                        ("bench_joint_teaching_k4", "  + steps_per_draw 4"),
                        ("bench_joint_teaching_engine", "  engine float32 /20"),
                        ("bench_joint_teaching_engine_int8", "  engine int8 /20"),
                        ("bench_joint_teaching_rows", "mix rows, 16 + 16"),
                        ("bench_joint_teaching_rows_engine", "  + engine float32 /20")):
        rows[label] = (name, train_seconds(runner, name) / args.steps)
    summary = {}
    for label, (name, seconds) in rows.items():
        best = stage_record(runner, name)["train"]["best"]
        print(f"{label:22s} {1000 * seconds:8.1f} ms/step  {seconds / plain:5.2f}x plain   "
              f"val loss {best['val_loss']:.3f}  BLEU {best['bleu']:.2f}")
        summary[name] = {"ms_per_step": 1000 * seconds, "ratio": seconds / plain, "val_loss": best["val_loss"],
                         "bleu": best["bleu"]}
    print("targets: Joint-Teaching <= 1.3x plain logits KD; with engine rollouts at the study's settings <= 1.15x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
