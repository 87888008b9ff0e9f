"""eval/gpu_check.sh in SMOKE mode: every part of the GPU check runs on a CPU with tiny sizes, under its time
guard, and the archive holds what a GPU session would bring back. (The real run needs a lent GPU.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 4 minutes alone; the parts' own limits add up to 20
def test_the_gpu_check_runs_every_part_in_smoke_mode(tmp_path):
    from nlgkd.demo_task import make_demo_splits

    data = tmp_path / "data"  # the own-data template's columns (original, modern), the demo task's text
    data.mkdir()
    for split, rows in make_demo_splits({"train": 64, "validation": 12, "test": 12, "unlabeled": 16}, seed=0).items():
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"original": r["source"], **({"modern": r["target"]} if "target" in r else {})}) + "\n"
            for r in rows))
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "eval/gpu_check.sh", str(out), str(data)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1180)
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split()[0] for line in status] == ["kd_step", "mfu", "joint_teaching", "export", "own_data",
                                                            "pt_engine"]
    assert all(" exit=0 " in line for line in status), status + [done.stdout[-3000:]]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = archive.getnames()
    assert "status.txt" in names and "logs/own_data_report.log" in names
    assert "runs/own_data/best/stage.json" in names and "runs/own_data/eval/metrics.json" in names
