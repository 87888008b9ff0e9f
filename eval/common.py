"""Shared by the stage benchmarks: run extra stages on top of the demo recipe's trained teacher and
read back what each stage measured. The teacher and pruned student come from `runs/demo` when the demo
ran already (same fingerprints), so a benchmark trains only what it compares."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


def demo_with(stages: list[dict], runs_dir: str = "runs", overrides: list[str] = ()) -> Runner:
    """The demo recipe's teacher and student stages followed by `stages`, run; returns the runner."""
    raw = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    keep = [s for s in raw["stages"] if s["name"] in ("teacher", "student")]
    raw["stages"] = keep + copy.deepcopy(stages)
    runner = Runner(parse_recipe(raw, source="recipes/demo.yaml", overrides=list(overrides)), runs_root=runs_dir)
    runner.run()
    return runner


def stage_record(runner: Runner, name: str) -> dict:
    return json.loads((runner.run_dir / name / "stage.json").read_text())


def train_seconds(runner: Runner, name: str) -> float:
    return stage_record(runner, name)["train"]["train_seconds"]
