"""The recurrent student (nlgkd/lstm.py): a transformers model like the others (save/load, Auto classes,
generate with greedy/beam/sampling, with its recurrent state as the cache), trained by the distill stage
with logit objectives and pseudo-targets, evaluated beside a transformer student; feature KD refuses it."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from nlgkd.data import collate, encode, load_splits
from nlgkd.generation import generate
from nlgkd.hf_compat import CACHE_KWARG
from nlgkd.lstm import LSTMSeq2SeqForConditionalGeneration, is_lstm
from nlgkd.models import build_fresh, forward_on_targets, load_pretrained, save_model
from nlgkd.config import DecodingConfig, ModelConfig
from nlgkd.recipe import parse_recipe
from nlgkd.runner import Runner, StageError, make_accelerator

LSTM = {"init": "fresh", "arch": "lstm", "d_model": 64, "encoder_layers": 2, "decoder_layers": 1, "dropout": 0.0,
        "tokenizer_from": "teacher"}
STEPS = 30


@pytest.fixture(scope="module")
def tiny_lstm():
    """(model, tokenizer, batch): an untrained 2+1-layer LSTM with a tokenizer trained on demo text, and a
    right-padded batch of 8 demo examples."""
    from nlgkd.config import DataConfig, DemoSizes

    data, _ = load_splits(DataConfig(task="demo", demo=DemoSizes(train=64, validation=8, test=8, unlabeled=0)))
    texts = list(data["train"]["source"]) + list(data["train"]["target"])
    cfg = ModelConfig(init="fresh", arch="lstm", d_model=32, encoder_layers=2, decoder_layers=2, dropout=0.0,
                      vocab_size=300)
    model, tokenizer = build_fresh(cfg, texts, seed=0)
    encoded, _ = encode(data["validation"], tokenizer, 48, 48)
    batch = collate(list(encoded), pad_id=tokenizer.pad_token_id, causal=False)
    return model.eval(), tokenizer, batch


def test_fresh_config_uses_the_recipe_sizes(tiny_lstm):
    model, tokenizer, _ = tiny_lstm
    assert isinstance(model, LSTMSeq2SeqForConditionalGeneration) and is_lstm(model)
    assert model.encoder.lstm.num_layers == 2 and model.encoder.lstm.bidirectional
    assert model.encoder.lstm.hidden_size == 16 and model.decoder.lstm.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied output layer


def test_save_load_round_trip_gives_identical_logits(tiny_lstm, tmp_path):
    model, tokenizer, batch = tiny_lstm
    torch.manual_seed(1)
    with torch.no_grad():  # random weights everywhere, so tying or a skipped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_pretrained(str(tmp_path))  # through AutoConfig/AutoModelForSeq2SeqLM
    assert type(loaded) is LSTMSeq2SeqForConditionalGeneration
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        before, _ = forward_on_targets(model, batch)
        after, _ = forward_on_targets(loaded.eval(), batch)
    assert before.shape == (*batch["labels"].shape, len(tokenizer))
    assert torch.equal(before, after)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight


def test_labels_give_the_transformers_loss_for_code_outside_nlgkd(tiny_lstm):
    """nlgkd's stages compute their own losses from the logits; `model(..., labels=)` still returns the
    masked token cross-entropy, as every transformers seq2seq model does (e.g. for transformers' Trainer)."""
    model, _, batch = tiny_lstm
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        logits, _ = forward_on_targets(model, batch)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.allclose(out.logits, logits) and torch.allclose(out.loss, expected)


def test_padding_does_not_change_a_row(tiny_lstm):
    model, tokenizer, batch = tiny_lstm
    with torch.no_grad():
        full, _ = forward_on_targets(model, batch)
        row = {k: v[:1, : int(batch["attention_mask"][0].sum())] if k != "labels" else v[:1] for k, v in batch.items()}
        alone, _ = forward_on_targets(model, row)
    assert torch.allclose(full[:1], alone, atol=1e-5)


@pytest.mark.parametrize("cache_keyword", ["cache", "past_key_values"])
def test_step_by_step_with_the_carried_state_equals_one_teacher_forced_forward(tiny_lstm, cache_keyword):
    # `cache` is what transformers >= 5.24 passes, `past_key_values` what earlier releases (and old callers) pass
    model, _, batch = tiny_lstm
    decoder_input_ids = model.shift_labels(batch["labels"])[:, :6]
    encoder = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full = model(**encoder, decoder_input_ids=decoder_input_ids).logits
        state, steps = None, []
        for t in range(decoder_input_ids.shape[1]):
            out = model(**encoder, decoder_input_ids=decoder_input_ids[:, t:t + 1], **{cache_keyword: state})
            state = out[CACHE_KWARG]
            steps.append(out.logits)
    assert state.get_seq_length() == decoder_input_ids.shape[1]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_generate_greedy_beam_and_sampling_with_and_without_the_state_cache(tiny_lstm):
    # relies on transformers' internal generation path handing our LSTMDecoderState back under CACHE_KWARG
    model, tokenizer, batch = tiny_lstm
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "max_new_tokens": 8,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    step_lengths = []
    hook = model.decoder.lstm.register_forward_hook(lambda m, args, out: step_lengths.append(args[0].shape[1]))
    greedy = model.generate(**inputs, do_sample=False)
    hook.remove()
    assert step_lengths[0] == 1 and set(step_lengths) == {1}  # the state carries over: one token per step
    assert torch.equal(greedy, model.generate(**inputs, do_sample=False, use_cache=False))  # recomputed from scratch
    # greedy is the argmax of the teacher-forced logits on its own output
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=greedy[:, :-1]).logits
    running = (greedy[:, 1:] != tokenizer.eos_token_id).cumprod(1).roll(1, 1)
    running[:, 0] = 1
    assert torch.equal(logits.argmax(-1)[running.bool()], greedy[:, 1:][running.bool()])

    beam = model.generate(**inputs, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beam.shape[0] == 2 * batch["input_ids"].shape[0]
    assert torch.equal(beam, model.generate(**inputs, num_beams=3, num_return_sequences=2, do_sample=False,
                                            use_cache=False))  # beam reordering of the state is right
    torch.manual_seed(0)
    sampled = model.generate(**inputs, do_sample=True, top_p=0.9, num_return_sequences=2)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(**inputs, do_sample=True, top_p=0.9, num_return_sequences=2))
    assert sampled.shape[0] == 2 * batch["input_ids"].shape[0]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "diverse_beam", "sample"])
