"""The weak-teacher guard (nlgkd/teacher_check.py): trivial baselines scored on the teacher's validation
examples, recorded in stage.json, a warning or a stop before students learn from a useless teacher, and the
report's marks."""
from __future__ import annotations

import json

import pytest
import sacrebleu

from nlgkd.recipe import parse_recipe
from nlgkd.report import collect, quality_table, weak_teachers_note
from nlgkd.runner import Runner, StageError
from nlgkd.teacher_check import baseline_predictions, judge, weak_teacher_message

SOURCES = ["thou art a villain", "I prithee stay", "get thee gone", "what sayest thou"]
REFERENCES = ["you are a villain", "please stay", "get out of here", "what do you say"]
TRAIN_TARGETS = ["yes", "no", "please stay", "yes", "no"]


def test_baselines_are_the_sources_and_the_most_frequent_training_target():
    predictions = baseline_predictions(SOURCES, TRAIN_TARGETS)
    assert predictions["copy_source"] == SOURCES
    assert predictions["most_frequent_target"] == ["yes"] * 4  # "yes" and "no" tie: the first seen wins
    assert "most_frequent_target" not in baseline_predictions(SOURCES, [])  # unlabeled-only data


def test_a_teacher_below_copying_the_source_is_weak_and_the_scores_are_sacrebleus():
    copy_bleu = sacrebleu.corpus_bleu(SOURCES, [REFERENCES]).score
    check = judge({"bleu": copy_bleu - 1, "chrf": 10.0}, SOURCES, REFERENCES, TRAIN_TARGETS)
    assert check["baselines"]["copy_source"]["bleu"] == round(copy_bleu, 2) > 0
    assert check["baselines"]["copy_source"]["chrf"] == round(sacrebleu.corpus_chrf(SOURCES, [REFERENCES]).score, 2)
    assert check["weak"] and "copy_source" in check["beaten_by"] and check["examples"] == 4
    message = weak_teacher_message("teacher", check, ["distill", "pts"], "warn")
    assert f"BLEU {copy_bleu - 1:.2f}" in message and f"copying the source scores {copy_bleu:.2f}" in message
    assert "distill, pts" in message and "arch: mbart" in message and "on_weak_teacher: stop" in message
    # the check decodes greedily, and says so, with the way to score beam search against the same bar
    assert check["decoding"] == "greedy" and "(greedy decoding)" in message
    assert "split: validation, max_examples: 4, decoding: {strategy: beam" in message
    assert "will not start" in weak_teacher_message("teacher", check, ["distill"], "stop")


def test_a_teacher_above_every_baseline_passes_and_a_tie_does_not():
    perfect = judge({"bleu": 100.0, "chrf": 100.0}, SOURCES, REFERENCES, TRAIN_TARGETS)
    assert not perfect["weak"] and perfect["beaten_by"] == []
    copy_bleu = round(sacrebleu.corpus_bleu(SOURCES, [REFERENCES]).score, 2)
    tie = judge({"bleu": copy_bleu, "chrf": 0.0}, SOURCES, REFERENCES, TRAIN_TARGETS)
    assert tie["weak"] and tie["beaten_by"] == ["copy_source"]  # equal is not better


def three_step_teacher_recipe(tiny_recipe, policy: str) -> dict:
    recipe = tiny_recipe
    recipe["on_weak_teacher"] = policy
    recipe["stages"] = [
        {**recipe["stages"][0], "max_steps": 3, "eval_every": 3, "save_every": None},
        {"name": "other", "kind": "finetune", "model": "teacher", "max_steps": 1, "batch_size": 16,
         "eval_samples": 0, "save_every": None},  # trains, but teaches nobody: not checked
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0]},
        {"name": "distill", "kind": "distill", "student": "student", "teacher": "teacher", "max_steps": 1,
         "batch_size": 16, "eval_samples": 0, "save_every": None},
    ]
    return recipe


def test_a_three_step_teacher_is_flagged_in_stage_json_and_warned_about(tmp_path, tiny_recipe, capsys):
    runner = Runner(parse_recipe(three_step_teacher_recipe(tiny_recipe, "warn")), runs_root=tmp_path)
    assert runner.run() == {"teacher": "ran", "other": "ran", "student": "ran", "distill": "ran"}
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())
    check = record["teacher_check"]
    assert check["weak"] and check["examples"] == 8 and check["split"] == "validation"
    assert check["teacher"]["bleu"] == round(record["train"]["best"]["bleu"], 2)  # the loop's score, same examples
    assert set(check["baselines"]) == {"copy_source", "most_frequent_target"}
    assert "WARNING weak teacher: 'teacher'" in out and "stages distill would learn its mistakes" in out
    assert "[distill] note: its teacher 'teacher' did not beat the trivial baselines" in out
    assert "teacher_check" not in json.loads((tmp_path / "tiny" / "other" / "stage.json").read_text())


