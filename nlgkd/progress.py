"""Progress bars that cannot hang a process: every nlgkd bar comes from `progress_bar`.

tqdm guards its console writes with a lock that, by default, includes a multiprocessing lock shared with every
process forked after the first bar was made. A forked process killed while it draws a bar (SIGKILL, a dying
machine) leaves that lock taken, and the next bar in the parent, nlgkd's own or the `Map` bar `datasets` makes
while tokenizing, waits for it forever (the suite hung so in `test_killed_run_resumes_to_the_same_pts`). nlgkd's
processes never draw into one console together (`--jobs` children and `accelerate launch` ranks are separate
programs; only the main process shows bars), so a lock private to each process is all a bar needs: a thread lock,
made anew in a forked child, and no monitor thread that could hold it at the moment of a fork.

Off a terminal (stderr into a file, a CI log, `nohup`), a bar redraws itself with carriage returns, which a file
keeps as one ever-growing line. There each bar writes a whole line instead, at most one a minute
(OFF_TERMINAL_INTERVAL), with the same numbers, and a bar that stays (leave=True) its final state.
"""
from __future__ import annotations

import os
import sys
import threading

from tqdm.auto import tqdm

_installed = False
OFF_TERMINAL_INTERVAL = 60.0  # seconds between a bar's lines when stderr is not a terminal


def _fresh_lock() -> None:
    """Give tqdm's bar classes a new process-private lock (also the ones that made a lock of their own)."""
    from tqdm import std

    lock = threading.RLock()
    classes, seen = [std.tqdm], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if cls is std.tqdm or "_lock" in vars(cls):  # a subclass that made its own before this ran
            cls.set_lock(lock)
        classes.extend(cls.__subclasses__())


def use_process_private_progress_lock() -> None:
    """Make every tqdm bar in this process (nlgkd's, datasets', transformers') lock with a thread lock of this
    process only; a forked child gets a fresh one. Idempotent; called by `progress_bar` and the CLI."""
    global _installed
    if _installed:
        return
    from tqdm import std

    std.tqdm.monitor_interval = 0  # the monitor thread takes the lock; a fork while it holds it hangs the child
    _fresh_lock()
    os.register_at_fork(after_in_child=_fresh_lock)
    _installed = True


class WholeLines:
    """tqdm's output file off a terminal: every redraw becomes one line. tqdm starts each redraw with a carriage
    return to draw over the last one, and blanks a bar that does not stay (leave=False) with spaces; both are
    dropped here."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def on_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar (same arguments) whose lock no other process can hold; off a terminal, one line a minute."""
    use_process_private_progress_lock()
    if "file" not in kwargs and not on_terminal(sys.stderr):
        kwargs["file"] = WholeLines(sys.stderr)
        kwargs.setdefault("mininterval", OFF_TERMINAL_INTERVAL)
    return tqdm(**kwargs)


def write_above_bars(line: str) -> None:
    """Print a line above any open bar (tqdm.write), never glued to one."""
    use_process_private_progress_lock()
    tqdm.write(line)
