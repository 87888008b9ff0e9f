"""One decoding truth: a `decoding:` block means the same on every path, field by field what transformers means by
it, whatever the checkpoint's own generation_config says; lengths stay inside the model's positions; ids of a
padded vocabulary are never generated; a changed behaviour re-runs the stages it made."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GenerationConfig

from nlgkd.config import DecodingConfig, ModelConfig
from nlgkd.data import pad
from nlgkd.generation import effective_settings, generate_batch, generate_ids, generation_config
from nlgkd.models import build_fresh, load_pretrained, save_model
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner

from test_pseudo_targets import teacher_and_sources

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"] * 20


def transformers_outputs(model, tokenizer, sources, reference: GenerationConfig, seed: int = 0) -> list[list[str]]:
    """What transformers writes with exactly `reference` (its own generation_config swapped for the call, so
    no checkpoint field joins in), decoded as nlgkd decodes."""
    input_ids, attention_mask = pad(sources, tokenizer.pad_token_id, left=False)
    own, model.generation_config = model.generation_config, reference
    torch.manual_seed(seed)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=reference)
    finally:
        model.generation_config = own
    texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    k = reference.num_return_sequences or 1
    return [texts[i * k:(i + 1) * k] for i in range(len(sources))]


# each block, and the same settings written by hand in transformers' own names
BLOCKS = [
    (dict(strategy="greedy", max_new_tokens=10), dict(do_sample=False, num_beams=1, max_new_tokens=10)),
    (dict(strategy="greedy", max_new_tokens=12, min_new_tokens=6, no_repeat_ngram_size=2, repetition_penalty=1.3),
     dict(do_sample=False, num_beams=1, max_new_tokens=12, min_new_tokens=6, no_repeat_ngram_size=2,
          repetition_penalty=1.3)),
    (dict(strategy="beam", num_beams=3, num_return_sequences=2, length_penalty=2.0, max_new_tokens=10),
     dict(do_sample=False, num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping=True,
          max_new_tokens=10)),
    (dict(strategy="sample", top_k=0, top_p=0.9, temperature=0.7, num_return_sequences=3, max_new_tokens=10),
     dict(do_sample=True, top_k=0, top_p=0.9, temperature=0.7, num_return_sequences=3, max_new_tokens=10)),
    (dict(strategy="sample", top_k=5, num_return_sequences=2, max_new_tokens=10),
     dict(do_sample=True, top_k=5, top_p=1.0, num_return_sequences=2, max_new_tokens=10)),
]


@pytest.mark.parametrize("block, meaning", BLOCKS, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items())[:60])
def test_each_field_means_what_transformers_means_by_it(trained, block, meaning):
    model, tokenizer, sources = teacher_and_sources(trained, n=6)
    decoding = DecodingConfig(**block, batch_size=6)
    config = generation_config(decoding, model, tokenizer)
    for name, value in meaning.items():
        assert getattr(config, name) == value, name
    reference = GenerationConfig(**meaning, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 decoder_start_token_id=model.generation_config.decoder_start_token_id)
    if decoding.strategy == "sample":
        torch.manual_seed(0)
    ours = generate_batch(model, tokenizer, sources, decoding)
    assert ours == transformers_outputs(model, tokenizer, sources, reference)


def test_top_k_zero_samples_from_the_whole_vocabulary():
    # first-token logits that fall slowly over the 300 tokens (all embeddings zero, a graded bias): 3000 draws
    # from the whole vocabulary reach far more than 50 distinct tokens; top_k 50 (transformers' default) cannot
    model, tokenizer = short_model(positions=64)
    with torch.no_grad():
        model.model.shared.weight.zero_()
        model.final_logits_bias.copy_(-0.01 * torch.arange(300.0))
    input_ids, attention_mask = pad([tokenizer(TEXTS[0])["input_ids"]], tokenizer.pad_token_id, left=False)
    distinct = {}
    for top_k in (0, 50):
        decoding = DecodingConfig(strategy="sample", top_k=top_k, num_return_sequences=3000, max_new_tokens=1)
        torch.manual_seed(0)
        distinct[top_k] = len(set(generate_ids(model, tokenizer, input_ids, attention_mask, decoding)[:, 1].tolist()))
    assert distinct[50] <= 50 < 150 < distinct[0]


def summarization_checkpoint(trained, folder):
    """The tiny teacher saved with the generation_config of a summarization checkpoint (bart-large-cnn's kind)."""
    model, tokenizer, sources = teacher_and_sources(trained, n=8)
    model.generation_config.update(min_length=14, no_repeat_ngram_size=1, length_penalty=2.0, num_beams=3,
                                   forced_eos_token_id=tokenizer.eos_token_id, early_stopping=True)
    save_model(model, tokenizer, folder)
    return *load_pretrained(str(folder)), sources


def test_a_summarization_checkpoint_decodes_as_the_recipe_says_unless_it_opts_in(trained, tmp_path):
    model, tokenizer, sources = summarization_checkpoint(trained, tmp_path / "cnn")
    assert model.generation_config.min_length == 14  # the checkpoint carries them
    plain, _, _ = teacher_and_sources(trained, n=8)
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=20)
    assert generate_batch(model, tokenizer, sources, greedy) == generate_batch(plain, tokenizer, sources, greedy)

    opted = DecodingConfig(strategy="greedy", max_new_tokens=20, from_checkpoint=["min_length", "no_repeat_ngram_size"])
    config = generation_config(opted, model, tokenizer)
    assert (config.min_length, config.no_repeat_ngram_size, config.num_beams) == (14, 1, 1)
    for ids in tokenizer(sum(generate_batch(model, tokenizer, sources, opted), []), add_special_tokens=False)["input_ids"]:
        assert len(ids) >= 13  # min_length counts the decoder start token, as in transformers
    settings = effective_settings(opted, model, tokenizer)
    assert settings["min_length"] == 14 and settings["max_new_tokens"] == 20 and "forced_eos_token_id" not in settings


