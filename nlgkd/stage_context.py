"""The stage context: everything a stage function reaches of the run (its config, the recipe, the accelerator,
the data, earlier artifacts and models, logging) through one small object; no stage touches the runner."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import Recipe, Stage


class StageError(RuntimeError):
    """A stage cannot run (missing input, bad data...); the message says which stage and what to do."""


def on_main_process(accelerator, work: Callable[[], None]) -> None:
    """Run `work` on the main process while the others wait. If it fails there, every process raises: the
    others would otherwise learn only that a peer vanished, or wait at the next barrier until the collective
    timed out."""
    from .generation import gather_objects

    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as err:  # re-raised below, once the other processes know
            error = err
    failures = [f for f in gather_objects(accelerator, None if error is None else f"{type(error).__name__}: {error}")
                if f is not None]
    if error is not None:
        raise error
    if failures:
        raise ValueError(f"the main process failed: {failures[0]}")


@dataclass
class StageContext:
    """What a stage function gets: its config, where to write, and how to reach earlier artifacts."""

    runner: Any  # the Runner that made this context (not imported: the runner imports this module)
    stage: Stage
    out_dir: Path  # the temporary folder that becomes runs/<recipe>/<stage>/ on success
    fingerprint: str
    info: dict = field(default_factory=dict)  # stage-specific facts for stage.json

    @property
    def config(self):
        return self.stage.config

    @property
    def recipe(self) -> Recipe:
        return self.runner.recipe

    @property
    def accelerator(self):
        return self.runner.accelerator

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def log(self, message: str) -> None:
        """A line on the main process, above any progress bar (tqdm.write), never glued to one."""
        if self.accelerator.is_main_process:
            from .progress import write_above_bars

            write_above_bars(f"[{self.stage.key}] {message}")

    def on_main_process(self, work: Callable[[], None]) -> None:
        on_main_process(self.accelerator, work)

    def data(self):
        return self.runner.data()

    def data_report(self) -> dict:
        """What loading did to the splits (sizes, dropped rows), for stage.json."""
        return self.runner.data_report()

    @property
    def run_dir(self) -> Path:
        return self.runner.run_dir

    @functools.cached_property
    def teacher_users(self) -> list[str]:
        """Keys of the later stages that learn from this stage's model as a teacher (found once per stage)."""
        return self.runner.teacher_users(self.stage)

    def reference_fingerprint(self, name: str) -> str:
        """The fingerprint of what `name` means from this stage (an earlier stage or a models: entry)."""
        return self.runner.reference_fingerprint(name, self.stage.index)

    def artifact_dir(self, name: str) -> Path:
        """Folder of the earlier stage `name` refers to from this stage."""
        kind, target = self.recipe.resolve(name, before=self.stage.index)
        if kind != "stage":
            raise StageError(f"{name!r} is a models: entry, not a stage artifact")
        return self.runner.finished_dir(target)

    def load_model(self, name: str):
        """(model, tokenizer) for a models: entry or an earlier stage's model, on the CPU."""
        return self.runner.load_model(name, before=self.stage.index)
