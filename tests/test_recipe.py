"""Recipe loading: types, unknown keys, references and overrides give errors that name the field."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from nlgkd.config import STAGE_CONFIGS, RecipeError

from nlgkd.recipe import apply_override, load_recipe, parse_recipe
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


# the numbers of a recipe that may take any value: a length penalty (negative favours short outputs), seeds, and
# layer indices (negative counts from the end; prune's layer lists are checked against the model's depth)
UNBOUNDED = {("DecodingConfig", "length_penalty"), ("TrainArgs", "seed"), ("DenoisingConfig", "seed"),
             ("AttentionKD", "student_layer"), ("AttentionKD", "teacher_layer"), ("PruneConfig", "encoder_layers"),
             ("PruneConfig", "decoder_layers")}


def all_config_classes():
    import dataclasses
    import typing

    from nlgkd import recipe as r

    found, todo = {}, [r.DataConfig, r.ModelConfig, *STAGE_CONFIGS.values()]
    while todo:
        cls = todo.pop()
        if cls.__name__ in found:
            continue
        found[cls.__name__] = cls
        for hint in typing.get_type_hints(cls).values():
            for arg in (hint, *typing.get_args(hint), *[a for h in typing.get_args(hint) for a in typing.get_args(h)]):
                if dataclasses.is_dataclass(arg):
                    todo.append(arg)
    return found


def test_every_numeric_field_has_a_checked_range():
    import dataclasses
    import typing

    missing = []
    for name, cls in all_config_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & {hints[f.name], *typing.get_args(hints[f.name]),
                                      *[a for h in typing.get_args(hints[f.name]) for a in typing.get_args(h)]}
            owner = next(c.__name__ for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))
            if numeric and (owner, f.name) not in UNBOUNDED and "bounds" not in f.metadata:
                missing.append(f"{owner}.{f.name}")
    assert not missing, f"numeric fields without bounds: {missing}"


@pytest.mark.parametrize("override, message", [
    ("stages.teacher.max_steps=-5", r"stages\[0\] \(teacher\)\.max_steps: -5 is out of range; it must be >= 1"),
    ("stages.teacher.epochs=0", r"\.epochs: 0\.0 is out of range; it must be > 0"),
    ("stages.teacher.batch_size=0", r"\.batch_size: 0 is out of range; it must be >= 1"),
    ("stages.teacher.grad_accum=0", r"\.grad_accum: 0 is out of range"),
    ("stages.teacher.log_every=0", r"\.log_every: 0 is out of range"),
    ("stages.eval.decoding.top_p=5", r"stages\[1\] \(eval\)\.decoding\.top_p: 5\.0 is out of range; it must be > 0 "
                                     r"and <= 1"),
    ("stages.eval.decoding.num_beams=0", r"\.decoding\.num_beams: 0 is out of range"),
    ("stages.eval.decoding.batch_size=0", r"\.decoding\.batch_size: 0 is out of range"),
    ("stages.eval.decoding.num_return_sequences=0", r"\.decoding\.num_return_sequences: 0 is out of range"),
    ("models.teacher.dropout=1", r"models\.teacher\.dropout: 1\.0 is out of range; it must be >= 0 and < 1"),
    ("data.max_examples={train: 0}", r"data\.max_examples\.train: 0 is out of range"),
])
def test_an_out_of_range_number_is_refused_when_the_recipe_is_read(tiny_recipe, override, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe, overrides=[override])


def test_nlgkd_stages_shows_the_ranges(capsys):
    from nlgkd.cli import main

    assert main(["stages", "finetune"]) == 0
    assert "integer | null (>= 1) = None" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("stages.9.lr=1", r"--set: stages\.9: there are 2 stages \(0 to 1\); address a stage by its name, e\.g\. "
                      r"stages\.teacher\.lr"),
    ("stages.teacher.lr=[", r"--set 'stages\.teacher\.lr=\[': the value is not valid YAML"),
    ("name.x=1", r"--set name\.x: name is 'tiny', not a mapping with fields"),
])
def test_a_bad_override_is_one_clear_error(tiny_recipe, override, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe, overrides=[override])


@pytest.mark.parametrize("stage, message", [
    ({"objective": "finetune", "joint_teaching": {}}, r"joint_teaching: trains with the KL .* not 'finetune'"),
    ({"objective": "logits_mse", "joint_teaching": {}}, r"joint_teaching: .* not 'logits_mse'"),
    ({"mixed_precision": "fp16"}, r"mixed_precision: 'fp16' is not allowed.*allowed: auto, no, bf16"),
])
def test_settings_that_cannot_train_as_asked_are_refused(tiny_recipe, stage, message):
    tiny_recipe["stages"].append({"name": "kd", "kind": "distill", "student": "teacher", "teacher": "teacher",
                                  **stage})
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe)


def test_a_full_disk_is_one_line(tmp_path, tiny_recipe, monkeypatch, capsys):
    from nlgkd import cli
    from nlgkd.runner import Runner

    class SafetensorError(Exception):  # what safetensors raises when a write fails
        pass

    def full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" })")

    monkeypatch.setattr(Runner, "run", full)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    assert cli.main(["run", str(path), "--runs-dir", str(tmp_path)]) == 1
    assert "error: the disk is full (" in capsys.readouterr().err


def listed_fields(capsys, *words: str) -> set[str]:
    """The field names `nlgkd stages WORDS` prints (first column)."""
    from nlgkd.cli import main

    assert main(["stages", *words]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0] for line in lines if line.startswith("  ") and line.strip()}


def field_paths(raw: dict, listed: set[str], prefix: str = "") -> list[str]:
    """Dotted paths of `raw`'s fields, descending into a value only where the listing has its sub-fields
    (decoding.strategy), so user-named keys (hub_splits' splits) stay leaves."""
    paths = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict) and any(name.startswith(path + ".") for name in listed):
            paths.extend(field_paths(value, listed, path + "."))
    return paths


