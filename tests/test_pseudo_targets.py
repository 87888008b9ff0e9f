"""The pseudo_targets and augment stages on the tiny demo recipe: greedy PTs are the teacher's evaluate
predictions, sampled PTs do not depend on the process count, a killed run resumes to the same dataset,
augmented inputs feed the PT stage; and diverse beam search in nlgkd.generation."""
from __future__ import annotations

import copy
import difflib
import json
import shutil

import pytest
import torch
import yaml

from nlgkd.config import DecodingConfig, ModelConfig, RecipeError

from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError
from nlgkd.pseudo_target_data import load_augmented, load_pseudo_targets

from conftest import kill_once, with_two_process_stages

TEACHER_STEPS = 30
COLUMNS = {"source", "pt", "pt_index", "origin", "input_index", "teacher", "decoding", "score", "task"}

# sampled PTs, many small batches: the kill test needs batches to be written one by one
SAMPLED = {"name": "pts", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train", "unlabeled"],
           "max_examples": 16, "save_every": 1,
           "decoding": {"strategy": "sample", "top_p": 0.95, "num_return_sequences": 3, "max_new_tokens": 12,
                        "batch_size": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with a trained tiny teacher (made once)."""
    from conftest import TINY_RECIPE

    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["stages"] = [{**recipe["stages"][0], "max_steps": TEACHER_STEPS, "eval_every": 1000, "save_every": None}]
    root = tmp_path_factory.mktemp("runs")
    Runner(parse_recipe(recipe), runs_root=root).run()
    return recipe, root


@pytest.fixture(scope="module")
def sampled(trained):
    """The SAMPLED stage run uninterrupted on one process: (rows, stage.json record, its folder)."""
    runner = with_stages(trained, SAMPLED)
    runner.run(only="pts")
    rows = load_pseudo_targets(runner.run_dir / "pts").to_list()
    record = json.loads((runner.run_dir / "pts" / "stage.json").read_text())
    return rows, record, runner.run_dir / "pts"


def with_stages(trained, *stages, root=None) -> Runner:
    recipe, trained_root = trained
    recipe = copy.deepcopy(recipe)
    recipe["stages"] += copy.deepcopy(list(stages))
    return Runner(parse_recipe(recipe), runs_root=root or trained_root)


def copy_teacher(trained, root) -> None:
    """A run directory holding only the trained teacher, for a subprocess to run a PT stage in."""
    shutil.copytree(trained[1] / "tiny" / "teacher", root / "tiny" / "teacher")


def write_recipe(trained, path, *stages) -> None:
    recipe = copy.deepcopy(trained[0])
    recipe["stages"] += copy.deepcopy(list(stages))
    path.write_text(yaml.safe_dump(recipe))


# --------------------------------------------------------------------------------- pseudo_targets
def test_greedy_pts_equal_evaluate_predictions(trained):
    # no_repeat_ngram_size: a tiny teacher's greedy output is otherwise a run of spaces, i.e. empty
    decoding = {"strategy": "greedy", "max_new_tokens": 16, "batch_size": 8, "no_repeat_ngram_size": 1}
    runner = with_stages(
        trained,
        {"name": "greedy_pts", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train"],
         "max_examples": 24, "decoding": {**decoding, "num_return_sequences": 1}},
        {"name": "eval_train", "kind": "evaluate", "models": ["teacher"], "split": "train", "max_examples": 24,
         "decoding": decoding},
    )
    runner.run(only="greedy_pts")
    runner.run(only="eval_train")
    predictions = [json.loads(line) for line in
                   (runner.run_dir / "eval_train" / "predictions" / "teacher.jsonl").read_text().splitlines()]
    rows = load_pseudo_targets(runner.run_dir / "greedy_pts").to_list()
    assert rows, "the teacher wrote only empty outputs"
    for row in rows:
        assert row["origin"] == "train" and row["pt_index"] == 0
        assert row["source"] == predictions[row["input_index"]]["source"]
        assert row["pt"] == predictions[row["input_index"]]["prediction"]
    record = json.loads((runner.run_dir / "greedy_pts" / "stage.json").read_text())["pseudo_targets"]
    empty = sum(1 for p in predictions if not p["prediction"])
    assert record["empty_dropped"] == empty and record["pts_written"] == 24 - empty == len(rows)


def test_sampled_pts_columns_and_k_differ(sampled):
    rows, record, folder = sampled
    assert set(rows[0]) == COLUMNS
    info = record["pseudo_targets"]
    assert info["inputs"] == {"train": 16, "unlabeled": 16} and info["outputs_per_input"] == 3
    assert info["pts_written"] == len(rows) == 32 * 3 - info["empty_dropped"]
    assert info["batches"] == 16 and info["made_batches"] == 16 and info["sequences_per_s"] > 0
    assert {r["origin"] for r in rows} == {"train", "unlabeled"}
    assert {r["teacher"] for r in rows} == {"teacher"} and {r["decoding"] for r in rows} == {"sample"}
    assert all(isinstance(r["score"], float) and r["score"] <= 0 for r in rows)
    by_input = {}
    for r in rows:
        by_input.setdefault((r["origin"], r["input_index"]), []).append(r)
    for pts in by_input.values():
        assert [r["pt_index"] for r in pts] == list(range(len(pts)))
    with_all_three = [[r["pt"] for r in pts] for pts in by_input.values() if len(pts) == 3]
    assert with_all_three
    assert sum(len(set(pts)) for pts in with_all_three) > 2 * len(with_all_three)  # samples mostly differ
    assert not (folder / "parts").exists()  # part files go once the dataset is written


@pytest.mark.parametrize("stage", ["pts2", "pts2_engine"])
def test_two_processes_give_the_same_pts_as_one(tiny_trained, two_processes, stage):
    # sampled, 3 per input, 32 inputs in batches of 2, by PyTorch and by CTranslate2; `tiny_trained` is
    # conftest's run directory (this module's `trained` is another), where the 1-process run reads the same teacher
    assert json.loads((two_processes / stage / "stage.json").read_text())["world_size"] == 2
    runner = Runner(parse_recipe(with_two_process_stages(tiny_trained)), runs_root=tiny_trained[1])
    runner.run(only=stage)
    one = load_pseudo_targets(runner.run_dir / stage).to_list()
    two = load_pseudo_targets(two_processes / stage).to_list()
    assert len(two) == len(one) > 0
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_killed_run_resumes_to_the_same_pts(trained, sampled, tmp_path):
    resumed, one = killed_and_resumed(trained, SAMPLED, tmp_path), sampled[0]
    assert without(resumed, "score") == without(one, "score")
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in one], abs=1e-4)


def killed_and_resumed(trained, stage: dict, tmp_path) -> list[dict]:
    """`stage` run in another process and killed once it has written a part file, then run again here: its rows,
    after checking that the kill left no finished-looking artifact and that the re-run resumed the written batches."""
    name = stage["name"]
    root = tmp_path / "runs"
    copy_teacher(trained, root)
    write_recipe(trained, tmp_path / "r.yaml", stage)
    parts = root / "tiny" / f".{name}.partial" / "parts"
    kill_once(["run", str(tmp_path / "r.yaml"), "--stage", name, "--runs-dir", str(root)], tmp_path,
              ready=lambda: bool(list(parts.glob("part-*.json"))), what="give it more batches")
    assert not (root / "tiny" / name).exists()  # no half artifact that looks finished
    written = len(list(parts.glob("part-*.json")))
    assert 1 <= written < 16

    runner = with_stages(trained, stage, root=root)
    runner.run(only=name)
    info = json.loads((root / "tiny" / name / "stage.json").read_text())["pseudo_targets"]
    assert info["resumed_batches"] >= written and info["resumed_batches"] + info["made_batches"] == 16
    return load_pseudo_targets(root / "tiny" / name).to_list()


def test_pts_need_inputs_and_known_splits(trained, tmp_path):
    recipe = copy.deepcopy(trained[0])
    # teacher: the models: entry (no teacher stage here); the inputs are checked before it is built
    recipe["stages"] = [{"name": "pts", "kind": "pseudo_targets", "teacher": "teacher", "inputs": []}]
    with pytest.raises(StageError, match=r"inputs and augmented are both empty; list splits in inputs"):
        Runner(parse_recipe(recipe), runs_root=tmp_path).run()
    # a split the data lacks is refused when the recipe is read; unlabeled alone is optional in a list
    recipe["data"]["demo"]["unlabeled"] = 0
    recipe["stages"][0]["inputs"] = ["unlabeled"]
    with pytest.raises(RecipeError, match=r"stages\.pts\.inputs: 'unlabeled' is not in the data"):
        parse_recipe(recipe)
    recipe["stages"][0]["inputs"] = ["train", "unlabeled"]
    assert parse_recipe(recipe).instances[0].config.inputs == ["train"]


# ------------------------------------------------------------------------------ through CTranslate2
def without(rows: list[dict], *columns: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in columns} for r in rows]


RANDOM_TEACHER = {"init": "fresh", "arch": "mbart", "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
                  "attention_heads": 2, "ffn_dim": 64, "vocab_size": 300}


def test_float32_engine_pts_equal_transformers_pts(trained, tmp_path):
    pytest.importorskip("ctranslate2")
    # a teacher with random weights (a models: entry, so also the path that saves it before converting): long,
    # arbitrary outputs, so any difference in decoding or scoring shows
    recipe, root = copy.deepcopy(trained[0]), tmp_path / "runs"
    recipe["models"]["rand"] = RANDOM_TEACHER
    decodings = {"greedy": {"strategy": "greedy"},
                 "beam": {"strategy": "beam", "num_beams": 3, "num_return_sequences": 2}}
    for name, decoding in decodings.items():
        common = {"kind": "pseudo_targets", "inputs": ["train"], "max_examples": 24,
                  "decoding": {**decoding, "max_new_tokens": 16, "batch_size": 8}}
        recipe["stages"] = [
            {"name": f"{name}_torch", "teacher": "rand", **common},
            {"name": f"{name}_engine", "teacher": "rand", "engine": "ctranslate2", **common},
            {"name": "rand_ct2", "kind": "export", "model": "rand", "quantization": "float32"},
            {"name": f"{name}_export", "teacher": "rand_ct2", "engine": "ctranslate2", **common}]
        runner = Runner(parse_recipe(recipe), runs_root=root)
        runner.run()
        torch_rows = load_pseudo_targets(runner.run_dir / f"{name}_torch").to_list()
        assert len(torch_rows) == 24 * (2 if name == "beam" else 1)
        assert min(len(r["pt"]) for r in torch_rows) > 10  # long outputs: the comparison means something
        for stage in (f"{name}_engine", f"{name}_export"):
            rows = load_pseudo_targets(runner.run_dir / stage).to_list()
            assert {r["teacher"] for r in rows} == {"rand_ct2" if stage.endswith("_export") else "rand"}
            same = [a == b for a, b in zip(without(rows, "score", "teacher"), without(torch_rows, "score", "teacher"))]
            if name == "greedy":
                assert all(same), stage
                # the engine scores each PT itself: the same mean token log-probability (EOS counted)
                assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in torch_rows], abs=1e-4)
            else:  # random weights tie often; a beam's second output may then end on another token
                assert sum(same) >= 0.9 * len(same) and all(s for s, r in zip(same, rows) if r["pt_index"] == 0)
                assert len(rows) == len(torch_rows), stage
            record = json.loads((runner.run_dir / stage / "stage.json").read_text())["pseudo_targets"]
            assert record["engine"] == "ctranslate2 float32"
            assert not (runner.run_dir / stage / "engine").exists()  # the teacher's copy goes with the part files
        assert json.loads((runner.run_dir / f"{name}_torch" / "stage.json").read_text())[
            "pseudo_targets"]["engine"] == "transformers"


def test_a_decoder_only_teachers_engine_pts_and_scores_equal_transformers(trained, tmp_path):
    pytest.importorskip("ctranslate2")
    # the engine's Generator scores `source, EOS, target, EOS` and keeps the target's positions, as the PyTorch
    # path's causal batches do; a random GPT-2 writes arbitrary outputs, so a shifted position would show
    recipe = copy.deepcopy(trained[0])
    recipe["models"]["rand_gpt2"] = {**RANDOM_TEACHER, "arch": "gpt2"}
    recipe["data"]["max_target_length"] = 8  # PTs of up to 12 tokens: their scores read the truncated targets
    common = {"kind": "pseudo_targets", "teacher": "rand_gpt2", "inputs": ["train"], "max_examples": 16,
              "decoding": {"strategy": "greedy", "min_new_tokens": 6, "max_new_tokens": 12, "batch_size": 8}}
    recipe["stages"] = [{"name": "torch", **common}, {"name": "engine", "engine": "ctranslate2", **common}]
    runner = Runner(parse_recipe(recipe), runs_root=tmp_path / "runs")
    runner.run()
    torch_rows, rows = (load_pseudo_targets(runner.run_dir / name).to_list() for name in ("torch", "engine"))
    assert len(rows) == len(torch_rows) > 8 and sum(len(r["pt"]) > 10 for r in rows) > 4
    assert without(rows, "score") == without(torch_rows, "score")
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in torch_rows], abs=1e-4)


def test_a_conversion_that_fails_on_the_main_process_stops_every_process(tmp_path):
    """On 2 processes only the main one converts the teacher; when that fails (an LSTM: CTranslate2 has no such
    model) the other process stops too, and says why. Before, it learnt only that its peer had gone (gloo:
    "Connection closed by peer"), or, where the backend does not notice, waited at a barrier for the timeout."""
    pytest.importorskip("ctranslate2")
    import yaml

    from conftest import ranks_of_two_processes

    recipe = {"name": "failconv", "seed": 0,
              "data": {"task": "demo", "demo": {"train": 16, "validation": 8, "test": 8, "unlabeled": 0}},
              "models": {"rnn": {"init": "fresh", "arch": "lstm", "d_model": 16, "encoder_layers": 1,
                                 "decoder_layers": 1, "vocab_size": 200}},
              "stages": [{"name": "pts", "kind": "pseudo_targets", "teacher": "rnn", "inputs": ["train"],
                          "engine": "ctranslate2", "decoding": {"strategy": "greedy", "max_new_tokens": 8}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ranks = ranks_of_two_processes(["run", "recipe.yaml", "--runs-dir", "runs"], cwd=tmp_path, timeout=240)
    (main_code, main_out), (other_code, other_out) = ranks
    assert main_code not in (None, 0) and "CTranslate2 cannot convert" in main_out
    assert other_code not in (None, 0), f"the other process did not stop:\n{other_out[-2000:]}"
    assert "the main process failed" in other_out and "cannot convert" in other_out


ENGINE_SAMPLED = {**SAMPLED, "name": "pts_engine", "engine": "ctranslate2"}


def test_killed_engine_run_resumes_to_the_same_pts(trained, tmp_path):
    pytest.importorskip("ctranslate2")
    whole = with_stages(trained, ENGINE_SAMPLED, root=tmp_path / "whole")
    copy_teacher(trained, tmp_path / "whole")
    whole.run(only="pts_engine")
    expected = load_pseudo_targets(whole.run_dir / "pts_engine").to_list()
    assert len({r["pt"] for r in expected}) > len(expected) // 3  # sampled: the outputs vary
    resumed = killed_and_resumed(trained, ENGINE_SAMPLED, tmp_path)
    assert without(resumed, "score") == without(expected, "score")
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_the_engine_refuses_what_it_cannot_decode_when_the_recipe_is_read(trained):
    recipe = copy.deepcopy(trained[0])
    stage = {"name": "pts", "kind": "pseudo_targets", "teacher": "teacher", "engine": "ctranslate2",
             "decoding": {"strategy": "diverse_beam", "num_beams": 4}}
    recipe["stages"] = [stage]
    with pytest.raises(RecipeError, match=r"engine: ctranslate2: decoding.strategy: 'diverse_beam' is not available"):
        parse_recipe(recipe)
    stage["decoding"] = {"strategy": "sample", "repetition_penalty": 1.2}
    with pytest.raises(RecipeError, match=r"decoding.repetition_penalty: .* or use engine: transformers"):
        parse_recipe(recipe)
    stage["decoding"] = {"strategy": "sample", "top_k": 20, "top_p": 0.9, "temperature": 0.8}
    assert parse_recipe(recipe).instances[0].config.engine == "ctranslate2"


# ---------------------------------------------------------------------------------------- augment
AUGMENT = {"name": "aug", "kind": "augment", "split": "train", "max_examples": 12, "n_iter": 3, "p_mask": 0.2,
           "p_pos": 0.2, "field_separator": " | "}


def test_augment_is_deterministic_and_feeds_pseudo_targets(trained, tmp_path):
    first = with_stages(trained, AUGMENT, root=tmp_path / "a")
    first.run(only="aug")
    again = with_stages(trained, AUGMENT, root=tmp_path / "b")
    again.run(only="aug")
    made = load_augmented(first.run_dir / "aug").to_list()
    assert made == load_augmented(again.run_dir / "aug").to_list()
    assert set(made[0]) == {"source", "origin"} and len(made) > 12
    train = list(first.data()["train"]["source"])
    assert all(r["source"] != train[r["origin"]] for r in made)
    info = json.loads((first.run_dir / "aug" / "stage.json").read_text())["augment"]
    assert info["inputs"] == 12 and info["written"] == len(made)

    recipe, _ = trained
    other_seed = copy.deepcopy(recipe)
    other_seed["seed"] = 1
    other_seed["stages"] = [AUGMENT]
    other = Runner(parse_recipe(other_seed), runs_root=tmp_path / "c")
    other.run()
    assert load_augmented(other.run_dir / "aug").to_list() != made

    copy_teacher(trained, tmp_path / "a")
    runner = with_stages(trained, AUGMENT, {"name": "aug_pts", "kind": "pseudo_targets", "teacher": "teacher",
                                            "inputs": [], "augmented": ["aug"], "max_examples": 8,
                                            "decoding": {"strategy": "greedy", "max_new_tokens": 8,
                                                                         "no_repeat_ngram_size": 1}},
                         root=tmp_path / "a")
    assert runner.run(only="aug_pts") == {"aug_pts": "ran"}
    rows = load_pseudo_targets(runner.run_dir / "aug_pts").to_list()
    assert rows and {r["origin"] for r in rows} == {"aug"}
    assert all(r["source"] == made[r["input_index"]]["source"] for r in rows)
    info = json.loads((runner.run_dir / "aug_pts" / "stage.json").read_text())["pseudo_targets"]
    assert info["inputs"] == {"aug": 8}


# ------------------------------------------------------------------------------------- generation
def pairwise_dissimilarity(groups: list[list[str]]) -> float:
    """Mean over inputs and pairs of outputs of 1 - difflib's similarity ratio."""
    values = []
    for outputs in groups:
        for i in range(len(outputs)):
            for j in range(i + 1, len(outputs)):
                values.append(1 - difflib.SequenceMatcher(None, outputs[i], outputs[j]).ratio())
    return sum(values) / len(values)


def teacher_and_sources(trained, n: int = 12):
    """The trained tiny teacher, its tokenizer and the token ids of the first `n` train sources."""
    from nlgkd.data import encode
    from nlgkd.models import load_pretrained

    recipe, root = trained
    model, tokenizer = load_pretrained(str(root / "tiny" / "teacher"))
    runner = Runner(parse_recipe(recipe), runs_root=root)
    encoded, _ = encode(runner.data()["train"].select(range(n)), tokenizer, 48, 48)
    return model, tokenizer, list(encoded["source_ids"])


def test_diverse_beam_outputs_differ_more_than_beam(trained):
    from nlgkd.generation import generate_batch

    model, tokenizer, sources = teacher_and_sources(trained)
    common = {"num_beams": 4, "num_return_sequences": 4, "max_new_tokens": 16}
    beam = generate_batch(model, tokenizer, sources, DecodingConfig(strategy="beam", **common))
    diverse = generate_batch(model, tokenizer, sources, DecodingConfig(
        strategy="diverse_beam", num_beam_groups=2, diversity_penalty=1.0, **common))
    assert all(len(outputs) == 4 for outputs in diverse)
    assert pairwise_dissimilarity(diverse) > pairwise_dissimilarity(beam)


def test_previous_groups_penalty_counts_tokens_at_the_same_step():
    from nlgkd.generation import PreviousGroupsPenalty, ended_as_minus_one

    # 1 input, 2 earlier outputs; decoder start at position 0, EOS id 2, pad after it
    previous = torch.tensor([[[2, 5, 7, 2, 0], [2, 5, 6, 6, 2]]])
    previous = ended_as_minus_one(previous.flatten(0, 1), start=1, eos_id=2).view(1, 2, -1)
    assert previous.tolist() == [[[2, 5, 7, 2, -1], [2, 5, 6, 6, 2]]]
    penalty = PreviousGroupsPenalty(previous, penalty=0.5, beams=2)
    scores = torch.zeros(2, 8)
    step1 = penalty(torch.zeros(2, 1, dtype=torch.long), scores)  # choosing position 1
    assert step1[0, 5] == step1[1, 5] == -1.0 and step1[:, [0, 1, 2, 3, 4, 6, 7]].abs().sum() == 0
    step3 = penalty(torch.zeros(2, 3, dtype=torch.long), scores)
    assert step3[0, 2] == step3[0, 6] == -0.5
    step4 = penalty(torch.zeros(2, 4, dtype=torch.long), scores)  # the first output ended: only the second counts
    assert step4[0, 2] == -0.5 and step4[0, 0] == 0
    assert penalty(torch.zeros(2, 9, dtype=torch.long), scores).abs().sum() == 0  # past the earlier outputs


def test_t5_with_fewer_encoder_than_decoder_layers_generates():
    from nlgkd.generation import generate_batch
    from nlgkd.models import build_fresh

    texts = ["name: Aromi | food: Thai", "Aromi serves Thai food.", "name: Zizzi | area: riverside"] * 5
    cfg = ModelConfig(arch="t5", d_model=16, encoder_layers=1, decoder_layers=2, attention_heads=2, ffn_dim=32,
                      vocab_size=300)
    model, tokenizer = build_fresh(cfg, texts, seed=0)
    model.eval()
    sources = [tokenizer(t)["input_ids"] for t in texts[:2]]
    for strategy in ("greedy", "beam", "diverse_beam"):
        k = 1 if strategy == "greedy" else 2
        decoding = DecodingConfig(strategy=strategy, num_beams=2, num_return_sequences=k, max_new_tokens=4)
        assert [len(o) for o in generate_batch(model, tokenizer, sources, decoding)] == [k, k]


def test_beam_early_stopping_is_transformers_early_stopping(trained):
    from nlgkd.data import pad
    from nlgkd.generation import generate_batch, generation_config

    model, tokenizer, sources = teacher_and_sources(trained)
    model.generation_config.forced_eos_token_id = None  # the checkpoint's; nlgkd's decoding leaves it off
    input_ids, attention_mask = pad(sources, tokenizer.pad_token_id, left=False)
    for early_stopping in (True, False):
        ours = generate_batch(model, tokenizer, sources, DecodingConfig(
            strategy="beam", num_beams=4, max_new_tokens=16, early_stopping=early_stopping))
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=4, do_sample=False,
                             max_new_tokens=16, early_stopping=early_stopping, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        assert ours == [[t.strip()] for t in tokenizer.batch_decode(out, skip_special_tokens=True)], early_stopping
    assert DecodingConfig().early_stopping  # the behaviour before the field existed
    for strategy in ("beam", "diverse_beam"):
        for early_stopping in (True, False):
            config = generation_config(DecodingConfig(strategy=strategy, num_beams=4, early_stopping=early_stopping,
                                                      max_new_tokens=8), model, tokenizer)
            assert config.early_stopping is early_stopping, strategy


def test_a_full_disk_while_writing_pts_names_the_stage_and_the_file(trained, tmp_path, monkeypatch, capsys):
    from nlgkd.cli import main
    from nlgkd.stages import pseudo_targets

    def full_disk(folder, batches):
        raise OSError(28, "No space left on device", str(folder / "part-0.json"))

    monkeypatch.setattr(pseudo_targets, "write_part", full_disk)
    copy_teacher(trained, tmp_path / "runs")
    write_recipe(trained, tmp_path / "r.yaml", {"name": "pts_full", "kind": "pseudo_targets", "teacher": "teacher",
                                                "max_examples": 4, "save_every": 1,
                                                "decoding": {"strategy": "greedy", "max_new_tokens": 4}})
    assert main(["run", str(tmp_path / "r.yaml"), "--stage", "pts_full", "--runs-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "error: stage 'pts_full' (pseudo_targets): No space left on device; finished stages and what this one " \
           "wrote so far are kept: " in err and "part-0.json" in err
