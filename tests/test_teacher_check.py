"""The weak-teacher guard (nlgkd/teacher_check.py): trivial baselines scored on the teacher's validation
examples, recorded in stage.json, a warning or a stop before students learn from a useless teacher, and the
report's marks."""
from __future__ import annotations

import copy
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
    # a teacher validated with beam search (validation decodes as the evaluate stage) is said to be so
    beam = judge({"bleu": copy_bleu - 1, "chrf": 10.0}, SOURCES, REFERENCES, TRAIN_TARGETS, decoding="beam")
    said = weak_teacher_message("teacher", beam, ["distill"], "warn")
    assert beam["decoding"] == "beam" and "(beam decoding)" in said and "to see whether beam search" not in said


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


def test_a_teacher_exported_for_engine_pts_is_checked_and_stopped_like_the_model_itself(tmp_path, tiny_recipe):
    pytest.importorskip("ctranslate2")
    recipe = three_step_teacher_recipe(tiny_recipe, "stop")
    recipe["stages"] = recipe["stages"][:1] + [
        {"name": "teacher_ct2", "kind": "export", "model": "teacher", "quantization": "float32"},
        {"name": "pts", "kind": "pseudo_targets", "teacher": "teacher_ct2", "engine": "ctranslate2",
         "decoding": {"strategy": "greedy", "max_new_tokens": 8}}]
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path)
    assert runner.teacher_users(runner.recipe.stages[0]) == ["pts"]  # the export's user learns from the teacher
    with pytest.raises(StageError, match=r"stage 'pts': weak teacher: 'teacher' scores BLEU .* will not start"):
        runner.run()
    record = json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())
    assert record["teacher_check"]["weak"] and not (tmp_path / "tiny" / "pts").exists()


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


# --------------------------------------------------------------------- teacher vs the student trained alone
def lead_recipe(tiny_recipe, policy: str) -> dict:
    """A teacher trained 20 steps, its pruned student trained alone 200 (which overtakes it), then distill."""
    tiny_recipe["on_weak_teacher"] = policy
    tiny_recipe["data"]["demo"].update(train=320, validation=32)
    teacher = {**tiny_recipe["stages"][0], "max_steps": 20, "eval_every": 10, "eval_samples": 16, "save_every": None,
               "early_stopping_metric": "bleu"}
    tiny_recipe["stages"] = [
        teacher,
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0]},
        {"name": "student_ft", "kind": "finetune", "model": "student", "max_steps": 200, "batch_size": 16,
         "lr": 3e-3, "eval_every": 200, "eval_samples": 0, "save_every": None},
        {"name": "distill", "kind": "distill", "student": "student", "teacher": "teacher", "max_steps": 5,
         "batch_size": 16, "eval_samples": 0, "save_every": None},
    ]
    return tiny_recipe


def test_a_teacher_that_trails_its_students_ce_twin_is_named_before_distill_trains(tmp_path, tiny_recipe, capsys):
    recipe = lead_recipe(tiny_recipe, "warn")
    recipe["stages"].append({"name": "eval", "kind": "evaluate", "models": ["student_ft", "distill"], "timing_passes": 0,
                             "decoding": {"strategy": "greedy", "max_new_tokens": 24, "batch_size": 8}})
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path)
    assert runner.recipe.stages[3].config.ce_student == "student_ft"  # found: the finetune stage of its student
    runner.run()
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "tiny" / "distill" / "stage.json").read_text())
    lead = record["teacher_lead"]
    assert lead["checked"] and lead["weak"] and lead["examples"] == 32 and lead["ce_student"] == "student_ft"
    assert lead["lead"] == pytest.approx(lead["teacher_bleu"] - lead["ce_student_bleu"], abs=0.011)
    assert lead["lead"] < 1.0
    warning = out.index("WARNING the teacher leads the student trained alone")
    assert warning < out.index("[distill] finished")
    assert "min_teacher_lead 1" in out[warning:] and "on_weak_teacher: stop" in out[warning:]
    # the teacher ended at its step cap while its validation BLEU still rose: stage.json and a warning say so
    convergence = json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())["convergence"]
    assert convergence["stopped_by"] == "max_steps" and [e["step"] for e in convergence["last_evaluations"]] == [10, 20]
    if convergence["converged"] is False:
        assert "WARNING not converged" in out
    # the report puts the lead beside the distilled student's gain over the same CE student
    from nlgkd.report import write_report

    report = write_report(collect(tmp_path / "tiny"))[0].read_text()
    metrics = json.loads((tmp_path / "tiny" / "eval" / "metrics.json").read_text())
    gain = metrics["distill"]["bleu"] - metrics["student_ft"]["bleu"]
    row = next(line for line in report.splitlines() if line.startswith("| distill | teacher |"))
    assert f"| {lead['lead']:+.2f} (weak) | {gain:+.2f} |" in row and "## Teacher lead" in report


