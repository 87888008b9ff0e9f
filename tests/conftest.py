"""Shared fixtures: tiny recipes on the built-in demo task (no downloads, seconds on a CPU)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP threads oversubscribed on a busy 2-core machine
# slow each step down 50-fold; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# bars lock within this process only: a forked child SIGKILLed mid-bar (kill_once) would otherwise leave tqdm's
# multiprocessing lock taken, and this worker's next bar would wait for it forever (nlgkd/progress.py)
from nlgkd.progress import use_process_private_progress_lock  # noqa: E402

use_process_private_progress_lock()

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "data": {"task": "demo", "demo": {"train": 160, "validation": 16, "test": 16, "unlabeled": 32},
             "max_source_length": 48, "max_target_length": 48},
    # init_std 0.02 (transformers' own): outputs of these 40-step models that some tests compare were
    # calibrated with it; nlgkd's default fresh init is tested in test_models.py
    "models": {"teacher": {"init": "fresh", "arch": "bart", "d_model": 32, "encoder_layers": 2,
                           "decoder_layers": 2, "attention_heads": 2, "ffn_dim": 64, "dropout": 0.0,
                           "vocab_size": 300, "init_std": 0.02}},
    "stages": [
        {"name": "teacher", "kind": "finetune", "model": "teacher", "max_steps": 12, "batch_size": 16,
         "lr": 3e-3, "eval_every": 6, "eval_samples": 8, "save_every": 4, "log_every": 2},
        {"name": "eval", "kind": "evaluate", "models": ["teacher"],
         "decoding": {"strategy": "greedy", "max_new_tokens": 24, "batch_size": 8}},
    ],
}


@pytest.fixture
def tiny_recipe() -> dict:
    """A fresh copy of the tiny recipe as a plain dict (tests edit it freely)."""
    return copy.deepcopy(TINY_RECIPE)


TEACHER_STEPS = 40


@pytest.fixture(scope="session")
def trained(tiny_trained):
    """(recipe dict, runs root) with a trained tiny teacher and a decoder-pruned student (`tiny_trained`)."""
    return tiny_trained


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(recipe dict, runs root) with a trained tiny teacher and a decoder-pruned student, made once per
    session; tests add stages to a copy of the recipe and run them in the same runs root."""
    from nlgkd.recipe import parse_recipe
    from nlgkd.runner import Runner

    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"]["demo"]["train"] = 320
    recipe["stages"] = [
        {**recipe["stages"][0], "max_steps": TEACHER_STEPS, "eval_every": 1000, "save_every": None},
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [-1]},
    ]
    root = tmp_path_factory.mktemp("runs")
    Runner(parse_recipe(recipe), runs_root=root).run()
    return recipe, root


def with_stage(trained, *stages: dict):
    """A Runner over the trained run directory with `stages` appended to the recipe."""
    from nlgkd.recipe import parse_recipe
    from nlgkd.runner import Runner

    recipe, root = trained
    recipe = copy.deepcopy(recipe)
    recipe["stages"].extend(copy.deepcopy(list(stages)))
    return Runner(parse_recipe(recipe), runs_root=root), recipe


def distill_stage(name, **fields):
    """A short distill stage of the tiny student against the tiny teacher."""
    return {"name": name, "kind": "distill", "student": "student", "teacher": "teacher", "max_steps": 3,
            "batch_size": 16, "eval_samples": 0, "save_every": None, "log_every": 1, **fields}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forked_nlgkd(args: list[str], cwd, env: dict | None = None, log=None, nice: int = 0):
    """`nlgkd ARGS` in a child process forked from the test process; the started multiprocessing.Process.

    A real, separate process (it can be SIGKILLed, it opens its own process group) that inherits the imported
    torch and transformers: a fresh interpreter spends most of a minute importing them on a slow disk, which
    made these tests most of the suite's time. The child runs the CLI's own `main`, with `env` added to its
    environment and its output to `log` (or nowhere)."""
    import importlib
    import multiprocessing

    # what a stage or `nlgkd serve` imports, imported here once, so that no child pays for it
    for module in ("nlgkd.serve", "nlgkd.stages", "rouge_score.rouge_scorer", "sacrebleu", "uvicorn"):
        importlib.import_module(module)

    return multiprocessing.get_context("fork").Process(
        target=_run_nlgkd_in_child, args=(list(args), str(cwd), dict(env or {}), str(log or os.devnull), nice),
        daemon=True)


def _run_nlgkd_in_child(args, cwd, env, log, nice) -> None:
    import sys
    import traceback

    from accelerate.state import AcceleratorState, GradientState

    from nlgkd.cli import main

    os.nice(nice)
    out = open(log, "a", buffering=1)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out  # not pytest's capture of the parent
    os.chdir(cwd)
    os.environ.update(env)
    # Accelerate keeps its process state in class-level singletons; the parent's (1 process) came along with
    # the fork, and this child may be one rank of two
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        code = main(args)
    except BaseException:
        traceback.print_exc()
        code = 1
    out.flush()
    os._exit(code or 0)


def nlgkd_on_two_processes(args: list[str], cwd, timeout: int = 600) -> None:
    """`nlgkd ARGS` on 2 processes (gloo on CPU), started the way `torchrun --nproc_per_node 2` starts them:
    each with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment.
    Fails with the ranks' output unless both exit 0."""
    for exitcode, output in ranks_of_two_processes(args, cwd, timeout):
        assert exitcode == 0, f"a rank exited with {exitcode}:\n{output[-3000:]}"


