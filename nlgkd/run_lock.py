"""The run directory's lock: one `nlgkd run` at a time on runs/<recipe>/, refused at once with the holder named.

The lock is an flock on runs/<recipe>/.lock, so the system drops it when its process ends, killed or not. The
processes of one run do not lock against each other: only the main process of a torchrun/accelerate launch
takes it, and `--jobs` children inherit their parent's (NLGKD_LOCK_OWNER)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .stage_context import StageError


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, command: str, check_writable: Callable[[], None]):
    """Hold `run_dir` while the block runs; `command` is written into the lock file for whoever is refused."""
    owner = os.environ.get("NLGKD_LOCK_OWNER")
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) != 0 or owner == str(os.getppid()):
        yield
        return
    if owner is not None:  # started by `--jobs`, whose process has died: its lock went with it
        raise StageError(f"the `nlgkd run --jobs` that started this stage (process {owner}) is gone, and with it "
                         "the run directory's lock; this stage stops (run the recipe again to finish it)")
    check_writable()
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        handle.close()
        raise StageError(
            f"{run_dir} is in use by process {holder.get('pid', '?')} "
            f"(`{holder.get('command', 'nlgkd run')}`, started {holder.get('started', '?')}); wait for it to end, "
            "stop it, or give this run another --runs-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "command": command,
                             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
