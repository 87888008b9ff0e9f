"""The runner end to end on a tiny recipe: artifacts, stage.json, skipping, --stage/--from, resuming a
killed stage, and the same results on 2 processes as on 1."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

from nlgkd.cli import main as cli_main
from nlgkd.loop import latest_checkpoint
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError

from conftest import distill_stage, kill_once, with_stage, with_two_process_stages

def test_tiny_recipe_runs_then_skips(tmp_path, tiny_recipe):
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    assert runner.run() == {"teacher": "ran", "eval": "ran"}
    run_dir = tmp_path / "tiny"
    record = json.loads((run_dir / "teacher" / "stage.json").read_text())
    assert record["status"] == "done" and record["kind"] == "finetune"
    assert record["train"]["steps"] == 12 and record["versions"]["torch"]
    assert record["config"]["max_steps"] == 12 and record["fingerprint"] == runner.fingerprint(runner.recipe.stages[0])
    assert not (run_dir / "teacher" / "checkpoints").exists()
    assert not list(run_dir.glob(".*partial"))

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # plain transformers can load the artifact

    assert (run_dir / "teacher" / "model.safetensors").exists()
    AutoModelForSeq2SeqLM.from_pretrained(run_dir / "teacher")
    AutoTokenizer.from_pretrained(run_dir / "teacher")

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["teacher"]) >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "params", "seq_per_s", "latency_ms"}
    settings = metrics["teacher"]["decoding_settings"]  # what the report matches teacher rows by
    assert settings["strategy"] == "greedy" and settings["max_new_tokens"] == 24 and "batch_size" not in settings
    # speed: the median of 3 timed passes over the same 2 batches (16 inputs, batch_size 8) after the scored one
    timing, row = metrics["teacher"]["timing"], metrics["teacher"]
    assert timing["passes"] == 3 and len(timing["seconds"]) == 3 and timing["batches"] == 2
    median = sorted(timing["seconds"])[1]
    assert row["latency_ms"] == pytest.approx(1000 * median / 2, rel=1e-3)
    assert row["seq_per_s"] == pytest.approx(16 / median, rel=1e-3)
    # the recorded seconds are rounded to the microsecond: the spread recomputed from them is within 2 us / median
    assert row["latency_spread"] == pytest.approx((max(timing["seconds"]) - min(timing["seconds"])) / median,
                                                  abs=2e-6 / median)
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "teacher")
    own_bytes = sum({t.data_ptr(): t.numel() * t.element_size()
                     for t in [*model.parameters(), *model.buffers()]}.values())
    assert row["weights_mb"] == pytest.approx(own_bytes / 2**20) and row["peak_mem_kind"] in ("cpu_peak_rss", "cpu_max_rss")
    predictions = (run_dir / "eval" / "predictions" / "teacher.jsonl").read_text().splitlines()
    assert len(predictions) == 16

    started = time.time()
    again = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    assert again.run() == {"teacher": "skipped", "eval": "skipped"}
    assert time.time() - started < 10
    assert again._accelerator is None  # skipping started no accelerate (nor imported torch for it)
    # ... and `nlgkd run` in a fresh interpreter decides it without importing torch, transformers or datasets
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    code = ("import sys; from nlgkd.cli import main; "
            f"assert main(['run', {str(tmp_path / 'r.yaml')!r}, '--runs-dir', {str(tmp_path)!r}]) == 0; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))")
    rerun = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "skipped 2 finished one(s)" in rerun.stdout and rerun.stdout.strip().endswith("[]")

    # changing only the evaluation re-runs only the evaluation
    tiny_recipe["stages"][1]["decoding"]["strategy"] = "beam"
    changed = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    assert changed.run() == {"teacher": "skipped", "eval": "ran"}
    assert changed.run(start_from="teacher")["teacher"] == "ran"


def test_stage_whose_input_is_missing(tmp_path, tiny_recipe):
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    with pytest.raises(StageError, match=r"stage 'eval' needs 'teacher' \(models\[0\]\), which has not finished.*--stage teacher"):
        runner.run(only="eval")


def test_run_dir_not_writable(tmp_path, tiny_recipe):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runner = Runner(parse_recipe(tiny_recipe), runs_root=blocker / "runs")
    with pytest.raises(StageError, match=r"is not writable .*--runs-dir"):
        runner.run()


def test_cli_reports_recipe_errors(tmp_path, tiny_recipe, capsys):
    tiny_recipe["stages"][0]["lr"] = "fast"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    # in-process: a subprocess would spend most of a minute importing transformers on a slow disk
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[0] (teacher).lr: expected a number, got 'fast'" in err
    assert "Traceback" not in err


def test_a_stage_option_given_twice_is_an_error_not_the_last_one_alone(tmp_path, capsys):
    # argparse would keep the second name and run that stage alone, without a word
    for option in ("--stage", "--from"):
        with pytest.raises(SystemExit) as stopped:
            cli_main(["run", "r.yaml", option, "teacher", option, "eval"])
        assert stopped.value.code == 2
        assert f"{option} is given twice ('teacher', 'eval'); it names one stage" in capsys.readouterr().err


def test_killed_stage_resumes_from_checkpoint(tmp_path, tiny_recipe, capsys):
    teacher = tiny_recipe["stages"][0]
    teacher.update(max_steps=30, save_every=5, eval_every=1000, log_every=50)
    tiny_recipe["stages"] = [teacher]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    checkpoints = tmp_path / "runs" / "tiny" / ".teacher.partial" / "checkpoints"
    kill_once(["run", str(path), "--runs-dir", str(tmp_path / "runs")], tmp_path,
              ready=lambda: bool(list(checkpoints.glob("step-*"))), what="raise max_steps")
    assert not (tmp_path / "runs" / "tiny" / "teacher").exists()  # no half artifact that looks finished

    # the re-run in-process (the killed run was a real process): the same CLI, without another minute of imports
    assert cli_main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "resuming from checkpoint step-" in capsys.readouterr().out
    record = json.loads((tmp_path / "runs" / "tiny" / "teacher" / "stage.json").read_text())
    assert record["train"]["steps"] == 30 and record["train"]["resumed_from"] >= 5


def multi_stage_recipe(tiny_recipe) -> dict:
    """teacher -> pruned student -> student_ft -> distill: three training stages, checkpoints every 2 steps."""
    train = {"batch_size": 16, "eval_samples": 0, "eval_every": 1000, "save_every": 2, "log_every": 50}
    tiny_recipe["stages"] = [
        {**tiny_recipe["stages"][0], **train, "max_steps": 4},
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0]},
        {"name": "student_ft", "kind": "finetune", "model": "student", "max_steps": 10, **train},
        {"name": "distill", "kind": "distill", "student": "student", "teacher": "teacher", "max_steps": 10, **train},
    ]
    return tiny_recipe


@pytest.mark.parametrize("killed_in", ["student_ft", "distill"])
def test_a_recipe_killed_in_its_2nd_or_3rd_training_stage_resumes_to_the_same_weights(tmp_path, tiny_recipe,
                                                                                      killed_in, capsys):
    from safetensors.torch import load_file

    recipe = multi_stage_recipe(tiny_recipe)
    Runner(parse_recipe(copy.deepcopy(recipe)), runs_root=tmp_path / "whole").run()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    root = tmp_path / "killed"
    checkpoints = root / "tiny" / f".{killed_in}.partial" / "checkpoints"
    kill_once(["run", str(path), "--runs-dir", str(root)], tmp_path,
              ready=lambda: (checkpoints / "step-4" / "trainer_state.json").exists(), what="raise max_steps")
    # the checkpoint holds this stage's model and optimizer only, not the earlier stages' ones
    saved = sorted(p.name for p in latest_checkpoint(checkpoints).iterdir())
    assert "model.safetensors" in saved and not [name for name in saved if "_1" in name]

    assert cli_main(["run", str(path), "--runs-dir", str(root)]) == 0
    assert f"[{killed_in}] resuming from checkpoint step-" in capsys.readouterr().out
    record = json.loads((root / "tiny" / killed_in / "stage.json").read_text())
    earlier = record["train"]["earlier_seconds"]  # the killed run's time up to its checkpoint counts too
    assert earlier["wall"] > 0 and record["wall_seconds"] >= record["wall_seconds_this_run"] + earlier["wall"] - 0.02  # each rounded to 0.01
    for stage in ("student_ft", "distill"):
        ours = load_file(str(root / "tiny" / stage / "model.safetensors"))
        theirs = load_file(str(tmp_path / "whole" / "tiny" / stage / "model.safetensors"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), stage


def test_a_stage_from_an_earlier_stages_model_trains_the_same_twice(tmp_path, tiny_recipe):
    # dropout draws from the global generator; a stage that loads an earlier model (no fresh init seeds it)
    # used to start from wherever loading left that generator, so two runs logged different losses
    tiny_recipe["models"]["teacher"]["dropout"] = 0.3
    tiny_recipe["stages"] = [
        {**tiny_recipe["stages"][0], "max_steps": 4, "save_every": None},
        {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0]},
        {"name": "student_ft", "kind": "finetune", "model": "student", "max_steps": 6, "batch_size": 16,
         "log_every": 1, "eval_every": 1000, "eval_samples": 0, "save_every": None},
    ]
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    runner.run()
    metrics = tmp_path / "tiny" / "student_ft" / "metrics.jsonl"
    first = [json.loads(line) for line in metrics.read_text().splitlines()]
    torch.rand(7)  # the generator elsewhere than after the first run's loading: a second run must not care
    runner.run(only="student_ft", force=True)
    again = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [row["loss"] for row in first if "loss" in row]
    assert len(losses) == 6 and losses == [row["loss"] for row in again if "loss" in row]
    assert first == again


def test_two_processes_give_the_same_results_as_one(trained, two_processes):
    # a fresh model (its tokenizer trained, checkpoints saved) fine-tuned on 2 processes, then evaluated
    two = two_processes
    runner = Runner(parse_recipe(with_two_process_stages(trained)), runs_root=trained[1])
    runner.run(only="ft2")
    runner.run(only="eval2")
    assert json.loads((two / "ft2" / "stage.json").read_text())["world_size"] == 2
    read = lambda run_dir: [json.loads(line)["prediction"] for line in
                            (run_dir / "eval2" / "predictions" / "ft2.jsonl").read_text().splitlines()]
    assert read(two) == read(runner.run_dir)
    assert len(read(two)) == 16
    # the same training, not only the same outputs: the losses logged at every step and the final weights
    from safetensors.torch import load_file

    losses = lambda run_dir: [json.loads(line)["loss"] for line in (run_dir / "ft2" / "metrics.jsonl").read_text()
                              .splitlines() if "loss" in json.loads(line)]
    assert len(losses(two)) == 14 and losses(two) == pytest.approx(losses(runner.run_dir), rel=1e-5)
    ours, theirs = (load_file(str(d / "ft2" / "model.safetensors")) for d in (two, runner.run_dir))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs)


def test_a_second_run_on_a_live_run_directory_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, tiny_recipe):
    from conftest import forked_nlgkd

    tiny_recipe["stages"][0].update(max_steps=400, save_every=1000, eval_every=1000)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    partial = tmp_path / "runs" / "tiny" / ".teacher.partial"
    first = forked_nlgkd(["run", str(path), "--runs-dir", str(tmp_path / "runs")], tmp_path, nice=15)
    first.start()
    deadline = time.time() + 300
    while time.time() < deadline and first.is_alive() and not (partial / "metrics.jsonl").exists():
        time.sleep(0.05)
    assert first.is_alive(), "the first run ended before the second could start"
    with pytest.raises(StageError, match=rf"runs/tiny is in use by process {first.pid} \(`nlgkd run .*r\.yaml.*`, "
                                         r"started .*\); wait for it to end, stop it, or give this run another "
                                         r"--runs-dir"):
        Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path / "runs").run()
    assert partial.exists()  # the refused run touched nothing
    first.kill()
    first.join()
    tiny_recipe["stages"][0].update(max_steps=4)  # the lock died with its process: a run goes ahead
    assert Runner(parse_recipe(tiny_recipe), runs_root=tmp_path / "runs").run()["teacher"] == "ran"


def test_a_stage_reruns_only_when_what_it_reads_changes_and_says_why(tmp_path, tiny_recipe, capsys):
    from nlgkd.data import load_splits
    from nlgkd.config import DataConfig, DemoSizes

    # the tiny recipe's demo data written as files, so that one split can change alone
    splits, _ = load_splits(DataConfig(task="demo", demo=DemoSizes(**tiny_recipe["data"]["demo"])))
    for split in ("train", "validation", "test", "unlabeled"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in splits[split]))
    tiny_recipe["data"] = {"dir": str(tmp_path), "train": "train.jsonl", "validation": "validation.jsonl",
                           "test": "test.jsonl", "max_source_length": 48, "max_target_length": 48}
    tiny_recipe["stages"][0].update(max_steps=2, eval_samples=0, save_every=None)
    tiny_recipe["stages"].append({"name": "pts", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train"],
                                  "max_examples": 4, "decoding": {"strategy": "sample", "max_new_tokens": 4}})
    runs = tmp_path / "runs"
    assert set(Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=runs).run().values()) == {"ran"}

    # an unlabeled file joins the recipe: no finished stage reads it, so none runs again
    tiny_recipe["data"]["unlabeled"] = "unlabeled.jsonl"
    assert set(Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=runs).run().values()) == {"skipped"}
    # ... until a stage reads it; and a changed config says what changed
    tiny_recipe["stages"][2]["inputs"] = ["train", "unlabeled"]
    tiny_recipe["stages"][1]["decoding"] = {"strategy": "greedy", "max_new_tokens": 12, "batch_size": 4}
    capsys.readouterr()
    Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=runs).dry_run()  # says what the run will say
    planned = capsys.readouterr().out
    assert "[eval] would run (evaluate): finished before, runs again and replaces it: decoding.batch_size 8 -> 4; " \
           "decoding.max_new_tokens 24 -> 12" in planned
    assert "[teacher] would be skipped: done earlier with the same inputs and config" in planned
    outcome = Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=runs).run()
    assert outcome == {"teacher": "skipped", "eval": "ran", "pts": "ran"}
    out = capsys.readouterr().out
    assert "[eval] finished before, runs again and replaces it: decoding.batch_size 8 -> 4; " \
           "decoding.max_new_tokens 24 -> 12" in out
    assert "[pts] finished before, runs again and replaces it: inputs ['train'] -> ['train', 'unlabeled']; " \
           "the data it reads changed (train, unlabeled or the data settings)" in out
    # the train file changes: the teacher, and so everything after it, runs again
    (tmp_path / "train.jsonl").write_text((tmp_path / "train.jsonl").read_text().replace("Giraffe", "Okapi"))
    capsys.readouterr()
    assert Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=runs).run()["teacher"] == "ran"
    # (its input too: the fresh model's tokenizer is trained on the train split)
    out = capsys.readouterr().out
    assert "[teacher] finished before, runs again and replaces it: its input 'teacher' (model) changed; the data " \
           "it reads changed (train, validation" in out
    assert "[eval] finished before, runs again and replaces it: its input 'teacher' (models[0]) changed" in out
    # plan.json: the fingerprints under the recipe of this last run, which the finished stages now carry
    plan = json.loads((runs / "tiny" / "plan.json").read_text())["fingerprints"]
    assert plan == {key: json.loads((runs / "tiny" / key / "stage.json").read_text())["fingerprint"]
                    for key in ("teacher", "eval", "pts")}


def test_rerun_reasons_follow_inputs_by_name(trained):
    """A model added at the front of an evaluate stage's list is a config change; the models already there
    are the same inputs, not 'changed' because their place in the list moved."""

    stage = {"name": "eval_by_name", "kind": "evaluate", "models": ["student"], "max_examples": 2,
             "timing_passes": 0, "decoding": {"strategy": "greedy", "max_new_tokens": 4, "batch_size": 2}}
    runner, _ = with_stage(trained, stage)
    assert runner.run(only="eval_by_name")["eval_by_name"] == "ran"
    runner, _ = with_stage(trained, {**stage, "models": ["teacher", "student"]})
    assert runner.rerun_reasons(runner.recipe.instances[-1]) == ["models ['student'] -> ['teacher', 'student']"]

    # a record that does not say which name a place read (an older layout) is compared place by place
    path = runner.finished_dir(runner.recipe.instances[-1]) / "stage.json"
    record = json.loads(path.read_text())
    runner, _ = with_stage(trained, {**stage, "models": ["teacher"]})
    record["config"].pop("models")
    path.write_text(json.dumps(record))
    assert runner.rerun_reasons(runner.recipe.instances[-1]) == ["models None -> ['teacher']",
                                                                 "its input 'teacher' (models[0]) changed"]


def test_no_model_outlives_its_stage(tmp_path, tiny_recipe):
    import gc
    import warnings
    import weakref

    from transformers import PreTrainedModel

    def models_and_optimizers():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on every object wakes torch.distributed's deprecated names
            warnings.simplefilter("ignore")
            return [o for o in gc.get_objects() if isinstance(o, (PreTrainedModel, torch.optim.Optimizer))]

    before = weakref.WeakSet(models_and_optimizers())  # other tests' fixtures may hold models of their own
    tiny_recipe["stages"] = [{**tiny_recipe["stages"][0], "max_steps": 2, "eval_samples": 0, "save_every": 1}]
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)  # alive, as during the next stages of a run
    runner.run()
    alive = [type(o).__name__ for o in models_and_optimizers() if o not in before]
    assert alive == [], f"still in memory after the stage: {alive}"  # an optimizer holds the parameters and moments


def test_a_damaged_artifact_is_named_before_a_stage_reads_it(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0].update(max_steps=2, eval_samples=0, save_every=None)
    Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path).run(only="teacher")
    record = json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record["files"])
    weights = tmp_path / "tiny" / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a disk that filled up, a copy that stopped half-way
    with pytest.raises(StageError, match=r"teacher/model\.safetensors has 1,000 bytes, not [\d,]+; stage 'teacher' "
                                         r"made it: make it again with `nlgkd run RECIPE --stage teacher --force`"):
        Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path).run(only="eval")
    assert Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path).run(only="teacher", force=True)
    assert Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path).run(only="eval") == {"eval": "ran"}


def test_fields_added_at_their_old_behaviour_keep_the_fingerprints_of_finished_stages(tmp_path, tiny_recipe):
    from nlgkd.fingerprints import short_hash
    from nlgkd.recipe import to_dict
    from nlgkd.runner import ADDED_FIELDS_AT_DEFAULT

    tiny_recipe["stages"].append({"name": "distill", "kind": "distill", "student": "teacher", "teacher": "teacher",
                                  "objective": "logits_kd", "joint_teaching": {"student_ratio": 0.5}})
    tiny_recipe["stages"].append({"name": "pts", "kind": "pseudo_targets", "teacher": "teacher"})
    runner = Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path)
    teacher, evaluate, distill, pts = runner.recipe.stages
    # what an earlier nlgkd hashed: the same config without the added fields
    before = {name: to_dict(stage.config) for name, stage in (("teacher", teacher), ("distill", distill))}
    decoding_fields = ("early_stopping", "min_new_tokens", "repetition_penalty", "forced_bos_token", "from_checkpoint")
    for config in before.values():
        for key in ("group_by_length", "compile", "fused_adamw", "validation_decoding"):
            config.pop(key, None)  # validation_decoding: None, which to_dict leaves out
    jt = before["distill"]["joint_teaching"]
    del jt["steps_per_draw"], jt["stop_share"], jt["engine"], jt["engine_refresh_every"], jt["engine_quantization"]
    del jt["mix"]
    before["evaluate"] = to_dict(evaluate.config)
    before["pts"] = to_dict(pts.config)
    del before["pts"]["engine"], before["pts"]["engine_quantization"]
    for decoding in (jt["decoding"], before["evaluate"]["decoding"], before["pts"]["decoding"]):
        for key in decoding_fields:
            del decoding[key]
    assert runner.fingerprint_parts(teacher)["config"] == before["teacher"]
    assert runner.fingerprint_parts(distill)["config"] == before["distill"]
    assert runner.fingerprint_parts(evaluate)["config"] == before["evaluate"]
    assert runner.fingerprint_parts(pts)["config"] == before["pts"]
    assert len(ADDED_FIELDS_AT_DEFAULT) == 2 + 2 + 2 + 4 + 2 * len(decoding_fields)
    # speed settings are never hashed
    for key, value in (("compile", True), ("fused_adamw", "no")):
        changed = copy.deepcopy(tiny_recipe)
        changed["stages"][2][key] = value
        other = Runner(parse_recipe(changed), runs_root=tmp_path)
        assert other.fingerprint(other.recipe.stages[2]) == runner.fingerprint(distill), key
    # set to anything else, each added field is hashed like any other field
    for path in ADDED_FIELDS_AT_DEFAULT:
        changed = copy.deepcopy(tiny_recipe)
        *parents, leaf = path.split(".")
        # the PT stage's engine fields, the evaluate stage's decoding, else the distill stage
        index = 3 if path.startswith("engine") else 1 if path.startswith("decoding.") else 2
        node = changed["stages"][index]
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = {"group_by_length": True, "steps_per_draw": 2, "stop_share": 0.9, "early_stopping": False,
                      "validation_decoding": {"strategy": "beam"}, "min_new_tokens": 2, "repetition_penalty": 1.2,
                      "forced_bos_token": "<s>", "from_checkpoint": ["min_length"], "engine": "ctranslate2",
                      "engine_quantization": "int8", "engine_refresh_every": 5, "mix": "rows"}[leaf]
        other = Runner(parse_recipe(changed), runs_root=tmp_path)
        assert short_hash(other.fingerprint_parts(other.recipe.stages[index])) != \
            short_hash(runner.fingerprint_parts(runner.recipe.stages[index])), path


def test_setting_an_added_field_back_to_its_default_names_the_default_as_the_reason(tmp_path, tiny_recipe):
    tiny_recipe["stages"] = [{**tiny_recipe["stages"][0], "max_steps": 1, "eval_samples": 0, "save_every": None,
                              "group_by_length": True}]
    Runner(parse_recipe(copy.deepcopy(tiny_recipe)), runs_root=tmp_path).run()
    tiny_recipe["stages"][0]["group_by_length"] = False  # back to the default, which fingerprints leave out
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    assert runner.rerun_reasons(runner.recipe.stages[0]) == ["group_by_length True -> False"]


def test_each_evaluation_line_says_what_it_measured(trained, capsys):
    """A training stage's log line names the data of its numbers (a denoising stage's val_loss is on the gold
    validation pairs, which it never trained on), and the words stay out of metrics.jsonl."""
    runner, _ = with_stage(trained, distill_stage("said_eval", objective="finetune", max_steps=2, eval_every=2,
                                                  eval_samples=4))
    runner.run(only="said_eval")
    n = len(runner.data()["validation"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "step 2: val_loss" in x)
    assert line.endswith(f"[val_loss: gold targets of {n} validation pairs; bleu, chrf: the first 4 decoded "
                         "(greedy)]"), line
    assert "measured_on" not in (runner.run_dir / "said_eval" / "metrics.jsonl").read_text()
