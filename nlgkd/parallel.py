"""`nlgkd run --jobs N`: run independent stages at the same time, each in a process of its own.

Small students leave a GPU mostly idle (a 20 M-parameter model's step is bound by kernel launches and
Python), and a study recipe has many stages that only share their inputs: the variants of one study stage,
the pseudo-target stages, the students of different seeds. Run one after another they take hours of a
GPU that is 80% idle; run N at a time they overlap. The scheduler starts every stage whose inputs have
finished, in recipe order, at most N at once; each runs as `nlgkd run RECIPE --stage KEY` in its own process
(its own CUDA context and accelerator), writes its log to `runs/<recipe>/logs/<stage>.log`, and the scheduler
waits for it. A stage with the same fingerprint as an earlier one waits for that one and copies its artifact,
as in a sequential run. When a stage fails, nothing new starts, the running ones finish, and the error names
the stage and ends with its log.

Results are the same as a sequential run's: every stage is the same computation with the same seed (a test
compares the weights). What the processes share is the machine: on a CPU each child gets
`OMP_NUM_THREADS = cores // N` unless the variable is set.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

from .config import Stage

from .recipe import references


class Handle(Protocol):
    def poll(self) -> int | None: ...  # the exit code once the process has ended, else None


def stage_dependencies(runner, to_run: list[Stage]) -> dict[str, set[str]]:
    """key -> keys among `to_run` it must wait for: the stages it reads, and an earlier stage with the same
    fingerprint (whose artifact it will copy instead of computing it again)."""
    keys = {stage.key for stage in to_run}
    deps: dict[str, set[str]] = {}
    for i, stage in enumerate(to_run):
        found = set()
        for _, _, name in references(stage.config):
            kind, target = runner.recipe.resolve(name, stage.index)
            if kind == "stage" and target.key in keys:
                found.add(target.key)
        for earlier in to_run[:i]:
            if earlier.kind == stage.kind and runner.fingerprint(earlier) == runner.fingerprint(stage):
                found.add(earlier.key)
                break
        deps[stage.key] = found
    return deps


def run_in_parallel(runner, plan: list[tuple[Stage, str]], jobs: int, start: Callable[[str], Handle],
                    poll_seconds: float = 0.5) -> dict[str, str]:
    """Run the plan's 'run' stages, at most `jobs` at a time; `start(key)` launches one. Returns key ->
    'ran' | 'reused' | 'skipped' | 'waiting' (as `Runner.run`). Raises StageError when a stage fails."""
    with runner.locked():
        # the children are part of this run: they do not take the run directory's lock (Runner.locked)
        os.environ["NLGKD_LOCK_OWNER"] = str(os.getpid())
        try:
            return _run_in_parallel(runner, plan, jobs, start, poll_seconds)
        finally:
            del os.environ["NLGKD_LOCK_OWNER"]


def _run_in_parallel(runner, plan, jobs, start, poll_seconds) -> dict[str, str]:
    from .runner import StageError

    to_run = [stage for stage, action in plan if action == "run"]
    outcome = {stage.key: {"skip": "skipped", "wait": "waiting"}[action] for stage, action in plan
               if action in ("skip", "wait")}
    for stage, action in plan:
        if action == "skip":
            runner.say_skipped(stage)
    deps = stage_dependencies(runner, to_run)
    pending = [stage.key for stage in to_run]
    running: dict[str, tuple[Handle, float]] = {}
    finished: set[str] = set()
    failed: tuple[str, int] | None = None
    try:
        while pending or running:
            while failed is None and len(running) < jobs:
                ready = next((key for key in pending if deps[key] <= finished), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[ready] = (start(ready), time.time())
                runner.say(f"[{ready}] started ({len(running)} running, {len(pending)} waiting); "
                           f"log: {log_path(runner, ready)}")
            if failed is not None and not running:
                break
            time.sleep(poll_seconds)
            for key, (handle, started) in list(running.items()):
                code = handle.poll()
                if code is None:
                    continue
                del running[key]
                if code == 0:
                    finished.add(key)
                    record = runner.stage_record(next(s for s in to_run if s.key == key)) or {}
                    outcome[key] = "reused" if record.get("reused_from") else "ran"
                    runner.say(f"[{key}] finished in {time.time() - started:.1f} s")
                else:
                    failed = failed or (key, code)
                    runner.say(f"[{key}] failed (exit {code})" + ("; waiting for the running stages to end"
                                                                  if running else ""))
    except KeyboardInterrupt:
        for handle, _ in running.values():
            terminate = getattr(handle, "terminate", None) or getattr(handle, "kill", None)
            if terminate is not None:
                terminate()
        raise
    if failed is not None:
        key, code = failed
        log = log_path(runner, key)
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]) if log.exists() else ""
        raise StageError(f"stage {key!r} failed (exit {code}) in its own process; its log {log} ends:\n{tail}"
                         f"(stages that need it did not start; fix the cause and re-run: finished stages are kept)")
    return outcome


def log_path(runner, key: str) -> Path:
    return runner.run_dir / "logs" / f"{key}.log"


def subprocess_starter(runner, recipe_path: str, runs_dir: str, overrides: list[str], force: bool,
                       jobs: int) -> Callable[[str], Handle]:
    """`start(key)` for the CLI: `python -m nlgkd run RECIPE --stage KEY` with the same overrides, its output
    into the stage's log file."""
    import subprocess

    extra = {"PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in os.environ:
        extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        extra["TOKENIZERS_PARALLELISM"] = "false"

    def start(key: str) -> Handle:
        command = [sys.executable, "-m", "nlgkd", "run", recipe_path, "--stage", key, "--runs-dir", runs_dir]
        for assignment in overrides:
            command += ["--set", assignment]
        if force:
            command.append("--force")
        log = log_path(runner, key)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(json.dumps({"command": command}) + "\n")
            out.flush()
            # the environment as it is now: run_in_parallel has named itself the lock's owner
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **extra},
                                    preexec_fn=die_with_parent)

    return start


def die_with_parent() -> None:
    """Run in a `--jobs` child before it starts: Linux kills it (SIGKILL) when the `nlgkd run` that started it
    dies, so a killed run leaves no stage writing on without the run directory's lock. Elsewhere the child's own
    check (`Runner.locked`: its starter is gone) stops it when it next takes the lock."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
