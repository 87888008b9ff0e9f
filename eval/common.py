"""Shared by the stage benchmarks: run extra stages on top of the demo recipe's trained teacher and
read back what each stage measured. The teacher and pruned student come from `runs/demo` when the demo
ran already (same fingerprints), so a benchmark trains only what it compares."""
from __future__ import annotations

import copy
import json
import tempfile
import time
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


def loop_step_seconds(model, train_data, collate_fn, args, seed: int = 0, on_batch=None) -> list[float]:
    """Seconds per optimizer step of `nlgkd.loop.train` (the loop every training stage runs) on `model`,
    trained in place with cross-entropy for `args.max_steps` steps: the time between two consecutive calls of
    the loss (grad_accum 1: one call per step), so one value fewer than steps; `seed` orders the batches.
    `on_batch(batch)` sees each batch before its step."""
    from accelerate import Accelerator

    from nlgkd.loop import train
    from nlgkd.stages.training import cross_entropy_step

    calls = []

    def timed_loss(model, batch, normalizer):
        calls.append(time.perf_counter())
        if on_batch is not None:
            on_batch(batch)
        return cross_entropy_step(model, batch, normalizer)

    with tempfile.TemporaryDirectory() as out:
        train(model=model, train_data=train_data, collate_fn=collate_fn, compute_loss=timed_loss, evaluate=None,
              args=args, accelerator=Accelerator(cpu=True), out_dir=Path(out), seed=seed,
              log=lambda message: None)
    return [b - a for a, b in zip(calls, calls[1:])]
