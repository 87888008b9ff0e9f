"""General distillation data (nlgkd/denoising.py): T5 span corruption and BART text infilling place their
sentinels / masks as each family expects and are reproducible by seed; a general-then-task recipe runs on
the demo task."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from nlgkd.denoising import (
    DenoisingPairs,
    bart_text_infilling,
    permute_sentences,
    poisson_span_lengths,
    t5_span_corruption,
)
from nlgkd.models import SENTINELS, train_tokenizer
from nlgkd.runner import StageError

from conftest import with_stage

SENT = [1000 + i for i in range(20)]  # sentinel ids outside the token range used below
MASK = 999


def restore_t5(source: list[int], target: list[int]) -> list[int]:
    """The original tokens: each sentinel of the input replaced by what follows it in the target."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in target:
        if token in SENT:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    return [t for token in source for t in (spans[token] if token in SENT else [token])]


@pytest.mark.parametrize("length", [2, 5, 13, 40, 100])
def test_t5_span_corruption_places_sentinels_as_t5_does(length):
    tokens = list(range(length))
    for seed in range(20):
        source, target = t5_span_corruption(tokens, SENT, np.random.default_rng(seed), noise=0.15, mean_span=3.0)
        in_source = [t for t in source if t in SENT]
        assert in_source == SENT[: len(in_source)] and in_source  # <extra_id_0>, <extra_id_1>, ... in order
        assert [t for t in target if t in SENT][: len(in_source)] == in_source
        assert target[0] == SENT[0]  # the target starts with the first sentinel
        assert all(not (a in SENT and b in SENT) for a, b in zip(source, source[1:]))  # spans never touch
        assert restore_t5(source, target) == tokens
        corrupted = length - (len(source) - len(in_source))
        assert corrupted == min(max(round(length * 0.15), 1), length - 1)
        if source[-1] not in SENT:  # the text ends with kept tokens: the target closes with the next sentinel
            assert target[-1] == SENT[len(in_source)]
        else:
            assert target[-1] not in SENT


def test_t5_span_count_follows_the_mean_span_length():
    tokens = list(range(300))
    source, _ = t5_span_corruption(tokens, SENT, np.random.default_rng(0), noise=0.15, mean_span=3.0)
    # 45 corrupted tokens in round(45 / 3) = 15 spans (one more if the roll splits one at the ends)
    assert sum(t in SENT for t in source) in (15, 16)


def test_bart_text_infilling_masks_whole_word_spans():
    words = [[10 * i, 10 * i + 1] if i % 3 == 0 else [10 * i] for i in range(1, 41)]  # some 2-token words
    flat = [t for w in words for t in w]
    for seed in range(20):
        out = bart_text_infilling(words, MASK, np.random.default_rng(seed), noise=0.3, mean_span=3.0)
        assert MASK in out
        assert all(not (a == MASK and b == MASK) for a, b in zip(out, out[1:]))  # one mask per span
        kept = [t for t in out if t != MASK]
        assert len([w for w in words if w[0] in kept]) == 40 - round(40 * 0.3)  # 30% of the words masked
        assert all((w[0] in kept) == (w[-1] in kept) for w in words)  # whole words only
        it = iter(flat)
        assert all(t in it for t in kept)  # the kept words keep their order


def test_poisson_span_lengths_cover_the_budget_with_mean_lambda():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(300):
        spans = poisson_span_lengths(1000, 3.0, rng)
        assert sum(spans) == 1000
        lengths += spans[:-1]  # the last one is cut to fit
    assert abs(np.mean(lengths) - 3.0) < 0.1
    assert 0 in lengths  # zero-length spans (mask insertions) happen


def test_sentence_permutation_is_a_seeded_shuffle():
    text = "One is here. Two is there! Three? Four is last."
    shuffled = {permute_sentences(text, np.random.default_rng(seed)) for seed in range(30)}
    assert len(shuffled) > 5
    for s in shuffled:
        assert sorted(re.split(r"(?<=[.!?]) ", s)) == sorted(re.split(r"(?<=[.!?]) ", text))
    assert permute_sentences(text, np.random.default_rng(3)) == permute_sentences(text, np.random.default_rng(3))
    assert permute_sentences("No full stop here", np.random.default_rng(0)) == "No full stop here"


