"""Progress bars: a process killed while it draws one does not hang the bars of the process that forked it."""
from __future__ import annotations

import multiprocessing
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
