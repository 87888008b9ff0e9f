"""Export to CTranslate2: the exported model decodes as the PyTorch one does (exactly in float32, mostly in
int8), an export stage's model is evaluated beside PyTorch rows and served, and what cannot be exported says
what can."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("ctranslate2")

from nlgkd.config import DataConfig, DecodingConfig, DemoSizes, ModelConfig  # noqa: E402
from nlgkd.data import encode, load_splits  # noqa: E402
from nlgkd.errors import ModelLoadError  # noqa: E402
from nlgkd.engine import EngineModel, ExportError  # noqa: E402
from nlgkd.export import export_model  # noqa: E402
from nlgkd.generation import generate  # noqa: E402
from nlgkd.models import build_fresh, load_pretrained, save_model  # noqa: E402

GREEDY = DecodingConfig(strategy="greedy", batch_size=8, max_new_tokens=24)


@pytest.fixture(scope="module")
def demo_data():
    data, _ = load_splits(DataConfig(task="demo", demo=DemoSizes(train=64, validation=0, test=24, unlabeled=0)))
    return data


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def outputs_of(model, tokenizer, data, accelerator, decoding=GREEDY) -> list[list[str]]:
    encoded, _ = encode(data["test"], tokenizer, 48, 48)
    return generate(model, tokenizer, list(encoded["source_ids"]), decoding, accelerator, progress=False)


def fresh_model(arch: str, data, folder) -> tuple:
    """A fresh model of `arch` with random weights, saved and loaded back: its outputs are long and arbitrary,
    so any difference in the decoder, the start token or the length limit changes them everywhere. Pegasus
    (which nlgkd prunes but does not build fresh) from its transformers config, with a BART tokenizer."""
    texts = list(data["train"]["source"]) + list(data["train"]["target"])
    torch.manual_seed(0)
    model, tokenizer = build_fresh(ModelConfig(arch="bart" if arch == "pegasus" else arch, d_model=32,
                                               encoder_layers=2, decoder_layers=2, attention_heads=2, ffn_dim=64,
                                               vocab_size=300, dropout=0.0), texts, seed=0)
    if arch == "pegasus":
        from transformers import PegasusConfig, PegasusForConditionalGeneration

        torch.manual_seed(0)
        model = PegasusForConditionalGeneration(PegasusConfig(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            dropout=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id))
    save_model(model, tokenizer, folder)
    return load_pretrained(str(folder))


@pytest.mark.parametrize("arch", ["mbart", "bart", "pegasus", "t5", "gpt2"])
def test_a_float32_export_decodes_exactly_as_pytorch(arch, demo_data, accelerator, tmp_path):
    model, tokenizer = fresh_model(arch, demo_data, tmp_path / "model")
    manifest = export_model(tmp_path / "model", tmp_path / "ct2", quantization="float32")
    engine = EngineModel(tmp_path / "ct2")
    assert manifest["model_type"] == arch and manifest["params"] > 0 and engine.backend == "ctranslate2 float32"
    expected = outputs_of(model, tokenizer, demo_data, accelerator)
    assert outputs_of(engine, engine.tokenizer, demo_data, accelerator) == expected
    if arch in ("mbart", "bart", "pegasus"):  # long outputs with random weights (t5 and gpt2 stop at once)
        assert min(len(o[0]) for o in expected) > 10


@pytest.mark.parametrize("fields", [
    dict(strategy="greedy", min_new_tokens=12, no_repeat_ngram_size=2),
    dict(strategy="beam", num_beams=3, num_return_sequences=2, length_penalty=0.6),
    dict(strategy="greedy", forced_bos_token="<s>"),
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items() if k != "strategy"))
def test_a_float32_export_decodes_each_setting_as_pytorch(fields, demo_data, accelerator, tmp_path):
    model, tokenizer = fresh_model("mbart", demo_data, tmp_path / "random")
    with torch.no_grad():  # EOS likely from the first step: min_new_tokens and the rest then shape every output
        model.final_logits_bias[:, tokenizer.eos_token_id] = 6.0
    save_model(model, tokenizer, tmp_path / "model")
    model, tokenizer = load_pretrained(str(tmp_path / "model"))
    export_model(tmp_path / "model", tmp_path / "ct2", quantization="float32")
    engine = EngineModel(tmp_path / "ct2")
    decoding = DecodingConfig(**{"max_new_tokens": 24, "batch_size": 8, **fields})
    expected = outputs_of(model, tokenizer, demo_data, accelerator, decoding)
    assert outputs_of(engine, engine.tokenizer, demo_data, accelerator, decoding) == expected
    # what the engine cannot honour is refused, not approximated
    with pytest.raises(ValueError, match="decoding.repetition_penalty: transformers also penalizes"):
        outputs_of(engine, engine.tokenizer, demo_data, accelerator, DecodingConfig(**{**fields, "max_new_tokens": 8,
                                                                                      "repetition_penalty": 1.5}))


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_an_export_never_writes_the_rows_of_a_padded_vocabulary(strategy, demo_data, accelerator, tmp_path):
    # T5 checkpoints have 32,128 embedding rows for 32,100 tokens; CTranslate2's converter names the extra rows
    # after T5's sentinels, which nlgkd's T5 tokenizers have too. transformers is kept from generating those rows
    # (nlgkd.generation), and so is the engine. Here the padded rows would win every step.
    model, tokenizer = fresh_model("t5", demo_data, tmp_path / "random")
    width = len(tokenizer)
    assert "<extra_id_0>" in tokenizer.get_vocab()  # the name the converter gives the first padded row
    model.resize_token_embeddings(width + 28, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[width:] *= 30
    save_model(model, tokenizer, tmp_path / "model")
    model, tokenizer = load_pretrained(str(tmp_path / "model"))
    export_model(tmp_path / "model", tmp_path / "ct2", quantization="float32")
    engine = EngineModel(tmp_path / "ct2")
    assert engine.padding_tokens == [f"<nlgkd_padding_{i}>" for i in range(28)]
    decoding = DecodingConfig(strategy=strategy, num_beams=3, max_new_tokens=8, batch_size=8)
    encoded, _ = encode(demo_data["test"], tokenizer, 48, 48)
    rows = [row for per_source in engine.generate_ids(list(encoded["source_ids"])[:8], decoding, seed=0)
            for row in per_source]
    assert rows and not any(tokenizer.unk_token_id in row for row in rows)  # a padded row's name reads as <unk>
    if strategy == "greedy":  # and what it writes instead is transformers' choice (a random beam ties too often)
        assert outputs_of(engine, engine.tokenizer, demo_data, accelerator, decoding) == \
            outputs_of(model, tokenizer, demo_data, accelerator, decoding)


def test_an_int8_export_mostly_agrees_and_decodes_every_strategy(trained, demo_data, accelerator, tmp_path, capsys):
    from nlgkd.cli import main

    # a trained model: a random one's logits are near ties everywhere, and which of them int8 rounding flips
    # depends on the CPU's int8 kernels (16 of 24 outputs agreed on one machine, all on another)
    folder = trained[1] / "tiny" / "teacher"
    model, tokenizer = load_pretrained(str(folder))
    assert main(["export", str(folder), "--out", str(tmp_path / "int8")]) == 0  # int8 by default
    printed = capsys.readouterr()
    assert "as ctranslate2 int8" in printed.out
    assert "Loading weights" not in printed.err  # the converter's own load of the model shows no bar
    manifest = json.loads((tmp_path / "int8" / "nlgkd_export.json").read_text())
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == [
        "config.json", "model.bin", "nlgkd_export.json", "shared_vocabulary.json", "tokenizer"]
    engine = EngineModel(tmp_path / "int8")
    expected = outputs_of(model, tokenizer, demo_data, accelerator)
    got = outputs_of(engine, engine.tokenizer, demo_data, accelerator)
    assert sum(a == b for a, b in zip(got, expected)) >= 0.75 * len(expected)
    assert manifest["quantization"] == "int8" and manifest["weights_mb"] < 0.75 * manifest["params"] * 4 / 2**20
    # beam search and K samples per input also run on the engine
    beams = outputs_of(engine, engine.tokenizer, demo_data, accelerator,
                       DecodingConfig(strategy="beam", num_beams=3, num_return_sequences=2, batch_size=8,
                                      max_new_tokens=24))
    samples = outputs_of(engine, engine.tokenizer, demo_data, accelerator,
                         DecodingConfig(strategy="sample", top_p=0.9, num_return_sequences=3, batch_size=8,
                                        max_new_tokens=24))
    assert {len(b) for b in beams} == {2} and {len(s) for s in samples} == {3}
    with pytest.raises(ModelLoadError, match="is a CTranslate2 export: evaluate stages and nlgkd serve run it"):
        load_pretrained(str(tmp_path / "int8"))
    with pytest.raises(ValueError, match="'diverse_beam' is not available on a CTranslate2 model"):
        outputs_of(engine, engine.tokenizer, demo_data, accelerator, DecodingConfig(strategy="diverse_beam"))
    with pytest.raises(ValueError, match="decoding.early_stopping: false has no CTranslate2 equivalent"):
        outputs_of(engine, engine.tokenizer, demo_data, accelerator,
                   DecodingConfig(strategy="beam", early_stopping=False, max_new_tokens=8))


def test_engine_samples_depend_on_the_seed_alone(demo_data, tmp_path):
    # CTranslate2 seeds a worker thread once; without a fresh engine per call, a batch's samples would depend
    # on what was decoded before it (a resumed or sharded PT stage would draw other samples)
    fresh_model("mbart", demo_data, tmp_path / "model")
    export_model(tmp_path / "model", tmp_path / "ct2", quantization="float32")
    engine = EngineModel(tmp_path / "ct2", reseed_per_call=True)
    sources = [engine.tokenizer(text)["input_ids"] for text in demo_data["test"]["source"][:4]]
    sample = DecodingConfig(strategy="sample", top_p=0.95, num_return_sequences=3, max_new_tokens=12)
    first = engine.generate_texts(sources, sample, seed=5)
    engine.generate_texts(sources[:2], sample, seed=7)
    assert engine.generate_texts(sources, sample, seed=5) == first
    assert engine.generate_texts(sources, sample, seed=6) != first
    assert len({text for texts in first for text in texts}) > 6  # the samples vary
    # an input's K samples are K independent draws in the order drawn, as K copies of it give: CTranslate2's own
    # num_hypotheses K would return them likeliest first (a hidden curriculum for pt_schedule: cycle)
    one_each = engine.generate_texts([ids for ids in sources for _ in range(3)],
                                     dataclasses.replace(sample, num_return_sequences=1), seed=5)
    assert first == [[text for copy in one_each[3 * i : 3 * i + 3] for text in copy] for i in range(len(sources))]


def test_nlgkd_loads_ctranslate2_before_torch():
    # loaded after torch's OpenMP runtime (once torch had run a parallel region), CTranslate2 decoded at about half
    # speed; this guards the import order in nlgkd/__init__.py
    import subprocess
    import sys

    pytest.importorskip("ctranslate2")
    code = "import sys, nlgkd; print('ctranslate2' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["True", "False"]


def test_what_cannot_be_exported_says_what_can(demo_data, tmp_path, capsys):
    from nlgkd.cli import main

    texts = list(demo_data["train"]["source"])
    model, tokenizer = build_fresh(ModelConfig(arch="lstm", d_model=16, encoder_layers=1, decoder_layers=1,
                                               vocab_size=200), texts, seed=0)
    save_model(model, tokenizer, tmp_path / "lstm")
    with pytest.raises(ExportError, match=r"a 'nlgkd_lstm' model, which CTranslate2 cannot convert; format "
                                          r"ctranslate2 exports bart, mbart, pegasus, marian, t5"):
        export_model(tmp_path / "lstm", tmp_path / "out")
    assert main(["export", str(tmp_path / "lstm"), "--format", "onnx", "--out", str(tmp_path / "out")]) == 2
    assert "format onnx: not available in this version of nlgkd" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))
    # --out never deletes what is not an earlier export, nor the model being exported
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="the folder exists and is not an earlier export"):
        export_model(tmp_path / "lstm", tmp_path / "notes")
    with pytest.raises(ExportError, match="it holds, or is inside, the model folder"):
        export_model(tmp_path / "lstm", tmp_path / "lstm" / "int8")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me" and (tmp_path / "lstm" / "config.json").exists()


def test_an_export_stage_is_evaluated_beside_pytorch_and_served(tiny_recipe, tmp_path):
    import openai

    from nlgkd.recipe import parse_recipe
    from nlgkd.runner import Runner
    from nlgkd.serve import create_app, load_served_model
    from nlgkd.serve import BackgroundServer

    # random weights (a models: entry, untrained): long outputs, so the comparisons below mean something
    tiny_recipe["models"] = {"rand": {"init": "fresh", "arch": "mbart", "d_model": 32, "encoder_layers": 2,
                                      "decoder_layers": 2, "attention_heads": 2, "ffn_dim": 64, "vocab_size": 300}}
    tiny_recipe["stages"] = [
        {"name": "rand_int8", "kind": "export", "model": "rand"},
        {"name": "eval", "kind": "evaluate", "models": ["rand", "rand_int8"], "timing_passes": 1,
         "decoding": {"strategy": "greedy", "max_new_tokens": 24, "batch_size": 8}}]
    runner = Runner(parse_recipe(tiny_recipe), runs_root=tmp_path)
    runner.run()
    folder = runner.run_dir / "rand_int8"
    assert json.loads((folder / "stage.json").read_text())["export"]["quantization"] == "int8"
    metrics = json.loads((runner.run_dir / "eval" / "metrics.json").read_text())
    assert metrics["rand"]["backend"] == "pytorch" and metrics["rand_int8"]["backend"] == "ctranslate2 int8"
    assert metrics["rand_int8"]["params"] == metrics["rand"]["params"]
    assert metrics["rand_int8"]["weights_mb"] < 0.75 * metrics["rand"]["weights_mb"]
    rows = [json.loads(line) for line in (runner.run_dir / "eval" / "predictions" / "rand_int8.jsonl")
            .read_text().splitlines()]
    assert min(len(r["prediction"]) for r in rows) > 10

    served = load_served_model(str(folder), name="student", device="cpu")
    with BackgroundServer(create_app(served)) as server:
        client = openai.OpenAI(api_key="unused", base_url=server.base_url, max_retries=0, timeout=30)
        # one request is one input: compare with the engine decoding that input alone (int8 kernels give
        # slightly different numbers for an input padded inside a batch)
        alone = EngineModel(folder)
        for row in rows[:3]:
            answer = client.chat.completions.create(model="student", temperature=0, max_tokens=24,
                                                    messages=[{"role": "user", "content": row["source"]}])
            ids = alone.tokenizer(row["source"])["input_ids"]
            assert answer.choices[0].message.content == alone.generate_texts([ids], GREEDY, seed=0)[0][0]
        with pytest.raises(openai.BadRequestError, match="does not report token log-probabilities"):
            client.chat.completions.create(model="student", messages=[{"role": "user", "content": rows[0]["source"]}],
                                           logprobs=True)


def test_an_export_is_for_evaluate_and_serve_and_a_recipe_says_so_before_running(tiny_recipe):
    from nlgkd.config import RecipeError
    from nlgkd.recipe import parse_recipe

    tiny_recipe["stages"] = [tiny_recipe["stages"][0],
                             {"name": "teacher_int8", "kind": "export", "model": "teacher"},
                             {"name": "eval", "kind": "evaluate", "models": ["teacher", "teacher_int8"]}]
    parse_recipe(tiny_recipe)  # evaluate takes models and exports
    tiny_recipe["stages"].append({"name": "student", "kind": "prune", "from": "teacher_int8"})
    with pytest.raises(RecipeError, match=r"'teacher_int8' gives an exported model, but a model is needed here; "
                                          r"an export is evaluated or served \(or writes pseudo-targets with engine: ctranslate2\), not trained"):
        parse_recipe(tiny_recipe)
    tiny_recipe["stages"] = tiny_recipe["stages"][:2]
    tiny_recipe["stages"][1]["format"] = "onnx"
    with pytest.raises(RecipeError, match=r"format: 'onnx' is not available in this version of nlgkd"):
        parse_recipe(tiny_recipe)