@pytest.fixture(scope="module")
def tokenizer_and_texts():
    from nlgkd.demo_task import make_demo_splits

    rows = make_demo_splits({"train": 100, "validation": 0, "test": 0, "unlabeled": 0}, seed=0)["train"]
    texts = [r["source"] for r in rows] + [r["target"] for r in rows]
    return train_tokenizer(texts, "bpe", 400, encoder_decoder=True), texts


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_pairs_on_a_fresh_tokenizer_are_reproducible_by_seed(tokenizer_and_texts, family):
    tokenizer, texts = tokenizer_and_texts
    pairs = DenoisingPairs(texts, tokenizer, family, seed=0)
    epoch0 = pairs.for_epoch(0)
    again = DenoisingPairs(texts, tokenizer, family, seed=0).for_epoch(0)
    assert epoch0 == again
    assert epoch0 != DenoisingPairs(texts, tokenizer, family, seed=1).for_epoch(0)
    assert epoch0 != pairs.for_epoch(1)  # new noise every epoch
    eos = tokenizer.eos_token_id
    noise_tokens = {tokenizer.convert_tokens_to_ids(s) for s in SENTINELS} if family == "t5" else {tokenizer.mask_token_id}
    for text, row in zip(texts, epoch0):
        original = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        assert row["source_ids"][-1] == eos and row["target_ids"][-1] == eos  # as nlgkd.data.encode makes them
        assert noise_tokens & set(row["source_ids"])
        if family == "bart":
            assert row["target_ids"] == original  # the target is the original text
        else:
            assert restore_t5_ids(row, tokenizer) == original[:-1]


def restore_t5_ids(row, tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(s) for s in SENTINELS]
    spans, current = {}, None
    for token in row["target_ids"][:-1]:
        if token in ids:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    return [t for token in row["source_ids"][:-1] for t in (spans[token] if token in ids else [token])]


def test_missing_sentinels_or_mask_give_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d"], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match=r"denoising.family: t5 span corruption needs sentinel tokens .*use family: bart"):
        DenoisingPairs(["a b c d"], plain, "t5")
    with pytest.raises(ValueError, match=r"denoising.family: bart text infilling needs a mask token.*use family: t5"):
        DenoisingPairs(["a b c d"], plain, "bart")


GENERAL = {"name": "general", "kind": "distill", "student": "student", "teacher": "teacher", "gold": False,
           "denoising": {"splits": ["train", "unlabeled"], "columns": ["source", "target"]},
           "max_steps": 6, "batch_size": 16, "eval_samples": 0, "save_every": None, "log_every": 1}
TASK = {"kind": "distill", "teacher": "teacher", "max_steps": 4, "batch_size": 16, "eval_samples": 0,
        "save_every": None, "log_every": 1}


def test_general_then_task_distillation_runs_on_the_demo_task(trained):
    runner, recipe = with_stage(
        trained, GENERAL,
        {**TASK, "name": "general_task", "student": "general"},
        {**TASK, "name": "task_only", "student": "student"},
        {"name": "eval_gt", "kind": "evaluate", "models": ["general_task", "task_only"], "max_examples": 8,
         "decoding": {"strategy": "greedy", "max_new_tokens": 16, "batch_size": 8}})
    for stage in ("general", "general_task", "task_only", "eval_gt"):
        runner.run(only=stage)
    record = json.loads((runner.run_dir / "general" / "stage.json").read_text())
    sizes = recipe["data"]["demo"]
    # bart teacher -> bart corruption; sources and targets of train, sources of unlabeled
    assert record["denoising"] == {"texts": 2 * sizes["train"] + sizes["unlabeled"], "family": "bart", "noise": 0.3}
    logs = [json.loads(line) for line in (runner.run_dir / "general" / "metrics.jsonl").read_text().splitlines()]
    assert all("logits_kd" in r and "ce" in r for r in logs if "loss" in r)
    metrics = json.loads((runner.run_dir / "eval_gt" / "metrics.json").read_text())
    assert set(metrics) == {"general_task", "task_only"}


def test_t5_corruption_on_a_bart_teacher_and_a_denoising_file(trained, tmp_path):
    file = tmp_path / "raw.txt"
    file.write_text("The Giraffe is a pub near the river.\n\nIt serves Japanese food. It is cheap.\n")
    stage = {**GENERAL, "name": "general_t5", "max_steps": 2,
             "denoising": {"file": str(file), "family": "t5", "noise": 0.2}}
    runner, _ = with_stage(trained, stage)
    runner.run(only="general_t5")
    record = json.loads((runner.run_dir / "general_t5" / "stage.json").read_text())
    assert record["denoising"] == {"texts": 2, "family": "t5", "noise": 0.2}


def test_denoising_pretraining_without_a_teacher_and_kd_without_one_refused(trained):
    pretrain = {**GENERAL, "name": "pretrain", "teacher": None, "objective": "finetune", "max_steps": 2}
    refused = {**GENERAL, "name": "general_alone", "teacher": None}
    runner, _ = with_stage(trained, pretrain, refused)
    runner.run(only="pretrain")  # cross-entropy on denoising pairs: the student's own (bart) pretraining task
    record = json.loads((runner.run_dir / "pretrain" / "stage.json").read_text())
    assert record["denoising"]["family"] == "bart" and record["teachers"] == []
    with pytest.raises(StageError, match=r"objective 'logits_kd' needs a teacher"):
        runner.run(only="general_alone")
