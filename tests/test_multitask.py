"""Multi-task data (MT-DNN): several datasets in one recipe with prefixes and sampling weights, and
distillation with per-task teachers where a task without a teacher trains on cross-entropy alone."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from nlgkd.data import collate, load_splits, task_mixture
from nlgkd.models import build_fresh, forward_on_targets
from nlgkd.config import DataConfig, ModelConfig, RecipeError, TaskData
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner
from nlgkd.stages.distill_loss import StudentWithProjections, make_loss_by_task

from conftest import TINY_RECIPE


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def echo_rows(n, offset=0):
    words = ["red", "green", "blue", "small", "large", "river", "city", "north"]
    return [{"text": f"{words[(i + offset) % 8]} {words[(3 * i + offset) % 8]}",
             "out": f"{words[(3 * i + offset) % 8]} {words[(i + offset) % 8]}"} for i in range(n)]


def two_task_data(tmp_path, echo_weight=None) -> dict:
    return {
        "tasks": {
            "describe": {"task": "demo", "demo": {"train": 120, "validation": 8, "test": 8, "unlabeled": 0},
                         "prefix": "describe: "},
            "echo": {"train": write_jsonl(tmp_path / "echo_train.jsonl", echo_rows(40)),
                     "validation": write_jsonl(tmp_path / "echo_val.jsonl", echo_rows(8, 1)),
                     "source": "text", "target": "out", "prefix": "swap: ", "weight": echo_weight},
        },
        "max_source_length": 48, "max_target_length": 48,
    }


def test_tasks_load_with_prefixes_task_column_and_sizes(tmp_path):
    recipe = parse_recipe({**copy.deepcopy(TINY_RECIPE), "data": two_task_data(tmp_path)})
    splits, report = load_splits(recipe.data)
    train = splits["train"]
    assert len(train) == 160 and report.sizes["train"] == 160
    assert report.tasks == {"describe": {"train": 120, "validation": 8, "test": 8}, "echo": {"train": 40, "validation": 8}}
    by_task = Counter(train["task"])
    assert by_task == {"describe": 120, "echo": 40}
    for row in train:
        assert row["source"].startswith("describe: " if row["task"] == "describe" else "swap: ")
    assert sorted(Counter(splits["validation"]["task"]).items()) == [("describe", 8), ("echo", 8)]


@pytest.mark.parametrize("data, message", [
    ({"task": "demo", "tasks": {"a": {"task": "demo"}}}, "not at the top of data"),
    ({"tasks": {"a": {"prefix": "x: "}}}, r"data.tasks.a: give exactly one of"),
    ({"tasks": {"a": {"task": "demo", "weight": 0}}}, r"data\.tasks\.a\.weight: 0\.0 is out of range; it must be > 0"),
])
def test_bad_task_configs_name_the_field(data, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**copy.deepcopy(TINY_RECIPE), "data": data})


def test_mixture_follows_weights_sees_all_before_repeating_and_is_pure():
    examples = [{"task": "a", "i": i} for i in range(90)] + [{"task": "b", "i": i} for i in range(10)]
    mixed = task_mixture(examples, {"a": 1.0, "b": 1.0}, seed=3, epoch=0)
    counts = Counter(ex["task"] for ex in mixed)
    assert len(mixed) == 100 and counts == {"a": 50, "b": 50}
    b_ids = [ex["i"] for ex in mixed if ex["task"] == "b"]
    assert Counter(b_ids) == {i: 5 for i in range(10)}  # every example 5 times: whole passes only
    a_ids = [ex["i"] for ex in mixed if ex["task"] == "a"]
    assert len(set(a_ids)) == 50  # subsampled without repeats
    assert mixed == task_mixture(examples, {"a": 1.0, "b": 1.0}, seed=3, epoch=0)
    assert mixed != task_mixture(examples, {"a": 1.0, "b": 1.0}, seed=3, epoch=1)
    # no weights: the plain concatenation; one weight: the other task counts with its own size
    assert task_mixture(examples, {"a": None, "b": None}, seed=3, epoch=0) == examples
    assert Counter(ex["task"] for ex in task_mixture(examples, {"a": None, "b": 90.0}, 3, 0)) == {"a": 50, "b": 50}


def tiny_pair():
    texts = ["a cat sat on the mat", "the dog ran far away", "red green blue", "one two three four"] * 4
    cfg = ModelConfig(arch="t5", d_model=16, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=32,
                      dropout=0.0, vocab_size=120)
    teacher, tokenizer = build_fresh(cfg, texts, seed=0)
    student, _ = build_fresh(cfg, texts, seed=1, tokenizer=tokenizer)
    examples = [{"source_ids": tokenizer(t).input_ids, "target_ids": tokenizer(t[::-1]).input_ids, "task": task}
                for t, task in zip(texts[:4], ["x", "y", "x", "y"])]
    return teacher, student, tokenizer, examples


def test_per_task_loss_equals_reference_formula():
    teacher, student, tokenizer, examples = tiny_pair()
    batch = collate(examples, pad_id=tokenizer.pad_token_id, causal=False, tasks=("x", "y"))
    assert batch["task_index"].tolist() == [0, 1, 0, 1]

    class Cfg:
        objective, alpha, temperature, divergence, jsd_beta = "logits_kd", 0.3, 2.0, "forward_kl", 0.5
        label_smoothing, kd_chunk_size = 0.0, None

    mask = batch["labels"] != -100
    n = float(mask.sum())
    loss, logs = make_loss_by_task(Cfg, [teacher], [[0], []])(StudentWithProjections(student, {}), batch, n)

    s = forward_on_targets(student, batch)[0].float()
    with torch.no_grad():
        t = forward_on_targets(teacher, batch)[0].float()
    T = Cfg.temperature
    kl = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1) * T * T
    ce = F.cross_entropy(s.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    with_teacher = (batch["task_index"] == 0)[:, None] & mask
    without = (batch["task_index"] == 1)[:, None] & mask
    expected = ((1 - Cfg.alpha) * kl[with_teacher].sum() + Cfg.alpha * ce[with_teacher].sum() + ce[without].sum()) / n
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["ce"] == pytest.approx(ce[mask].sum().item() / n, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_multitask_recipe_finetunes_and_distills_with_a_teacher_for_one_task(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"] = two_task_data(tmp_path, echo_weight=1.0)
    teacher = {**recipe["stages"][0], "max_steps": 6, "eval_every": 3, "save_every": None}
    recipe["stages"] = [
        teacher,
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [-1]},
        {"name": "distill", "kind": "distill", "student": "student", "teachers_by_task": {"describe": ["teacher"]},
         "max_steps": 4, "batch_size": 16, "eval_samples": 0, "save_every": None, "log_every": 1},
    ]
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path / "runs")
    runner.run()
    record = json.loads((runner.run_dir / "distill" / "stage.json").read_text())
    assert record["teachers"] == ["teacher"]
    assert record["data"]["tasks"]["echo"] == {"train": 40, "validation": 8}
    logs = [json.loads(line) for line in (runner.run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "logits_kd" in r]
    assert steps and all(r["logits_kd"] > 0 and r["ce"] > 0 for r in steps)

    bad = copy.deepcopy(recipe)
    bad["stages"][2]["teachers_by_task"] = {"summarize": ["teacher"]}
    bad["stages"][2]["name"] = "distill_bad"
    with pytest.raises(Exception, match=r"teachers_by_task: \['summarize'\] are not tasks of data.tasks"):
        Runner(parse_recipe(bad), runs_root=tmp_path / "runs").run(only="distill_bad")


def test_teachers_by_task_names_are_checked_like_other_references(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"] = two_task_data(tmp_path)
    recipe["stages"].insert(1, {"name": "d", "kind": "distill", "student": "teacher",
                                "teachers_by_task": {"echo": ["techer"]}})
    with pytest.raises(RecipeError, match=r"teachers_by_task.echo\[0\]: unknown name 'techer' \(did you mean 'teacher'\?\)"):
        parse_recipe(recipe)


def test_data_config_classes_share_their_source_fields():
    assert {"task", "train", "hub", "source", "target"} <= set(TaskData.__dataclass_fields__)
    assert DataConfig(tasks={"a": TaskData(task="demo")}).tasks["a"].prefix == ""