def test_nlgkd_generation_runs_every_strategy(tiny_lstm, strategy):
    model, tokenizer, batch = tiny_lstm
    sources = [row[row != tokenizer.pad_token_id].tolist() for row in batch["input_ids"]]
    k = 1 if strategy == "greedy" else 2
    decoding = DecodingConfig(strategy=strategy, num_return_sequences=k, max_new_tokens=6, batch_size=3)
    outputs = generate(model, tokenizer, sources, decoding, make_accelerator(), seed=0)
    assert [len(o) for o in outputs] == [k] * len(sources)


def lstm_recipe(trained, *stages: dict) -> dict:
    recipe, _ = trained
    recipe = copy.deepcopy(recipe)
    recipe["models"]["lstm"] = dict(LSTM)
    recipe["stages"].extend(copy.deepcopy(list(stages)))
    return recipe


def distill(name, **fields) -> dict:
    return {"name": name, "kind": "distill", "student": "lstm", "teacher": "teacher", "max_steps": STEPS,
            "batch_size": 16, "lr": 1e-2, "eval_samples": 0, "save_every": None, "log_every": 5, **fields}


def fit(model, tokenizer, teacher, recipe) -> dict:
    """Validation NLL of the gold targets and agreement with the teacher's top token."""
    splits, _ = load_splits(parse_recipe(recipe).data)
    encoded, _ = encode(splits["validation"], tokenizer, 48, 48)
    batch = collate(list(encoded), pad_id=tokenizer.pad_token_id, causal=False)
    mask = batch["labels"] != -100
    with torch.no_grad():
        s, _ = forward_on_targets(model.eval(), batch)
        t, _ = forward_on_targets(teacher.eval(), batch)
    nll = torch.nn.functional.cross_entropy(s[mask], batch["labels"][mask]).item()
    agree = (s.argmax(-1) == t.argmax(-1))[mask].float().mean().item()
    return {"nll": nll, "agreement": agree}