@pytest.mark.parametrize("recipe_file", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")))
def test_every_field_of_every_shipped_recipe_is_listed_by_nlgkd_stages(capsys, recipe_file):
    """A user writes a recipe from `nlgkd stages recipe | data | models | KIND` alone: every field the
    shipped recipes use is there."""
    raw = yaml.safe_load((ROOT / recipe_file).read_text())
    top = listed_fields(capsys, "recipe")
    assert set(raw) <= top
    data_fields = listed_fields(capsys, "data")
    assert set(field_paths(raw.get("data", {}), data_fields)) <= data_fields
    model_fields = listed_fields(capsys, "models")
    for entry in (raw.get("models") or {}).values():
        assert set(field_paths(entry, model_fields)) <= model_fields
    for stage in raw["stages"]:
        kind_fields = listed_fields(capsys, stage["kind"])
        fields = {k: v for k, v in stage.items() if k not in ("kind", "<<")}
        missing = set(field_paths(fields, kind_fields)) - kind_fields
        assert not missing, f"{recipe_file}: stage {stage['name']} uses fields `nlgkd stages {stage['kind']}` omits"
        for overrides in (stage.get("variants") or {}).values():
            assert {key.split(".")[0] for key in overrides} - {"seed"} <= kind_fields | {"seed"}


def test_nlgkd_stages_nested_fields_show_their_parents_defaults(capsys):
    from nlgkd.cli import main

    assert main(["stages", "distill"]) == 0
    out = capsys.readouterr().out
    # joint_teaching samples its prefixes by default, unlike a bare decoding: config
    assert re.search(r"joint_teaching\.decoding\.strategy .* = 'sample'", out)
    assert main(["stages", "data"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tasks\.NAME\.\* .*each of .*train", out) and "tasks.NAME.train " not in out
    assert main(["stages", "nonsense"]) == 2
    assert "recipe, data, models" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("models.teacher.attention_heads=5", r"models\.teacher: attention_heads: 5 does not divide d_model 32; .*\(e\.g\. 4\)"),
    ("stages.eval.models=[]", r"stages\[1\] \(eval\): models: an evaluate stage needs at least one model"),
])
def test_mistakes_a_new_user_made_are_caught_when_the_recipe_is_read(tiny_recipe, override, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tiny_recipe, overrides=[override])


def test_a_stage_without_a_kind_says_it_is_missing_and_an_unknown_name_lists_each_name_once(tiny_recipe):
    del tiny_recipe["stages"][1]["kind"]
    with pytest.raises(RecipeError, match=r"stages\[1\] \(eval\)\.kind: missing; every stage needs a kind"):
        parse_recipe(tiny_recipe)
    tiny_recipe["stages"][1]["kind"] = "evaluate"
    tiny_recipe["stages"][1]["models"] = ["teachr"]
    with pytest.raises(RecipeError, match=r"unknown name 'teachr' \(did you mean 'teacher'\?\); known here: "
                                          r"\['teacher'\]"):
        parse_recipe(tiny_recipe)


@pytest.mark.parametrize("name", ["../../escape", "", "a/b", ".hidden", "/abs"])
def test_the_recipe_name_stays_inside_the_runs_folder(tiny_recipe, name):
    tiny_recipe["name"] = name
    with pytest.raises(RecipeError, match=r"name: .* names the run folder runs/<name>; use letters, digits"):
        parse_recipe(tiny_recipe)


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\nseed: 0\nstages:\n  - name: t\n    kind: finetune\n    lr: 0.1\n    lr: 0.2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: line 7: 'lr' is written twice in one mapping \(first on line 6\)"):
        load_recipe(path)
    # merge keys may be overridden: that is what they are for, also when a mapping that merges an anchor is
    # itself merged later (YAML merges it into the later one before building it)
    path.write_text("name: a\nx: &base {lr: 0.1}\n")
    with pytest.raises(RecipeError, match="x: unknown top-level field"):
        load_recipe(path)
    from nlgkd.recipe import RecipeLoader

    nested = ("s:\n  - {name: a, decoding: &wide {<<: &beam {strategy: beam, num_beams: 4}, num_beams: 8}}\n"
              "  - {name: b, decoding: {<<: *wide, num_beams: 2}}\n")
    assert [d["decoding"] for d in yaml.load(nested, Loader=RecipeLoader)["s"]] == [
        {"strategy": "beam", "num_beams": 8}, {"strategy": "beam", "num_beams": 2}]


def test_bad_templates_and_numbers_are_named_when_the_recipe_is_read(tiny_recipe):
    broken = copy.deepcopy(tiny_recipe)
    broken["data"]["source"] = "{source} {missing"
    with pytest.raises(RecipeError, match=r"data: source: '\{source\} \{missing' is not a valid template"):
        parse_recipe(broken)
    for path, value, words in ((("stages", 0, "lr"), float("inf"), "is not a finite number"),
                               (("stages", 0, "lr"), float("nan"), "is not a finite number"),
                               (("stages", 1, "decoding", "max_new_tokens"), 10**8, "out of range"),
                               (("stages", 0, "batch_size"), 10**8, "out of range")):
        recipe = copy.deepcopy(tiny_recipe)
        node = recipe
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(RecipeError, match=words):
            parse_recipe(recipe)


def test_null_turns_an_optional_block_off_in_a_recipe_a_set_and_a_variant():
    """`denoising: null` means no denoising (not a denoising block of default settings), however it is given."""
    from nlgkd.recipe import load_recipe

    template = ROOT / "recipes" / "own_data.yaml"
    assert load_recipe(template).stage("teachers").config.denoising is not None
    assert load_recipe(template, ["stages.teachers.denoising=null"]).stage("teachers").config.denoising is None
    raw = yaml.safe_load(template.read_text())
    raw["stages"] = [{**raw["stages"][0], "variants": {"mixed": {}, "gold": {"denoising": None}}}]
    variants = parse_recipe(raw).stage("teachers").variants
    assert variants["gold"].denoising is None and variants["mixed"].denoising is not None


def test_a_profile_applies_its_assignments_before_any_set():
    """`--profile cpu`: the template's CPU sizes, from its `profiles:` list; a --set still wins; the applied
    assignments (what --jobs children get) keep that order; an unknown profile names the ones there are."""
    from nlgkd.recipe import load_recipe

    template = ROOT / "recipes" / "own_data.yaml"
    gpu = load_recipe(template)
    cpu = load_recipe(template, ["stages.distill.max_steps=5"], profile="cpu")
    assert gpu.models["teacher"].d_model == 384 and cpu.models["teacher"].d_model == 256
    assert cpu.stage("student_ft").config.max_steps == 600 and cpu.stage("distill").config.max_steps == 5
    assert cpu.assignments[-1] == "stages.distill.max_steps=5" and "models.teacher.d_model=256" in cpu.assignments
    # no field written twice in the profile
    raw = yaml.safe_load(template.read_text())
    assert len(raw["profiles"]["cpu"]) == len(set(raw["profiles"]["cpu"]))
    with pytest.raises(RecipeError, match=r"--profile laptop: the recipe has the profiles cpu"):
        load_recipe(template, profile="laptop")
    with pytest.raises(RecipeError, match=r"--profile cpu: the recipe has no profiles: section"):
        load_recipe(ROOT / "recipes" / "demo.yaml", profile="cpu")


def test_the_templates_sizes_are_consistent_in_each_profile():
    """The own-data template at its GPU sizes and with each profile: every training stage evaluates within its
    steps (a CPU value forgotten beside a changed one would evaluate once, at the end, without saying so)."""
    from nlgkd.recipe import load_recipe

    path = ROOT / "recipes" / "own_data.yaml"
    profiles = [None, *(yaml.safe_load(path.read_text()).get("profiles") or {})]
    assert "cpu" in profiles
    for profile in profiles:
        for stage in load_recipe(path, profile=profile).instances:
            config = stage.config
            if getattr(config, "max_steps", None) and getattr(config, "eval_every", None):
                assert config.eval_every <= config.max_steps, (profile, stage.key)
