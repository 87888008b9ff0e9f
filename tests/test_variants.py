"""Stage variants: a varied stage runs once per variant (`name@variant`), what reads it follows the variant,
evaluate compares every variant, upstream artifacts are made once and reused through fingerprints."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from nlgkd.cli import main as cli_main
from nlgkd.config import RecipeError
from nlgkd.recipe import parse_recipe, references
from nlgkd.runner import Runner


def varied_recipe(tiny_recipe: dict) -> dict:
    """teacher -> student (prune; variants dec/enc) -> ft (follows student) -> eval (a row per variant)."""
    recipe = copy.deepcopy(tiny_recipe)
    # no generation during training (eval_samples 0): the untrained models would decode to the length limit
    teacher = {**recipe["stages"][0], "max_steps": 4, "eval_every": 1000, "eval_samples": 0, "save_every": None}
    recipe["stages"] = [
        teacher,
        {"name": "student", "kind": "prune", "from": "teacher",
         "variants": {"dec": {"decoder_layers": [0]}, "enc": {"encoder_layers": [0]}}},
        {"name": "ft", "kind": "finetune", "model": "student", "max_steps": 2, "batch_size": 8,
         "eval_every": 1000, "eval_samples": 0, "save_every": None},
        {"name": "eval", "kind": "evaluate", "models": ["teacher", "ft"], "max_examples": 4,
         "decoding": {"strategy": "greedy", "max_new_tokens": 8, "batch_size": 4}},
    ]
    return recipe


def record(run_dir, key) -> dict:
    return json.loads((run_dir / key / "stage.json").read_text())


def test_expansion_pins_references(tiny_recipe):
    recipe = parse_recipe(varied_recipe(tiny_recipe))
    keys = [s.key for s in recipe.instances]
    assert keys == ["teacher", "student@dec", "student@enc", "ft@dec", "ft@enc", "eval"]
    ft_enc = recipe.instances[4]
    assert ft_enc.config.model == "student@enc" and (ft_enc.variant, ft_enc.varied) == ("enc", "student")
    assert recipe.instances[1].config.decoder_layers == [0] and recipe.instances[1].config.encoder_layers is None
    assert recipe.instances[2].config.encoder_layers == [0]
    assert recipe.instances[-1].config.models == ["teacher", "ft@dec", "ft@enc"]
    assert recipe.variant_names() == {"student": ["dec", "enc"]}


def test_variants_share_upstream_and_rerun_only_what_changed(tmp_path, tiny_recipe):
    raw = varied_recipe(tiny_recipe)
    runner = Runner(parse_recipe(copy.deepcopy(raw)), runs_root=tmp_path)
    assert runner.run() == {"teacher": "ran", "student@dec": "ran", "student@enc": "ran", "ft@dec": "ran",
                            "ft@enc": "ran", "eval": "ran"}
    run_dir = tmp_path / "tiny"
    teacher = record(run_dir, "teacher")
    dec, enc = record(run_dir, "student@dec"), record(run_dir, "student@enc")
    # both variants read the one teacher: the same input fingerprint, and the fingerprint of its stage.json
    assert dec["inputs"]["from"] == enc["inputs"]["from"] == teacher["fingerprint"]
    assert (dec["variant"], dec["variant_of"]) == ("dec", "student") and dec["fingerprint"] != enc["fingerprint"]
    assert dec["config"]["decoder_layers"] == [0] and enc["config"]["encoder_layers"] == [0]
    assert record(run_dir, "ft@enc")["inputs"]["model"] == enc["fingerprint"]
    assert (dec["params"] != enc["params"]) if "params" in dec else True
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "ft@dec", "ft@enc"]
    assert metrics["ft@enc"]["variant"] == "enc" and metrics["ft@enc"]["variant_of"] == "student"
    assert "variant" not in metrics["teacher"]
    assert (run_dir / "eval" / "predictions" / "ft@dec.jsonl").exists()

    # a new variant: only it and what reads it run; the teacher is not trained again
    raw["stages"][1]["variants"]["every"] = {"decoder_layers": "every_other"}
    again = Runner(parse_recipe(copy.deepcopy(raw)), runs_root=tmp_path)
    outcome = again.run()
    assert outcome == {"teacher": "skipped", "student@dec": "skipped", "student@enc": "skipped",
                       "student@every": "ran", "ft@dec": "skipped", "ft@enc": "skipped", "ft@every": "ran",
                       "eval": "ran"}
    assert record(run_dir, "teacher")["started"] == teacher["started"]
    assert record(run_dir, "teacher")["fingerprint"] == teacher["fingerprint"]
    assert list(json.loads((run_dir / "eval" / "metrics.json").read_text())) == [
        "teacher", "ft@dec", "ft@enc", "ft@every"]

    # the report groups the rows by the varied stage and says what each variant changes
    from nlgkd.report import collect

    report = collect(run_dir)
    assert [r["model"] for r in report.groups["student"]] == ["ft@dec", "ft@enc", "ft@every"]
    assert report.changes["student"]["every"] == "decoder_layers=every_other"
    assert {r["model"]: r["teacher"] for r in report.rows}["ft@enc"] == "teacher"  # cut from the teacher


def test_same_fingerprint_under_another_name_is_copied(tmp_path, tiny_recipe):
    raw = varied_recipe(tiny_recipe)
    raw["stages"] = raw["stages"][:2] + [
        {"name": "again", "kind": "prune", "from": "teacher", "variants": {"same": {"decoder_layers": [0]},
                                                                             "other": {"decoder_layers": [1]}}}]
    outcome = Runner(parse_recipe(raw), runs_root=tmp_path).run()
    assert outcome["again@same"] == "reused" and outcome["again@other"] == "ran"
    run_dir = tmp_path / "tiny"
    copied, original = record(run_dir, "again@same"), record(run_dir, "student@dec")
    assert copied["reused_from"] == "student@dec" and copied["fingerprint"] == original["fingerprint"]
    assert (copied["variant"], copied["variant_of"]) == ("same", "again")
    assert (run_dir / "again@same" / "model.safetensors").read_bytes() == \
        (run_dir / "student@dec" / "model.safetensors").read_bytes()
    assert "reused_from" not in original  # the original's stage.json is untouched


def test_one_variant_at_a_time(tmp_path, tiny_recipe):
    raw = varied_recipe(tiny_recipe)
    runner = Runner(parse_recipe(copy.deepcopy(raw)), runs_root=tmp_path)
    first = runner.run(variant="enc")
    # the shared teacher runs, the other variant is left out, and the comparison waits for it
    assert first == {"teacher": "ran", "student@enc": "ran", "ft@enc": "ran", "eval": "waiting"}
    assert not (tmp_path / "tiny" / "student@dec").exists()
    second = Runner(parse_recipe(copy.deepcopy(raw)), runs_root=tmp_path).run(variant="student@dec")
    assert second == {"teacher": "skipped", "student@dec": "ran", "ft@dec": "ran", "eval": "ran"}
    with pytest.raises(RecipeError, match=r"--variant encoder: no stage .* has this variant; variants are "
                                          r"student: dec, enc"):
        runner.plan(variant="encoder")
    assert [a for s, a in runner.plan(only="ft@dec")] == ["leave", "leave", "leave", "skip", "leave", "leave"]


def test_seed_variants_carry_their_seed_downstream(tiny_recipe):
    """A seed sweep varies the stages after it too: a final fine-tune of `kd@seed1` trains with seed 1 (its
    batch order), unless it sets a seed of its own; variants that leave the seed alone change nothing."""
    raw = varied_recipe(tiny_recipe)
    raw["stages"][2]["variants"] = {"seed0": None, "seed1": {"seed": 1}, "seed2": {"seed": 2}}
    raw["stages"][1] = {"name": "student", "kind": "prune", "from": "teacher", "decoder_layers": [0]}
    raw["stages"].insert(3, {"name": "final", "kind": "finetune", "model": "ft", "max_steps": 1})
    raw["stages"].insert(4, {"name": "again", "kind": "finetune", "model": "final", "max_steps": 1})
    raw["stages"].insert(5, {"name": "own", "kind": "finetune", "model": "ft", "max_steps": 1, "seed": 7})
    seeds = {s.key: s.config.seed for s in parse_recipe(raw).instances if s.variant}
    assert seeds == {"ft@seed0": None, "ft@seed1": 1, "ft@seed2": 2,
                     "final@seed0": None, "final@seed1": 1, "final@seed2": 2,
                     "again@seed0": None, "again@seed1": 1, "again@seed2": 2,
                     "own@seed0": 7, "own@seed1": 7, "own@seed2": 7}

    # the stage's own seed is what every variant starts from: a variant that keeps it passes it on too
    raw["stages"][2]["seed"] = 3
    raw["stages"][2]["variants"] = {"same": None, "other": {"seed": 4}}
    seeds = {s.key: s.config.seed for s in parse_recipe(raw).instances if s.name == "final"}
    assert seeds == {"final@same": 3, "final@other": 4}

    # a reader that pins one variant is not a copy of the sweep: it keeps the recipe seed
    raw["stages"][3]["model"] = "ft@other"
    assert [s.config.seed for s in parse_recipe(raw).instances if s.name == "final"] == [None]

    # variants that do not touch the seed leave the stages after them as written
    plain = parse_recipe(varied_recipe(tiny_recipe))
    assert {s.key: s.config.seed for s in plain.instances if s.name == "ft"} == {"ft@dec": None, "ft@enc": None}


def test_variant_errors_name_the_field(tiny_recipe):
    bad = varied_recipe(tiny_recipe)
    bad["stages"][1]["variants"]["enc"] = {"encoder_layer": [0]}
    with pytest.raises(RecipeError, match=r"stages\[1\] \(student\)\.variants\.enc\.encoder_layer: 'encoder_layer' "
                                          r"is not a field of a prune stage \(did you mean 'encoder_layers'\?\)"):
        parse_recipe(bad)

    bad = varied_recipe(tiny_recipe)
    bad["stages"][3]["models"] = ["teacher", "ft@decoder"]
    with pytest.raises(RecipeError, match=r"stages\[3\] \(eval\)\.models\[1\]: 'ft@decoder': 'ft' has no variant "
                                          r"'decoder' \(did you mean 'ft@dec'\?\); its variants: dec, enc"):
        parse_recipe(bad)

    bad = varied_recipe(tiny_recipe)
    bad["stages"][2]["variants"] = {"short": {"max_steps": 1}}
    with pytest.raises(RecipeError, match=r"stages\[2\] \(ft\)\.model: 'student' has a variant per 'student' "
                                          r"variant .* pin the one it reads, e.g. 'student@dec'"):
        parse_recipe(bad)

    bad = varied_recipe(tiny_recipe)
    bad["stages"][1]["variants"]["dec"] = {"decoder_layers": 3.5}
    with pytest.raises(RecipeError, match=r"stages\[1\] \(student@dec\)\.decoder_layers"):
        parse_recipe(bad)


def test_dotted_override_keeps_sibling_fields(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["stages"].insert(1, {"name": "pts", "kind": "pseudo_targets", "teacher": "teacher",
                             "decoding": {"strategy": "sample", "top_p": 0.9, "num_return_sequences": 3},
                             "variants": {"beam": {"decoding.strategy": "beam"}, "sample": None,
                                          "k1": {"decoding.num_return_sequences": 1}}})
    raw["stages"].insert(2, {"name": "kd", "kind": "distill", "student": "teacher", "teacher": "teacher",
                             "pseudo_targets": ["pts"]})
    recipe = parse_recipe(raw)
    pts = {s.variant: s.config.decoding for s in recipe.instances if s.name == "pts"}
    assert (pts["beam"].strategy, pts["beam"].top_p, pts["beam"].num_return_sequences) == ("beam", 0.9, 3)
    assert (pts["sample"].strategy, pts["k1"].num_return_sequences, pts["k1"].strategy) == ("sample", 1, "sample")
    kd = [s for s in recipe.instances if s.name == "kd"]
    assert [s.config.pseudo_targets for s in kd] == [["pts@beam"], ["pts@sample"], ["pts@k1"]]
    assert [dict((w, n) for w, _, n in references(s.config))["student"] for s in kd] == ["teacher"] * 3


def test_validate_and_stages_show_variants(tmp_path, tiny_recipe, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(varied_recipe(tiny_recipe)))
    assert cli_main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2. student (prune)  variants: dec, enc" in out
    assert "3. ft (finetune)  once per variant of student: ft@dec, ft@enc" in out
    assert "4. eval (evaluate)  rows: teacher, ft@dec, ft@enc" in out
    assert "6 stage runs with the variants" in out
    assert cli_main(["stages", "prune"]) == 0
    assert "variants" in capsys.readouterr().out
