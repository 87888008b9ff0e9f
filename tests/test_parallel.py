"""`nlgkd run --jobs N` (nlgkd/parallel.py): independent stages in processes of their own give the same
artifacts as a sequential run, respect the inputs' order, copy a same-fingerprint stage, and stop cleanly
when one fails."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nlgkd.parallel import die_with_parent, run_in_parallel, stage_dependencies
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError

from conftest import forked_nlgkd


class ForkedStage:
    """A `Handle` over `nlgkd run --stage KEY` forked from the test process (no fresh interpreter to import)."""

    def __init__(self, process):
        self.process = process
        process.start()

    def poll(self):
        return self.process.exitcode


def forked_starter(recipe_file, root, runner):
    from nlgkd.parallel import log_path

    def start(key):
        log = log_path(runner, key)
        log.parent.mkdir(parents=True, exist_ok=True)
        return ForkedStage(forked_nlgkd(["run", str(recipe_file), "--stage", key, "--runs-dir", str(root)],
                                        cwd=root, log=log))
    return start


def branching_recipe(tiny_recipe) -> dict:
    """teacher -> (a, b, a_again: same config as a) -> eval: a and b can run at the same time."""
    recipe = copy.deepcopy(tiny_recipe)
    teacher = {**recipe["stages"][0], "max_steps": 6, "eval_every": 6, "save_every": None}
    short = {"kind": "finetune", "model": "teacher", "max_steps": 3, "batch_size": 16, "eval_samples": 0,
             "save_every": None}
    recipe["stages"] = [
        teacher,
        {"name": "a", **short, "lr": 1e-3},
        {"name": "b", **short, "lr": 3e-3},
        {"name": "a_again", **short, "lr": 1e-3},
        {"name": "eval", "kind": "evaluate", "models": ["a", "b"],
         "decoding": {"strategy": "greedy", "max_new_tokens": 8, "batch_size": 8}},
    ]
    return recipe


def test_dependencies_are_the_inputs_and_an_earlier_stage_with_the_same_fingerprint(tmp_path, tiny_recipe):
    runner = Runner(parse_recipe(branching_recipe(tiny_recipe)), runs_root=tmp_path)
    to_run = [stage for stage, action in runner.plan() if action == "run"]
    assert stage_dependencies(runner, to_run) == {
        "teacher": set(), "a": {"teacher"}, "b": {"teacher"}, "a_again": {"teacher", "a"}, "eval": {"a", "b"}}


def test_two_jobs_give_the_weights_of_a_sequential_run(tmp_path, tiny_recipe):
    recipe = branching_recipe(tiny_recipe)
    sequential = Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=tmp_path / "sequential")
    assert sequential.run()["a_again"] == "reused"

    root = tmp_path / "parallel"
    root.mkdir()
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    runner = Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=root)
    outcome = run_in_parallel(runner, runner.plan(), jobs=2, start=forked_starter(recipe_file, root, runner),
                              poll_seconds=0.05)
    assert outcome == {"teacher": "ran", "a": "ran", "b": "ran", "a_again": "reused", "eval": "ran"}
    for stage in ("teacher", "a", "b", "a_again"):
        ours = load_file(str(root / "tiny" / stage / "model.safetensors"))
        theirs = load_file(str(tmp_path / "sequential" / "tiny" / stage / "model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    started = {key: json.loads((root / "tiny" / key / "stage.json").read_text())["started"] for key in ("a", "b")}
    assert all(started.values())
    assert (root / "tiny" / "logs" / "b.log").exists()
    # a re-run has nothing to start
    again = Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=root)
    assert set(run_in_parallel(again, again.plan(), 2, start=None).values()) == {"skipped"}


def test_a_failed_stage_stops_what_needs_it_and_names_its_log(tmp_path, tiny_recipe):
    recipe = copy.deepcopy(tiny_recipe)
    recipe["models"]["other"] = {**recipe["models"]["teacher"], "vocab_size": 280}  # another tokenizer
    recipe["stages"] = [
        {**recipe["stages"][0], "max_steps": 2, "eval_samples": 0, "save_every": None},
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0]},
        # fails when it runs: word-level KD needs the teacher's vocabulary
        {"name": "kd", "kind": "distill", "student": "student", "teacher": "other", "max_steps": 1,
         "batch_size": 16, "eval_samples": 0, "save_every": None},
        {"name": "eval", "kind": "evaluate", "models": ["kd"]},
    ]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    runner = Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=tmp_path)
    with pytest.raises(StageError, match=r"(?s)stage 'kd' failed \(exit 2\).*logs/kd\.log ends:.*different "
                                         r"vocabularies.*did not start"):
        run_in_parallel(runner, runner.plan(), jobs=3, start=forked_starter(recipe_file, tmp_path, runner),
                        poll_seconds=0.05)
    assert (tmp_path / "tiny" / "student" / "stage.json").exists()
    assert not (tmp_path / "tiny" / "eval").exists() and not (tmp_path / "tiny" / "logs" / "eval.log").exists()


def test_the_cli_starts_each_stage_as_nlgkd_run_stage_with_the_same_overrides(tmp_path, tiny_recipe, monkeypatch):
    import subprocess
    import sys

    from nlgkd.cli import build_parser
    from nlgkd.parallel import subprocess_starter

    started = []

    class FakePopen:
        def __init__(self, command, stdout, stderr, env, preexec_fn):
            assert preexec_fn is die_with_parent  # each child dies with the run that started it
            started.append((command, env))

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    start = subprocess_starter(runner, "r.yaml", str(tmp_path), ["seed=3", "stages.teacher.lr=0.01"], force=True,
                               jobs=2)
    start("teacher")
    command, env = started[0]
    assert command == [sys.executable, "-m", "nlgkd", "run", "r.yaml", "--stage", "teacher", "--runs-dir",
                       str(tmp_path), "--set", "seed=3", "--set", "stages.teacher.lr=0.01", "--force"]
    assert env["OMP_NUM_THREADS"] == str(max(1, (__import__("os").cpu_count() or 1) // 2))
    assert json.loads((tmp_path / "tiny" / "logs" / "teacher.log").read_text())["command"] == command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "r.yaml", "--jobs", "0"])


class FakeStage:
    """A Handle that finishes after `polls` polls, counting how many fakes run at once."""
    running = 0
    peak = 0

    def __init__(self, polls=3):
        self.polls = polls
        FakeStage.running += 1
        FakeStage.peak = max(FakeStage.peak, FakeStage.running)

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        FakeStage.running -= 1
        return 0


def test_independent_stages_run_at_the_same_time_up_to_jobs(tmp_path, tiny_recipe):
    runner = Runner(parse_recipe(branching_recipe(tiny_recipe)), runs_root=tmp_path)
    started = []

    def start(key):
        started.append(key)
        return FakeStage()

    for jobs, peak in ((1, 1), (3, 2)):  # a and b are the only stages that can overlap
        FakeStage.peak = 0
        started.clear()
        run_in_parallel(runner, runner.plan(), jobs=jobs, start=start, poll_seconds=0)
        assert FakeStage.peak == peak and started == ["teacher", "a", "b", "a_again", "eval"]


def test_jobs_refuse_a_multi_process_launch(tmp_path, tiny_recipe, monkeypatch, capsys):
    from nlgkd.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", str(path), "--jobs", "2", "--runs-dir", str(tmp_path)]) == 2
    assert "--jobs starts one process per stage; run it as a plain `nlgkd run`" in capsys.readouterr().err


def stage_processes(recipe_file) -> list[int]:
    """Pids of the `nlgkd run RECIPE --stage KEY` processes of this recipe file that are alive (not zombies)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(recipe_file).encode() in argv and b"--stage" in argv and state != "Z":
            found.append(int(proc.name))
    return found