def test_on_weak_teacher_stop_stops_before_distill_trains(tmp_path, tiny_recipe):
    # the 20-step teacher as a checkpoint a user brings (a models: entry): no trivial-baseline gate stops the
    # recipe before the teacher-vs-student check does
    warm = Runner(parse_recipe(lead_recipe(copy.deepcopy(tiny_recipe), "warn")), runs_root=tmp_path / "made")
    warm.run(only="teacher")
    recipe = lead_recipe(tiny_recipe, "stop")
    recipe["models"]["brought"] = {"init": "pretrained", "name_or_path": str(tmp_path / "made" / "tiny" / "teacher")}
    recipe["stages"] = recipe["stages"][1:]
    recipe["stages"][0]["from"] = "brought"
    recipe["stages"][2]["teacher"] = "brought"
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path)
    runner.run(only="student")
    runner.run(only="student_ft")
    with pytest.raises(StageError, match=r"stopped before training \(on_weak_teacher: stop\): the teacher leads"):
        runner.run(only="distill")
    assert not (tmp_path / "tiny" / "distill").exists()
    partial = tmp_path / "tiny" / ".distill.partial"
    assert not (partial / "metrics.jsonl").exists() and not (partial / "checkpoints").exists()


def test_a_teacher_cut_short_by_its_step_cap_is_reported_as_not_converged():
    from types import SimpleNamespace

    from nlgkd.config import FinetuneConfig
    from nlgkd.loop import LoopResult
    from nlgkd.stages.training import record_convergence

    def recorded(history, stopped_early, users=("distill",)):
        lines = []
        ctx = SimpleNamespace(info={}, log=lines.append, stage=SimpleNamespace(key="teacher"),
                              teacher_users=list(users))
        best = max(history, key=lambda h: h["bleu"])
        result = LoopResult(steps=history[-1]["step"], epochs=1.0, best=best, stopped_early=stopped_early,
                            resumed_from=None, history=history)
        record_convergence(ctx, result, FinetuneConfig(model="m", early_stopping_metric="bleu", patience=3))
        return ctx.info["convergence"], lines

    # the held-out translation teacher: 11.6 / 15.2 / 17.3 / 19.1 at steps 500-2000, then the cap
    rising = [{"step": 500 * (i + 1), "bleu": b} for i, b in enumerate([11.6, 15.2, 17.3, 19.1])]
    record, lines = recorded(rising, stopped_early=False)
    assert record == {"converged": False, "stopped_by": "max_steps", "evaluations_after_best": 0, "metric": "bleu",
                      "last_evaluations": rising}
    assert len(lines) == 1 and "WARNING not converged" in lines[0] and "17.30 -> 19.10" in lines[0]
    assert "Raise max_steps" in lines[0] and "distill" in lines[0]
    # stopped by patience: converged, and nothing to warn about
    dipped = rising[:2] + [{"step": 1500, "bleu": 14.0}]
    assert recorded(dipped, stopped_early=True)[0]["converged"] is True
    # the cap one evaluation after the best, with patience 3: patience had not run out, it may still improve
    cut, warned = recorded(dipped, stopped_early=False)
    assert cut["converged"] is False and cut["evaluations_after_best"] == 1 and "1 evaluation(s) after its best" in \
        warned[0]
    # the cap 3 evaluations after the best: as good as stopped by patience
    flat = dipped + [{"step": 2000, "bleu": 14.5}, {"step": 2500, "bleu": 13.9}]
    assert recorded(flat, stopped_early=False)[0]["converged"] is True and recorded(flat, False)[1] == []
    # a stage no later stage learns from is recorded, not warned about
    assert recorded(rising, stopped_early=False, users=())[1] == []
