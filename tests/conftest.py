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
def trained(tmp_path_factory):
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
