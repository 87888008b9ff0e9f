"""The checkpoints users bring, end to end and offline: each family's tiny folder (tests/families.py) goes
prune -> pseudo-targets -> distill -> evaluate -> export -> one served request, decoding as the recipe says."""
from __future__ import annotations

import json

import pytest

from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner

from families import FAMILIES

pytest.importorskip("ctranslate2")
pytest.importorskip("sentencepiece")

GREEDY = {"strategy": "greedy", "max_new_tokens": 8, "batch_size": 8}


def family_recipe(folder, decoder_only: bool) -> dict:
    return {
        "name": "family",
        "data": {"task": "demo", "demo": {"train": 24, "validation": 8, "test": 8, "unlabeled": 0},
                 "max_source_length": 32, "max_target_length": 16},
        "models": {"teacher": {"init": "pretrained", "name_or_path": str(folder)}},
        "stages": [
            {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0],
             **({} if decoder_only else {"encoder_layers": [0, 1]})},
            {"name": "pts", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train"], "max_examples": 8,
             "decoding": GREEDY},
            {"name": "distill", "kind": "distill", "student": "student", "teacher": "teacher",
             "pseudo_targets": ["pts"], "max_steps": 2, "batch_size": 8, "eval_samples": 0, "save_every": None,
             "min_teacher_lead": None},
            {"name": "eval", "kind": "evaluate", "models": ["teacher", "distill"], "decoding": GREEDY,
             "timing_passes": 0},
            {"name": "int8", "kind": "export", "model": "distill", "quantization": "float32"},
        ],
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_goes_from_pruning_to_a_served_answer(family, tmp_path):
    from nlgkd.serve import ChatRequest, load_served_model

    folder = FAMILIES[family](tmp_path / family)
    decoder_only = family in ("gpt2", "llama_chat")
    runner = Runner(parse_recipe(family_recipe(folder, decoder_only)), runs_root=tmp_path / "runs")
    runner.run()
    run = tmp_path / "runs" / "family"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "distill"}
    settings = metrics["teacher"]["generation_settings"]
    # the recipe's decoding, not the checkpoint's search settings; the checkpoint's token ids kept
    assert settings["max_new_tokens"] == 8 and settings.get("num_beams", 1) == 1
    assert not settings.get("min_length") and not settings.get("no_repeat_ngram_size")
    assert settings.get("forced_eos_token_id") is None
    if family == "mbart50":
        teacher_tokenizer = runner.load_model("teacher", before=1)[1]
        assert settings["forced_bos_token_id"] == teacher_tokenizer.convert_tokens_to_ids("de_DE")
    pts = json.loads((run / "pts" / "stage.json").read_text())["pseudo_targets"]
    assert pts["pts_written"] > 0 and pts["generation_settings"]["max_new_tokens"] == 8
    served = load_served_model(str(run / "int8"), name=family, device="cpu")
    answer = served.complete(ChatRequest(messages=[{"role": "user", "content": "name: Giraffe | area: riverside"}],
                                         max_tokens=6, temperature=0.0))
    assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] <= 6


@pytest.mark.slow
def test_a_student_with_the_t5_tokenizers_size_distills_from_a_padded_t5_teacher(tmp_path):
    folder = FAMILIES["t5_v1.1"](tmp_path / "t5")
    recipe = family_recipe(folder, decoder_only=False)
    recipe["models"]["fresh"] = {"init": "fresh", "arch": "t5", "tokenizer_from": "teacher", "d_model": 16,
                                 "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 32}
    recipe["stages"] = [{**recipe["stages"][2], "student": "fresh", "pseudo_targets": [], "max_steps": 3,
                         "log_every": 1}]
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path / "runs")
    teacher, tokenizer = runner.load_model("teacher", before=0)
    student, _ = runner.load_model("fresh", before=0)
    assert teacher.config.vocab_size > len(tokenizer) == student.config.vocab_size  # 320 rows, 266 tokens
    runner.run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs" / "family" / "distill" / "metrics.jsonl")
              .read_text().splitlines() if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)


@pytest.mark.slow
def test_joint_teaching_samples_from_a_t5_student_with_fewer_encoder_than_decoder_layers(tmp_path):
    # transformers sizes T5's default generation cache by the encoder; the rollouts go through the same
    # generate path as every decode, with its explicit cache
    folder = FAMILIES["t5_v1.0"](tmp_path / "t5")
    recipe = family_recipe(folder, decoder_only=False)
    recipe["stages"] = [{**recipe["stages"][0], "encoder_layers": [0], "decoder_layers": [0, 1]},
                        {**recipe["stages"][2], "pseudo_targets": [], "max_steps": 2, "log_every": 1,
                         "joint_teaching": {"student_ratio": 1.0, "decoding": {"strategy": "sample"}}}]
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path / "runs")
    runner.run()
    record = json.loads((tmp_path / "runs" / "family" / "distill" / "stage.json").read_text())
    assert record["joint_teaching"]["student_steps"] == 2
