"""recipes/own_data.yaml as a user runs it: with data that has no unlabeled inputs, and with stderr into a file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlgkd.pseudo_target_data import load_pseudo_targets
from nlgkd.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "recipes" / "own_data.yaml"
# the template at toy sizes (the flow, not the numbers), as eval/gpu_check.sh's SMOKE mode shrinks it
TINY = ["models.teacher.d_model=32", "models.teacher.ffn_dim=64", "models.teacher.attention_heads=2",
        "models.teacher.vocab_size=300", "stages.teachers.max_steps=4", "stages.teachers.eval_every=2",
        "stages.teachers.eval_samples=4", "stages.student_ft.max_steps=2", "stages.student_ft.eval_every=2",
        "stages.distill.max_steps=2", "stages.distill.eval_every=2", "stages.best.max_examples=4",
        "stages.eval.timing_passes=0", "stages.pts.decoding.num_beams=1"]


def write_labeled_splits(folder: Path) -> None:
    """train, validation and test in the template's columns (original, modern), the demo task's text; no
    unlabeled file."""
    from nlgkd.demo_task import make_demo_splits

    folder.mkdir()
    for split, rows in make_demo_splits({"train": 48, "validation": 8, "test": 8, "unlabeled": 0}, seed=0).items():
        if rows:
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"original": r["source"], "modern": r["target"]}) + "\n" for r in rows))


def test_without_unlabeled_inputs_the_template_reads_the_splits_it_has():
    recipe = load_recipe(TEMPLATE, ["data.unlabeled=null"])
    by_key = {s.key: s.config for s in recipe.instances}
    assert by_key["teachers@mixed"].denoising.splits == ["train"] and by_key["pts"].inputs == ["train"]
    assert by_key["teachers@gold"].denoising is None
    assert any("stages.pts.inputs" in note and "no unlabeled inputs" in note for note in recipe.notes)
    with_them = load_recipe(TEMPLATE)
    assert {s.key: s.config for s in with_them.instances}["pts"].inputs == ["train", "unlabeled"]
    assert not with_them.notes


def test_a_missing_split_other_than_unlabeled_is_refused_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match=r"stages\.eval\.split: 'test' is not in the data.*add data\.test"):
        load_recipe(TEMPLATE, ["data.test=null"])
    with pytest.raises(RecipeError, match=r"stages\.pts\.inputs: 'unlabeled' is not in the data"):
        load_recipe(TEMPLATE, ["data.unlabeled=null", "stages.pts.inputs=[unlabeled]"])  # nothing left to read


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_template_runs_without_unlabeled_inputs_and_logs_no_carriage_return(tmp_path):
    data = tmp_path / "data"
    write_labeled_splits(data)
    sets = [f"--set=data.dir={data}", "--set=data.unlabeled=null", *(f"--set={s}" for s in TINY)]
    validated = subprocess.run([sys.executable, "-m", "nlgkd", "validate", str(TEMPLATE), *sets], cwd=tmp_path,
                               capture_output=True, text=True)
    assert validated.returncode == 0, validated.stderr
    assert "note: stages.pts.inputs: the data has no unlabeled inputs" in validated.stdout
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        done = subprocess.run([sys.executable, "-m", "nlgkd", "run", str(TEMPLATE), "--runs-dir", "runs", *sets],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=880)
    text = log.read_text()
    assert done.returncode == 0, done.stdout[-2000:] + text[-2000:]
    assert "\r" not in text and "teachers@mixed train:" in text  # the bars are there, as whole lines, named
    run = tmp_path / "runs" / "own_data"
    assert json.loads((run / "pts" / "stage.json").read_text())["config"]["inputs"] == ["train"]
    assert set(load_pseudo_targets(run / "pts")["origin"]) == {"train"}
    assert json.loads((run / "eval" / "stage.json").read_text())["status"] == "done"
    # the teacher was chosen on validation between the two candidates, with or without denoising pairs
    choice = json.loads((run / "teacher" / "stage.json").read_text())["select"]
    assert set(choice["scores"]) == {"teachers@mixed", "teachers@gold"} and choice["split"] == "validation"
    assert json.loads((run / "teachers@gold" / "stage.json").read_text())["config"]["denoising"] is None
    # the chosen teacher's check travels with it, so on_weak_teacher: stop judges the teacher the students get
    chosen = json.loads((run / choice["chosen"] / "stage.json").read_text())["teacher_check"]
    assert json.loads((run / "teacher" / "stage.json").read_text())["teacher_check"] == chosen