def test_lstm_student_distills_with_logits_kd_and_mse_and_is_evaluated(trained):
    pts = {"name": "pts", "kind": "pseudo_targets", "teacher": "teacher", "inputs": ["train"], "max_examples": 32,
           "decoding": {"strategy": "sample", "num_return_sequences": 2, "max_new_tokens": 24, "batch_size": 16}}
    evaluate = {"name": "eval_lstm", "kind": "evaluate", "models": ["student", "lstm_kd", "lstm_mse"],
                "max_examples": 8, "decoding": {"strategy": "greedy", "max_new_tokens": 24, "batch_size": 8}}
    recipe = lstm_recipe(trained, pts, distill("lstm_kd", objective="logits_kd", pseudo_targets=["pts"]),
                         distill("lstm_mse", objective="logits_mse"), evaluate)
    runner = Runner(parse_recipe(recipe), runs_root=trained[1])
    for stage in ("pts", "lstm_kd", "lstm_mse", "eval_lstm"):
        runner.run(only=stage)

    teacher, _ = load_pretrained(str(runner.run_dir / "teacher"))
    untrained, tokenizer = runner.load_model("lstm", before=len(recipe["stages"]))
    assert tokenizer.get_vocab() == load_pretrained(str(runner.run_dir / "teacher"))[1].get_vocab()
    base = fit(untrained, tokenizer, teacher, recipe)
    for name, objective in (("lstm_kd", "logits_kd"), ("lstm_mse", "logits_mse")):
        model, _ = load_pretrained(str(runner.run_dir / name))
        assert is_lstm(model)
        logs = [json.loads(line) for line in (runner.run_dir / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r[objective] for r in logs if objective in r]
        assert losses[-1] < 0.5 * losses[0], (name, losses)
        after = fit(model, tokenizer, teacher, recipe)
        # a wide margin over its untrained self: gold NLL far lower, the teacher's top token far more often
        assert after["nll"] < base["nll"] - 1.5, (name, base, after)
        assert after["agreement"] > base["agreement"] + 0.3, (name, base, after)
    record = json.loads((runner.run_dir / "lstm_kd" / "stage.json").read_text())
    assert record["train"]["steps"] == STEPS
    metrics = json.loads((runner.run_dir / "eval_lstm" / "metrics.json").read_text())
    for name in ("student", "lstm_kd", "lstm_mse"):
        assert metrics[name]["params"] > 0 and metrics[name]["seq_per_s"] > 0 and metrics[name]["examples"] == 8
    assert metrics["lstm_kd"]["params"] != metrics["student"]["params"]


@pytest.mark.parametrize("spec, words", [
    ({"hidden": {"loss": "pkd", "layer_map": "last"}}, r"hidden\.loss 'pkd' \(hidden KD\)"),
    ({"hidden": {"loss": "tinybert"}}, r"hidden\.loss 'tinybert' \(hidden KD\)"),
    ({"attention": {"loss": "minilm"}}, r"attention\.loss 'minilm' \(attention KD\)"),
])
def test_feature_kd_with_an_lstm_student_is_refused(trained, spec, words):
    recipe = lstm_recipe(trained, distill("lstm_bad", max_steps=2, **spec))
    runner = Runner(parse_recipe(recipe), runs_root=trained[1])
    with pytest.raises(StageError, match=words + r".*student 'lstm' is an LSTM encoder-decoder "
                                             r"\(model_type nlgkd_lstm\); remove"):
        runner.run(only="lstm_bad")
    assert not (runner.run_dir / "lstm_bad").exists()


def test_joint_teaching_with_an_lstm_student(trained):
    recipe = lstm_recipe(trained, distill("lstm_jt", max_steps=2, joint_teaching={
        "student_ratio": 0.5, "decoding": {"strategy": "sample", "top_p": 0.9, "max_new_tokens": 12}}))
    runner = Runner(parse_recipe(recipe), runs_root=trained[1])
    runner.run(only="lstm_jt")
    record = json.loads((runner.run_dir / "lstm_jt" / "stage.json").read_text())
    assert record["joint_teaching"]["student_steps"] == 1


def test_served_lstm_answers_with_its_own_greedy_output_and_logprobs(tiny_lstm, tmp_path):
    from nlgkd.serve import ChatMessage, ChatRequest, load_served_model

    model, tokenizer, _ = tiny_lstm
    save_model(model, tokenizer, tmp_path)
    served = load_served_model(str(tmp_path), name="lstm", device="cpu")
    assert is_lstm(served.model)
    source = "name: Giraffe | area: city centre | family: no"
    answer = served.complete(ChatRequest(messages=[ChatMessage(role="user", content=source)], temperature=0.0,
                                         max_tokens=6, logprobs=True, top_logprobs=2))
    ids = torch.tensor([tokenizer(source)["input_ids"]])
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, 1:]
    tokens = expected.tolist()
    tokens = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == len(tokens) and all(len(e["top_logprobs"]) == 2 for e in content)
    assert answer["choices"][0]["message"]["content"] == "".join(e["token"] for e in content)