def test_max_new_tokens_defaults_to_the_datas_target_length(tiny_recipe):
    tiny_recipe["data"]["max_target_length"] = 37
    tiny_recipe["stages"].append({"name": "pts", "kind": "pseudo_targets", "teacher": "teacher",
                                  "decoding": {"strategy": "sample"}})
    tiny_recipe["stages"].append({"name": "jt", "kind": "distill", "student": "teacher", "teacher": "teacher",
                                  "joint_teaching": {"student_ratio": 0.5}})
    recipe = parse_recipe(tiny_recipe)
    stages = {s.name: s.config for s in recipe.stages}
    assert stages["pts"].decoding.max_new_tokens == 37
    assert stages["jt"].joint_teaching.decoding.max_new_tokens == 37
    assert stages["eval"].decoding.max_new_tokens == 24  # written in the recipe


def test_validation_decodes_as_the_evaluate_stage_and_says_so(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0].update(max_steps=2, eval_every=2, eval_samples=4)
    tiny_recipe["stages"][1]["decoding"] = {"strategy": "beam", "num_beams": 2, "max_new_tokens": 9, "batch_size": 8}
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    runner.run(only="teacher")
    record = json.loads((tmp_path / "tiny" / "teacher" / "stage.json").read_text())
    assert record["validation_decoding"]["strategy"] == "beam" and record["validation_decoding"]["max_new_tokens"] == 9
    # the block is not hashed unless written: editing the evaluate stage does not retrain the teacher
    tiny_recipe["stages"][1]["decoding"]["num_beams"] = 3
    assert Runner(parse_recipe(tiny_recipe), runs_root=tmp_path).run(only="teacher") == {"teacher": "skipped"}


def short_model(positions: int):
    """A fresh tiny BART with `positions` decoder positions that never writes EOS (it would end answers)."""
    torch.manual_seed(0)
    model, tokenizer = build_fresh(ModelConfig(arch="bart", d_model=16, encoder_layers=1, decoder_layers=1,
                                               attention_heads=2, ffn_dim=32, vocab_size=300, dropout=0.0,
                                               max_position_embeddings=positions), TEXTS, seed=0)
    with torch.no_grad():
        model.final_logits_bias[:, tokenizer.eos_token_id] = -1e4
    return model, tokenizer


def test_no_decode_asks_for_more_positions_than_the_model_has():
    model, tokenizer = short_model(positions=16)
    input_ids, attention_mask = pad([tokenizer(TEXTS[0])["input_ids"]], tokenizer.pad_token_id, left=False)
    decoding = DecodingConfig(strategy="greedy", max_new_tokens=500)
    assert generation_config(decoding, model, tokenizer).max_new_tokens == 15  # the decoder start takes one
    assert generate_ids(model, tokenizer, input_ids, attention_mask, decoding).shape[1] == 16
    assert effective_settings(decoding, model, tokenizer)["max_new_tokens"] == 15


def test_a_served_short_model_answers_every_length_up_to_the_cap_with_length():
    from nlgkd.serve import ChatRequest, ServedModel

    model, tokenizer = short_model(positions=16)
    served = ServedModel(model, tokenizer, "short", max_tokens_cap=1024)
    for max_tokens in (1, 15, 16, 1024):
        answer = served.complete(ChatRequest(messages=[{"role": "user", "content": TEXTS[0]}], max_tokens=max_tokens,
                                             temperature=0.0))
        assert answer["choices"][0]["finish_reason"] == "length", max_tokens
        assert answer["usage"]["completion_tokens"] == min(max_tokens, 15)


def test_ids_of_a_padded_vocabulary_are_never_generated():
    model, tokenizer = short_model(positions=64)
    model.resize_token_embeddings(320)  # 20 embedding rows no token maps to, as a checkpoint padded to a multiple
    assert model.config.vocab_size == 320 and len(tokenizer) == 300
    with torch.no_grad():
        model.final_logits_bias[:, 300:] = 50.0  # the padded rows would win every step
    input_ids, attention_mask = pad([tokenizer(TEXTS[0])["input_ids"]], tokenizer.pad_token_id, left=False)
    decoding = DecodingConfig(strategy="sample", num_return_sequences=8, max_new_tokens=6)
    assert generation_config(decoding, model, tokenizer).suppress_tokens == list(range(300, 320))
    assert generate_ids(model, tokenizer, input_ids, attention_mask, decoding).max().item() < 300


