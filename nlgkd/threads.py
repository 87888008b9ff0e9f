"""How many threads torch uses on a CPU: the cores free right now, shared by this machine's processes.

torch's default is one thread per core. A multi-threaded step whose threads wait on each other slows down
several-fold when another job holds one of those cores: on a 2-core VM a training step went from ~0.1 s
with one thread to 3.8-5.4 s with two beside another job. So a CPU run takes

    threads = max(1, min(cores // P, free cores // P))

P: the processes of this run on this machine (LOCAL_WORLD_SIZE, set by torchrun and accelerate launch);
free cores: the cores this process may use (its CPU affinity) minus the tasks other programs have running
now (/proc/loadavg's runnable count, sampled a few times; Linux only, elsewhere every core counts as free).
The runnable count is the whole machine's: a container pinned to a few idle cores of a busy host sees the
host's load and takes fewer threads than it could (set OMP_NUM_THREADS there).
OMP_NUM_THREADS, when set, wins: torch read it already, and nothing here changes it.

The thread count changes speed and can change the last digits of results: a sum split over threads adds
in another order (4M float32 numbers summed with 1, 2 and 4 threads differ in the 6th significant digit).
The demo's scores were identical to the digit with 1 and 2 threads, but a run that must repeat bit for bit
sets OMP_NUM_THREADS; `stage.json` records the count (`cpu_threads`).
"""
from __future__ import annotations

import os
import statistics
import time


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores_now(samples: int = 5, interval_s: float = 0.02) -> float | None:
    """Tasks of other programs running right now (the median of a few samples), or None where unknown."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)  # this process reading the file is one of them
        if i + 1 < samples:
            time.sleep(interval_s)
    return statistics.median(counts)


def choose_cpu_threads() -> tuple[int, str]:
    """(threads, why): the torch thread count for this process, and the sentence that explains it."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = usable_cores()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    busy = busy_cores_now()
    free = cores if busy is None else max(0, cores - round(busy))
    threads = max(1, min(cores // processes, free // processes))
    why = f"{cores} core{'s' if cores != 1 else ''}"
    if busy is not None:
        why += f", {round(busy)} busy with other work" if round(busy) else ", none busy with other work"
    if processes > 1:
        why += f", {processes} processes of this run"
    return threads, why


def set_cpu_threads() -> str:
    """Set torch's thread count for a CPU run; the line to print."""
    import torch

    threads, why = choose_cpu_threads()
    if why != "OMP_NUM_THREADS":
        torch.set_num_threads(threads)
        return (f"torch uses {threads} CPU thread{'s' if threads != 1 else ''} ({why}); OMP_NUM_THREADS=N "
                "chooses another count")
    return f"torch uses {torch.get_num_threads()} CPU thread(s), from OMP_NUM_THREADS"
