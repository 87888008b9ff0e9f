"""Progress bars: a process killed while it draws one does not hang the bars of the process that forked it."""
from __future__ import annotations

import io
import multiprocessing
import sys
import threading
import time

from tqdm.auto import tqdm

from nlgkd.progress import progress_bar


def _draw_forever(drawing) -> None:
    tqdm.get_lock().acquire()  # as a bar does while it writes its line
    drawing.set()
    time.sleep(120)


def test_a_forked_process_killed_while_drawing_a_bar_does_not_hang_the_next_bar():
    import datasets

    progress_bar(total=1, desc="before the fork", disable=True).close()  # bars exist before the fork, as in a run
    fork = multiprocessing.get_context("fork")
    drawing = fork.Event()
    child = fork.Process(target=_draw_forever, args=(drawing,), daemon=True)
    child.start()
    assert drawing.wait(60)
    child.kill()  # SIGKILL with the lock taken: no cleanup releases it
    child.join()

    finished = threading.Event()

    def next_bars():
        progress_bar(total=1, desc="after", disable=True).close()
        datasets.Dataset.from_dict({"x": [1, 2]}).map(lambda row: row)  # datasets' Map bar takes the lock too
        finished.set()

    threading.Thread(target=next_bars, daemon=True).start()
    assert finished.wait(30), "a bar after the killed child waits for the lock the child took"


class NotATerminal(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_off_a_terminal_each_redraw_is_one_whole_line(monkeypatch):
    """stderr into a file: no carriage returns, every line a complete bar with its numbers, the postfix kept."""
    stderr = NotATerminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = progress_bar(total=5, desc="train", mininterval=0)
    for step in range(5):
        bar.update(1)
        bar.set_postfix(loss=f"{step:.4f}", refresh=False)
    bar.close()
    text = stderr.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("train:") and "0/5" in lines[0]
    assert lines[-1].startswith("train: 100%") and "5/5" in lines[-1] and "loss=4.0000" in lines[-1]
    assert all(line.startswith("train:") for line in lines)


def test_off_a_terminal_a_fast_bar_writes_few_lines(monkeypatch):
    """The default interval (a minute) off a terminal: a thousand quick updates give the first and last line."""
    stderr = NotATerminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = progress_bar(total=1000, desc="generate")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(stderr.getvalue().splitlines()) == 2
