"""The torch thread count of a CPU run: the free cores, shared by the run's processes; OMP_NUM_THREADS wins."""
from __future__ import annotations

import json

import pytest
import torch

from nlgkd import threads


@pytest.mark.parametrize("cores, busy, processes, expected", [
    (2, 0, 1, 2),      # an idle 2-core machine: both
    (2, 1, 1, 1),      # another job holds a core: one thread, not two that wait on each other
    (2, 3, 1, 1),      # overloaded: still one
    (16, 4, 1, 12),
    (16, 0, 4, 4),     # torchrun with 4 processes: a quarter each
    (16, 8, 4, 2),
    (2, None, 1, 2),   # no /proc/loadavg: every core counts as free
])
def test_threads_are_the_free_cores_per_process(monkeypatch, cores, busy, processes, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores_now", lambda: busy)
    count, why = threads.choose_cpu_threads()
    assert count == expected
    assert f"{cores} cores" in why


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(threads, "busy_cores_now", lambda: pytest.fail("OMP_NUM_THREADS is set: nothing to measure"))
    assert threads.choose_cpu_threads() == (3, "OMP_NUM_THREADS")


def test_busy_cores_is_the_median_of_the_other_running_tasks_of_proc_loadavg(monkeypatch):
    """/proc/loadavg's fourth field is running/total tasks; the reader itself is one of the running ones."""
    import io

    samples = iter(["0.52 0.58 0.59 3/412 9999\n", "0.52 0.58 0.59 6/412 9999\n", "0.52 0.58 0.59 2/412 9999\n"])

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/loadavg"
        return io.StringIO(next(samples))

    monkeypatch.setattr(threads, "open", fake_open, raising=False)
    assert threads.busy_cores_now(samples=3, interval_s=0.0) == 2  # median of 2, 5 and 1 other tasks
    monkeypatch.setattr(threads, "open", lambda *a, **k: io.StringIO("garbled\n"), raising=False)
    assert threads.busy_cores_now(samples=3, interval_s=0.0) is None  # unreadable: unknown, not zero


def test_a_cpu_run_says_its_thread_count_and_records_it(tmp_path, tiny_recipe, capsys, monkeypatch):
    from nlgkd.recipe import parse_recipe
    from nlgkd.runner import Runner

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "choose_cpu_threads", lambda: (1, "2 cores, 1 busy with other work"))
    before = torch.get_num_threads()
    try:
        tiny_recipe["stages"] = tiny_recipe["stages"][:1]
        Runner(parse_recipe(tiny_recipe), runs_root=tmp_path).run()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "torch uses 1 CPU thread (2 cores, 1 busy with other work); OMP_NUM_THREADS=N chooses" in out
    record = json.loads((tmp_path / tiny_recipe["name"] / "teacher" / "stage.json").read_text())
    assert record["cpu_threads"] == 1
