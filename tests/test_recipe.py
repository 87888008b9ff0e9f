"""Recipe loading: types, unknown keys, references and overrides give errors that name the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nlgkd.recipe import STAGE_CONFIGS, RecipeError, apply_override, load_recipe, parse_recipe
from nlgkd.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_kind_has_config_and_run_function():
    assert set(STAGES) == set(STAGE_CONFIGS)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages


def test_tiny_recipe_parses_to_typed_configs(tiny_recipe):
    recipe = parse_recipe(tiny_recipe)
    teacher = recipe.stages[0].config
    assert teacher.max_steps == 12 and isinstance(teacher.lr, float)
    assert recipe.models["teacher"].d_model == 32
    assert recipe.resolve("teacher", before=0)[0] == "model"  # the stage trains the models: entry
    assert recipe.resolve("teacher", before=1)[0] == "stage"  # later stages see the stage's output


def test_unknown_key_names_field_and_suggests(tiny_recipe):
    tiny_recipe["stages"][0]["epocs"] = 3
    with pytest.raises(RecipeError, match=r"stages\[0\] \(teacher\)\.epocs: unknown field \(did you mean 'epochs'\?\)"):
        parse_recipe(tiny_recipe)


def test_wrong_type_names_field(tiny_recipe):
    tiny_recipe["stages"][0]["lr"] = "fast"
    with pytest.raises(RecipeError, match=r"stages\[0\] \(teacher\)\.lr: expected a number, got 'fast'"):
        parse_recipe(tiny_recipe)


def test_exponent_without_dot_is_a_number(tiny_recipe):
    # PyYAML (YAML 1.1) loads `5e-4` as the string '5e-4'; users write it that way everywhere
    tiny_recipe["stages"][0]["lr"] = yaml.safe_load("5e-4")
    assert isinstance(tiny_recipe["stages"][0]["lr"], str)
    assert parse_recipe(tiny_recipe).stages[0].config.lr == pytest.approx(5e-4)


def test_literal_lists_allowed_values(tiny_recipe):
    tiny_recipe["stages"][1]["decoding"]["strategy"] = "beams"
    with pytest.raises(RecipeError, match=r"decoding\.strategy: 'beams' is not allowed \(did you mean 'beam'\?\); allowed: greedy, beam"):
        parse_recipe(tiny_recipe)


def test_unknown_stage_kind(tiny_recipe):
    tiny_recipe["stages"][0]["kind"] = "fine_tune"
    with pytest.raises(RecipeError, match=r"kind: 'fine_tune' is not a stage kind \(did you mean 'finetune'\?\)"):
        parse_recipe(tiny_recipe)


def test_reference_to_missing_stage(tiny_recipe):
    tiny_recipe["stages"][1]["models"] = ["teachr"]
    with pytest.raises(RecipeError, match=r"models\[0\]: unknown name 'teachr' \(did you mean 'teacher'\?\)"):
        parse_recipe(tiny_recipe)


def test_forward_reference(tiny_recipe):
    tiny_recipe["stages"].insert(0, {"name": "early", "kind": "evaluate", "models": ["eval2"]})
    tiny_recipe["stages"].append({"name": "eval2", "kind": "finetune", "model": "teacher"})
    with pytest.raises(RecipeError, match=r"'eval2' is a stage that runs later"):
        parse_recipe(tiny_recipe)


def test_reference_of_wrong_artifact_type(tiny_recipe):
    tiny_recipe["stages"].append({"name": "again", "kind": "finetune", "model": "eval"})
    with pytest.raises(RecipeError, match=r"'eval' gives a metrics, but a model is needed"):
        parse_recipe(tiny_recipe)


def test_missing_required_field(tiny_recipe):
    del tiny_recipe["stages"][0]["model"]
    with pytest.raises(RecipeError, match=r"stages\[0\] \(teacher\)\.model: required field is missing"):
        parse_recipe(tiny_recipe)


def test_overrides_by_stage_name_and_yaml_values(tiny_recipe):
    apply_override(tiny_recipe, "stages.teacher.max_steps=3")
    apply_override(tiny_recipe, "models.teacher.d_model=48")
    apply_override(tiny_recipe, "stages.1.decoding.strategy=beam")
    recipe = parse_recipe(tiny_recipe)
    assert recipe.stages[0].config.max_steps == 3
    assert recipe.models["teacher"].d_model == 48
    assert recipe.stages[1].config.decoding.strategy == "beam"


def test_override_to_unknown_stage(tiny_recipe):
    with pytest.raises(RecipeError, match=r"no stage named 'student'"):
        apply_override(tiny_recipe, "stages.student.lr=1")


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_yaml_is_loaded_safely(tmp_path, tiny_recipe):
    text = yaml.safe_dump(tiny_recipe) + "\nextra: !!python/object/apply:os.system ['echo hacked']\n"
    path = tmp_path / "unsafe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
