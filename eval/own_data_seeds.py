"""A recipe's claim over seeds, from runs laid out as `eval/own_data_cpu.sh` leaves them (RUNS_DIR/seedN/NAME):
per seed, the test BLEU of the cross-entropy student (`--baseline`, default student_ft) and of the student that
claims the gain (`--system`, default best: the own-data template's choice on validation, with the candidate that
won and the validation scores it was chosen on); the teacher's convergence and its lead over the cross-entropy
student (the distill stage's check); the gain as mean ± sd and by paired bootstrap with the seeds pooled; the
seconds every stage took.

    python eval/own_data_seeds.py runs/own_data_cpu            # reads runs/own_data_cpu/seed0/own_data, seed1, ...
    python eval/own_data_seeds.py runs/own_data_cpu --name my_task
    python eval/own_data_seeds.py /tmp/api_seeds --name api_teacher --system distill
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from paired_test import paired_bleu, read_predictions


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def seed_row(run: Path, system: str) -> dict:
    """One seed's numbers: test BLEU per evaluated model, the choice (when `system` is a select stage), the
    teacher lead of each distill candidate."""
    metrics = read_json(run / "eval" / "metrics.json")
    select = read_json(run / system / "stage.json").get("select", {"chosen": "-", "scores": {}})
    leads = {}
    for stage_json in sorted(run.glob("distill*/stage.json")):
        lead = read_json(stage_json).get("teacher_lead", {})
        leads[stage_json.parent.name] = lead.get("lead")
    return {"bleu": {model: values["bleu"] for model, values in metrics.items()}, "chosen": select["chosen"],
            "validation": select["scores"], "leads": leads}


def stage_seconds(runs: list[Path]) -> list[tuple[str, float, float]]:
    """(run/stage, wall seconds, CPU seconds) of every stage that ran in these folders (copied stages once)."""
    rows, seen = [], set()
    for run in runs:
        for stage_json in sorted(run.glob("*/stage.json"), key=lambda p: read_json(p).get("started", "")):
            info = read_json(stage_json)
            if info.get("fingerprint") in seen:
                continue
            seen.add(info.get("fingerprint"))
            rows.append((f"{run.parent.name}/{stage_json.parent.name}", info.get("wall_seconds", 0.0),
                         info.get("cpu_seconds", 0.0)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="eval/own_data_cpu.sh's RUNS_DIR (holding seed0, seed1, ...)")
    parser.add_argument("--name", default="own_data", help="the recipe's name: (its run folder in each seed)")
    parser.add_argument("--baseline", default="student_ft", help="the cross-entropy student's row")
    parser.add_argument("--system", default="best", help="the row that claims the gain")
    args = parser.parse_args()
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)
    runs = [p / args.name for p in sorted(args.runs_dir.glob("seed*")) if (p / args.name / "eval").is_dir()]
    if not runs:
        raise SystemExit(f"{args.runs_dir}: no seed*/{args.name}/eval folder yet; run eval/own_data_cpu.sh first")

    base_name, system_name = args.baseline, args.system
    teacher, name = read_json(runs[0] / "teacher" / "stage.json"), "teacher"
    chosen = teacher.get("select", {}).get("chosen")
    if chosen:  # the template's teacher is a select stage: the convergence is the chosen candidate's
        teacher, name = read_json(runs[0] / chosen / "stage.json"), f"teacher (= {chosen})"
    print(f"{name}: convergence {json.dumps(teacher.get('convergence'))}")
    rows = [seed_row(run, system_name) for run in runs]
    print(f"\nTest BLEU per seed (the eval stage's decoding); gain = {system_name} - {base_name}; "
          f"lead = teacher - {base_name} on validation (distill's check)")
    print(f"| seed | teacher | {base_name} | {system_name} | gain | chosen | validation BLEU of the candidates | lead |")
    print("|---|---|---|---|---|---|---|---|")
    for run, row in zip(runs, rows):
        b = row["bleu"]
        validation = ", ".join(f"{k} {v:.2f}" for k, v in row["validation"].items()) or "-"
        leads = ", ".join(f"{v:+.2f}" for v in row["leads"].values() if v is not None) or "-"
        print(f"| {run.parent.name} | {b['teacher']:.2f} | {b[base_name]:.2f} | {b[system_name]:.2f} | "
              f"{b[system_name] - b[base_name]:+.2f} | {row['chosen']} | {validation} | {leads} |")
    gains = [r["bleu"][system_name] - r["bleu"][base_name] for r in rows]
    print(f"| mean ± sd | {mean_sd([r['bleu']['teacher'] for r in rows])} | "
          f"{mean_sd([r['bleu'][base_name] for r in rows])} | {mean_sd([r['bleu'][system_name] for r in rows])} | "
          f"{mean_sd(gains)} | | | |")

    baseline, system, references = [], [], None
    for run in runs:
        base, references = read_predictions(run / "eval" / "predictions" / f"{base_name}.jsonl")
        baseline.append(base)
        system.append(read_predictions(run / "eval" / "predictions" / f"{system_name}.jsonl")[0])
    pooled = paired_bleu(baseline, system, references)
    print(f"\npooled over {len(runs)} seeds (paired bootstrap over the test records): gain {pooled['gain']:+.2f}, "
          f"95% interval [{pooled['gain_low']:+.2f}, {pooled['gain_high']:+.2f}], p (not better) "
          f"{pooled['p_value']:.3f}")

    print("\n| stage | wall s | CPU s |\n|---|---|---|")
    seconds = stage_seconds(runs)
    for name, wall, cpu in seconds:
        print(f"| {name} | {wall:.0f} | {cpu:.0f} |")
    print(f"| all | {sum(s[1] for s in seconds):.0f} | {sum(s[2] for s in seconds):.0f} |")


if __name__ == "__main__":
    main()