def test_jobs_children_die_with_their_killed_parent_and_a_new_run_finishes(tmp_path, tiny_recipe):
    import time

    recipe = copy.deepcopy(tiny_recipe)
    long = {"kind": "finetune", "model": "teacher", "max_steps": 100_000, "batch_size": 16, "eval_samples": 0,
            "eval_every": 100_000, "save_every": 20, "log_every": 1000}
    recipe["stages"] = [{"name": "a", **long}, {"name": "b", **long, "lr": 1e-3}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    parent = forked_nlgkd(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--jobs", "2"], tmp_path,
                          log=tmp_path / "parent.log")
    parent.start()
    deadline = time.time() + 300
    checkpoints = [tmp_path / "runs" / "tiny" / f".{key}.partial" / "checkpoints" for key in ("a", "b")]
    while time.time() < deadline and not all(list(c.glob("step-*")) for c in checkpoints):
        time.sleep(0.2)  # both children are training: each has written a checkpoint
    children = stage_processes(path)
    assert len(children) == 2, (tmp_path / "parent.log").read_text()[-2000:]
    parent.kill()  # SIGKILL: no handler of the parent runs
    parent.join()
    gone_by = time.time() + 30  # the children would train for many minutes more
    while time.time() < gone_by and stage_processes(path):
        time.sleep(0.2)
    assert stage_processes(path) == [], "a --jobs child outlived the run that started it"
    # the lock died with the parent: a new run takes it and finishes both stages
    recipe["stages"] = [{**stage, "max_steps": 40} for stage in recipe["stages"]]
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path / "runs")
    assert runner.run() == {"a": "ran", "b": "ran"}