def test_a_stage_made_by_an_older_behaviour_runs_again_and_says_why(tmp_path, tiny_recipe):
    tiny_recipe["stages"][0].update(max_steps=2, eval_every=2, eval_samples=0)
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    runner.run(only="teacher")
    path = tmp_path / "tiny" / "teacher" / "stage.json"
    record = json.loads(path.read_text())
    assert record["behaviour"] == 2
    old = copy.deepcopy(record)
    del old["behaviour"]  # as nlgkd wrote it before behaviour versions
    old["fingerprint"] = "made-by-an-older-nlgkd"
    path.write_text(json.dumps(old))
    stage = runner.recipe.stages[0]
    reasons = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path).rerun_reasons(stage)
    assert reasons and "behaviour 1 -> 2" in reasons[0] and "top_k 0 is off" in reasons[0]


def test_a_model_folder_without_tokenizer_files_is_named_with_the_fix(trained, tmp_path):
    import shutil

    from nlgkd.errors import ModelLoadError
    from nlgkd.models import TOKENIZER_FILES

    folder = tmp_path / "weights_only"
    shutil.copytree(trained[1] / "tiny" / "teacher", folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=r"weights_only' has a model but no tokenizer files .*tokenizer_from: a "
                                             r"model with the same tokenizer"):
        load_pretrained(str(folder))
    # in a recipe, tokenizer_from: supplies it
    recipe = copy.deepcopy(trained[0])
    recipe["models"]["bare"] = {"init": "pretrained", "name_or_path": str(folder), "tokenizer_from": "teacher"}
    runner = Runner(parse_recipe(recipe), runs_root=trained[1])
    model, tokenizer = runner.load_model("bare", before=len(recipe["stages"]))
    assert len(tokenizer) == model.config.vocab_size and tokenizer.name_or_path.endswith("teacher")


def test_damaged_weights_and_missing_local_paths_are_named(trained, tmp_path, monkeypatch):
    import shutil

    from nlgkd.errors import ModelLoadError

    folder = tmp_path / "cut"
    shutil.copytree(trained[1] / "tiny" / "teacher", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"the weights in '.*cut' are damaged .*copy the folder again"):
        load_pretrained(str(folder))
    # `m/nonexistent` with a local m/ folder is a path, not a hub name: no hub lookup, its own message
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match=r"'m/nonexistent' does not exist; give a model folder"):
        load_pretrained("m/nonexistent")


def test_review_fixes_beams_from_the_checkpoint_and_the_generator_left_as_found(trained, tmp_path):
    model, tokenizer, sources = summarization_checkpoint(trained, tmp_path / "cnn")  # its num_beams: 3
    wide = DecodingConfig(strategy="beam", num_return_sequences=6, max_new_tokens=8, from_checkpoint=["num_beams"])
    assert generation_config(wide, model, tokenizer).num_beams == 6  # never below K
    with pytest.raises(ValueError, match="from_checkpoint: num_beams applies to strategy: beam, not sample"):
        generation_config(DecodingConfig(strategy="sample", max_new_tokens=8, from_checkpoint=["num_beams"]),
                          model, tokenizer)
    # sampled decoding (a validation inside training) leaves the global generator as it found it
    from accelerate import Accelerator

    from nlgkd.generation import generate

    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(model, tokenizer, sources[:4], DecodingConfig(strategy="sample", max_new_tokens=4, batch_size=2),
             Accelerator(cpu=True), progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_review_fixes_which_stages_are_teachers_and_ce_students(tiny_recipe):
    # self-distillation: the teacher fine-tunes the student's starting model; it is not its own CE baseline
    tiny_recipe["stages"] = [{**tiny_recipe["stages"][0], "name": "ft_teacher"},
                             {"name": "kd", "kind": "distill", "student": "teacher", "teacher": "ft_teacher"}]
    assert parse_recipe(copy.deepcopy(tiny_recipe)).stage("kd").config.ce_student is None
    # a teacher chosen by a select stage among seed variants is a teacher of what distills from the choice
    tiny_recipe["stages"] = [{**tiny_recipe["stages"][0], "name": "t", "variants": {"s0": {}, "s1": {"seed": 1}}},
                             {"name": "best_t", "kind": "select", "candidates": ["t"]},
                             {"name": "kd", "kind": "distill", "student": "teacher", "teacher": "best_t"}]
    runner = Runner(parse_recipe(tiny_recipe), runs_root="unused")
    for instance in [s for s in runner.recipe.instances if s.name == "t"]:
        assert runner.teacher_users(instance) == ["kd"], instance.key