def ranks_of_two_processes(args: list[str], cwd, timeout: int) -> list[tuple[int | None, str]]:
    """(exit code, output) of each rank of `nlgkd ARGS` on 2 processes; a rank still running after `timeout`
    seconds is killed (exit code None)."""
    port = str(free_port())
    logs = [Path(cwd) / f"rank{rank}.log" for rank in range(2)]
    ranks = [forked_nlgkd(args, cwd, log=logs[rank], env={
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout)
    results = []
    for rank, log in zip(ranks, logs):
        alive = rank.is_alive()
        if alive:
            rank.kill()
            rank.join()
        results.append((None if alive else rank.exitcode, log.read_text() if log.exists() else ""))
    return results


# Stages one 2-process run (`nlgkd_on_two_processes`) runs in a copy of the `trained` run directory; tests compare
# each with the same stage run on 1 process (test_runner: a fresh model fine-tuned then evaluated, its tokenizer
# trained under 2 processes; test_pseudo_targets: sampled PTs; test_joint_teaching: the student steps; test_distill:
# gradient accumulation, TinyBERT projections, mix: rows). The suite starts the process group once.
TWO_PROCESS_MODELS = {"fresh": {**TINY_RECIPE["models"]["teacher"], "vocab_size": 280}}
TWO_PROCESS_STAGES = [
    # batch 24 on 320 examples: 13 whole batches and a partial one, at step 14 (topped up with ignored rows)
    {**TINY_RECIPE["stages"][0], "name": "ft2", "model": "fresh", "log_every": 1, "batch_size": 24, "max_steps": 14,
     "eval_every": 7},
    {"name": "eval2", "kind": "evaluate", "models": ["ft2"],
     "decoding": {"strategy": "greedy", "max_new_tokens": 24, "batch_size": 8}},
    {"name": "pts2", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train", "unlabeled"],
     "max_examples": 16, "decoding": {"strategy": "sample", "top_p": 0.95, "num_return_sequences": 3,
                                      "max_new_tokens": 12, "batch_size": 2}},
    # the same through CTranslate2: each process converts nothing twice and samples batch j with seed + j
    {"name": "pts2_engine", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train", "unlabeled"],
     "engine": "ctranslate2", "max_examples": 16,
     "decoding": {"strategy": "sample", "top_p": 0.95, "num_return_sequences": 3, "max_new_tokens": 12,
                  "batch_size": 2}},
    distill_stage("jt2", objective="logits_kd", max_steps=6,
                  joint_teaching={"student_ratio": 0.4, "schedule": "random"}),
    # DDP's no_sync path: 2 micro-batches per step, gradients synchronized on the last one only
    distill_stage("accum2", objective="logits_kd", max_steps=3, batch_size=8, grad_accum=2),
    # TinyBERT's learned projections train with the student, synchronized like its own weights
    distill_stage("tinybert2", objective="logits_kd", max_steps=3, hidden={"loss": "tinybert", "sides": ["encoder"]}),
    # Joint-Teaching's mix: rows, each process sampling the prefixes of its half (greedy: the same as on 1)
    distill_stage("rows2", objective="logits_kd", max_steps=3, batch_size=8,
                  joint_teaching={"mix": "rows", "decoding": {"strategy": "greedy", "max_new_tokens": 8}}),
]


def with_two_process_stages(trained) -> dict:
    recipe = copy.deepcopy(trained[0])
    recipe["models"].update(copy.deepcopy(TWO_PROCESS_MODELS))
    recipe["stages"].extend(copy.deepcopy(TWO_PROCESS_STAGES))
    return recipe


@pytest.fixture(scope="session")
def two_processes(tiny_trained, tmp_path_factory):
    """The run directory where TWO_PROCESS_STAGES ran on 2 processes. The 1-process runs of the same stages
    are the tests' own, in the `trained` run directory (recipe: `with_two_process_stages`)."""
    import shutil

    import yaml

    recipe = with_two_process_stages(tiny_trained)
    root = tmp_path_factory.mktemp("two_processes")
    for stage in ("teacher", "student"):  # finished: skipped by fingerprint, as in any re-run
        shutil.copytree(tiny_trained[1] / "tiny" / stage, root / "tiny" / stage)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    nlgkd_on_two_processes(["run", str(path), "--runs-dir", str(root)], cwd=root)
    return root / "tiny"


def kill_once(args: list[str], cwd, ready, what: str) -> None:
    """Start `nlgkd ARGS` in another process, SIGKILL it as soon as `ready()` is true; fails if it finished
    first."""
    import time

    # niced: on a busy machine the child would otherwise run on while this process waits for a core to
    # notice `ready()`, and finish (or clean up what `ready` looks for) before the kill lands
    proc = forked_nlgkd(args, cwd, nice=15)
    proc.start()
    deadline = time.time() + 600
    while time.time() < deadline and proc.is_alive() and not ready():
        time.sleep(0.01)
    assert proc.is_alive(), f"the stage finished before it could be killed; {what}"
    proc.kill()  # SIGKILL: no cleanup, as when a machine dies
    proc.join()


def pytest_collection_modifyitems(items):
    # Under `pytest -n 2 --dist loadgroup` (the README's test command) the tests that read the 2-process run
    # go to one worker, so that the run is made once, not once per worker.
    for item in items:
        if "two_processes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("two_processes"))