def test_on_weak_teacher_stop_keeps_the_teacher_and_refuses_its_students(tmp_path, tiny_recipe):
    runner = Runner(parse_recipe(three_step_teacher_recipe(tiny_recipe, "stop")), runs_root=tmp_path)
    with pytest.raises(StageError, match=r"stage 'distill': weak teacher: 'teacher' scores BLEU .* will not start"):
        runner.run()
    assert json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())["status"] == "done"
    assert (tmp_path / "tiny" / "student").exists() and not (tmp_path / "tiny" / "distill").exists()
    # a re-run skips the finished teacher and still refuses: the verdict lives in its stage.json
    again = Runner(parse_recipe(three_step_teacher_recipe(tiny_recipe, "stop")), runs_root=tmp_path)
    with pytest.raises(StageError, match="weak teacher"):
        again.run()


def test_on_weak_teacher_takes_warn_or_stop_only(tiny_recipe):
    from nlgkd.config import RecipeError

    tiny_recipe["on_weak_teacher"] = "ignore"
    with pytest.raises(RecipeError, match=r"on_weak_teacher: 'ignore' is not allowed; allowed: warn, stop"):
        parse_recipe(tiny_recipe)


def test_the_report_marks_a_weak_teacher_and_its_students(tmp_path):
    from test_report import metrics, write_stage

    run = tmp_path / "run"
    check = judge({"bleu": 0.5, "chrf": 3.0}, SOURCES, REFERENCES, TRAIN_TARGETS)
    write_stage(run, "teacher", "finetune", {"model": "teacher"}, train={"steps": 3}, teacher_check=check)
    write_stage(run, "kd", "distill", {"student": "student", "teacher": "teacher"}, train={"steps": 5})
    eval_dir = write_stage(run, "eval", "evaluate", {"models": ["teacher", "kd"]})
    (eval_dir / "metrics.json").write_text(json.dumps({"teacher": metrics(0.5, 4000), "kd": metrics(0.4, 2000)}))
    report = collect(run)
    header, body = quality_table(report)
    rows = {row[0]: dict(zip(header, row)) for row in body}
    assert set(rows) == {"teacher (weak teacher)", "kd"}
    assert rows["kd"]["% teacher (bleu)"] == "80.0*"
    note = weak_teachers_note(report)
    assert note.startswith("WEAK TEACHER: teacher (BLEU 0.50 on 4 validation examples; copy source")


def test_evaluate_scores_the_baselines_on_its_split_when_asked(tmp_path, tiny_recipe):
    from nlgkd.data import load_splits
    from nlgkd.config import DataConfig, DemoSizes

    tiny_recipe["stages"][0].update(max_steps=1, eval_samples=0, save_every=None)
    tiny_recipe["stages"][1]["baselines"] = True
    Runner(parse_recipe(tiny_recipe), runs_root=tmp_path).run()
    metrics = json.loads((tmp_path / "tiny" / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "copy_source", "most_frequent_target"]
    splits, _ = load_splits(DataConfig(task="demo", demo=DemoSizes(**tiny_recipe["data"]["demo"])))
    test = splits["test"]
    assert metrics["copy_source"]["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(list(test["source"]), [list(test["target"])]).score)
    assert metrics["copy_source"]["examples"] == len(test) and metrics["copy_source"]["decoding"] == "baseline"
    rows = (tmp_path / "tiny" / "eval" / "predictions" / "copy_source.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["prediction"] == test[0]["source"]


def test_a_teacher_without_validation_data_is_noted_not_judged(tmp_path, tiny_recipe, capsys):
    tiny_recipe["data"]["demo"]["validation"] = 0
    recipe = three_step_teacher_recipe(tiny_recipe, "stop")
    recipe["stages"][0].update(eval_samples=0)
    Runner(parse_recipe(recipe), runs_root=tmp_path).run()  # nothing to judge: nothing stops
    record = json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())
    assert record["teacher_check"] == {"checked": False, "why": "no validation split"}
    assert "no validation split, so this teacher of distill was not compared with trivial baselines" in \
           capsys.readouterr().out


def test_init_std_is_refused_where_nothing_uses_it(tiny_recipe):
    from nlgkd.config import RecipeError

    tiny_recipe["models"]["teacher"].update(arch="t5", init_std=0.1)
    with pytest.raises(RecipeError, match=r"models\.teacher: init_std: only fresh bart and mbart models use it, "
                                          r"and this one is arch t5; remove it"):
        parse_recipe(tiny_recipe)
