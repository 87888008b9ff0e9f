"""`select`: candidates scored on the same validation examples, the best one becomes the stage's model, every
score in stage.json, and later stages (evaluate on test, the report) read the winner by the stage's name."""
from __future__ import annotations

import json

import safetensors.torch

from nlgkd.config import DecodingConfig
from nlgkd.data import encode
from nlgkd.generation import generate
from nlgkd.metrics import text_metrics
from nlgkd.models import load_pretrained

from conftest import distill_stage, with_stage

GREEDY = {"strategy": "greedy", "max_new_tokens": 16, "batch_size": 8}


def test_the_candidate_best_on_validation_becomes_the_model_and_the_test_split_is_never_read(trained):
    runner, recipe = with_stage(
        trained,
        {**distill_stage("cands", objective="logits_kd", max_steps=2),
         "variants": {"two_steps": {}, "twelve_steps": {"max_steps": 12, "lr": 3e-3}}},
        {"name": "best", "kind": "select", "candidates": ["cands", "student"], "decoding": GREEDY},
        {"name": "eval_best", "kind": "evaluate", "models": ["best", "cands"], "decoding": GREEDY, "timing_passes": 0},
    )
    assert runner.recipe.stage("best").config.candidates == ["cands", "student"]
    assert [s.key for s in runner.recipe.instances if s.name == "best"] == ["best"]  # one stage, three candidates
    runner.run(only="cands@two_steps")
    runner.run(only="cands@twelve_steps")
    runner.run(only="best")
    record = json.loads((runner.run_dir / "best" / "stage.json").read_text())
    choice = record["select"]
    assert set(choice["scores"]) == {"cands@two_steps", "cands@twelve_steps", "student"}
    assert choice["chosen"] == max(choice["scores"], key=choice["scores"].get)
    assert choice["split"] == "validation" and choice["examples"] == len(runner.data()["validation"])
    assert "test" not in json.dumps(record["data_fingerprint"]) and runner.fingerprint_parts(
        runner.recipe.stage("best"))["data"] == runner.data_fingerprint(("validation",))
    # each score is the candidate's own validation BLEU, decoded as the stage says
    name = "cands@twelve_steps"
    model, tokenizer = load_pretrained(str(runner.run_dir / name))
    encoded, _ = encode(runner.data()["validation"], tokenizer, 48, 48)
    outputs = generate(model, tokenizer, list(encoded["source_ids"]), DecodingConfig(**GREEDY), runner.accelerator,
                       progress=False)
    expected = text_metrics([o[0] for o in outputs], list(runner.data()["validation"]["target"]))["bleu"]
    assert abs(choice["scores"][name] - expected) < 1e-3
    # the stage's model is the chosen candidate's, weight for weight
    ours = safetensors.torch.load_file(str(runner.run_dir / "best" / "model.safetensors"))
    theirs = safetensors.torch.load_file(str(runner.run_dir / choice["chosen"] / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    # an evaluate stage on test reads it by the select stage's name; the report follows it to its candidate
    runner.run(only="eval_best")
    from nlgkd.report import is_distilled, stage_chain, stage_records

    stages = stage_records(runner.run_dir)
    assert stage_chain("best", stages)[:2] == ["best", choice["chosen"]]
    assert is_distilled("best", stages) == (choice["chosen"] != "student")
    from nlgkd.report import collect, quality_table

    names = [row[0] for row in quality_table(collect(runner.run_dir))[1]]
    assert f"best (= {choice['chosen']})" in names  # the table says which candidate the row is
