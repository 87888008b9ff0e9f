"""Shared fixtures: tiny recipes on the built-in demo task (no downloads, seconds on a CPU)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP threads oversubscribed on a busy 2-core machine
# slow each step down 50-fold; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "data": {"task": "demo", "demo": {"train": 160, "validation": 16, "test": 16, "unlabeled": 32},
             "max_source_length": 48, "max_target_length": 48},
    "models": {"teacher": {"init": "fresh", "arch": "bart", "d_model": 32, "encoder_layers": 2,
                           "decoder_layers": 2, "attention_heads": 2, "ffn_dim": 64, "dropout": 0.0,
                           "vocab_size": 300}},
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


def nlgkd_on_two_processes(args: list[str], cwd, timeout: int = 600):
    """`torchrun --nproc_per_node 2 -m nlgkd ARGS` (gloo on CPU); the completed process."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "nlgkd", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


# Stages one `torchrun --nproc_per_node 2` call runs in a copy of the `trained` run directory; tests compare
# each with the same stage run on 1 process (test_runner: a fresh model fine-tuned then evaluated, its
# tokenizer trained under 2 processes; test_pseudo_targets: sampled PTs; test_joint_teaching: the student
# steps). Every process spends most of a minute importing torch and transformers on a slow disk, so the
# suite starts the process group once.
TWO_PROCESS_MODELS = {"fresh": {**TINY_RECIPE["models"]["teacher"], "vocab_size": 280}}
TWO_PROCESS_STAGES = [
    {**TINY_RECIPE["stages"][0], "name": "ft2", "model": "fresh"},
    {"name": "eval2", "kind": "evaluate", "models": ["ft2"],
     "decoding": {"strategy": "greedy", "max_new_tokens": 24, "batch_size": 8}},
    {"name": "pts2", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train", "unlabeled"],
     "max_examples": 16, "decoding": {"strategy": "sample", "top_p": 0.95, "num_return_sequences": 3,
                                      "max_new_tokens": 12, "batch_size": 2}},
    distill_stage("jt2", objective="logits_kd", max_steps=6,
                  joint_teaching={"student_ratio": 0.4, "schedule": "random"}),
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
    result = nlgkd_on_two_processes(["run", str(path), "--runs-dir", str(root)], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "tiny"


def kill_once(args: list[str], cwd, ready, what: str) -> None:
    """Start `nlgkd ARGS`, SIGKILL it as soon as `ready()` is true; fails if it finished first."""
    import signal
    import subprocess
    import sys
    import time

    # niced: on a busy machine the child would otherwise run on while this process waits for a core to
    # notice `ready()`, and finish (or clean up what `ready` looks for) before the kill lands
    proc = subprocess.Popen([sys.executable, "-m", "nlgkd", *args], cwd=cwd, preexec_fn=lambda: os.nice(15),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"the stage finished before it could be killed; {what}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
