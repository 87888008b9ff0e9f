"""Export a trained model to an inference engine (CTranslate2): the conversion (nlgkd/engine.py runs it).

    nlgkd export runs/demo/distill --format ctranslate2 --quantization int8 --out student-ct2

`export_model` converts with CTranslate2's own converter (`ctranslate2.converters.TransformersConverter`; an
optional dependency: `pip install -e ".[export]"`) into a folder that is usable on its own:

    model.bin, config.json, shared_vocabulary.json   CTranslate2's model
    tokenizer/                                      the model's tokenizer (transformers' files)
    nlgkd_export.json                               format, quantization, source folder, model type, parameters

Facts the converter reads differently from the transformers release nlgkd runs on are given to it
explicitly: the BART-family configs of transformers 5 have no `normalize_before` (mBART and Pegasus are
pre-layer-norm, BART post-layer-norm) and Pegasus none saying it has no embedding layer norm, so it converts
a staging copy whose config.json carries them; the converter leaves a fresh mBART's decoder start token
unset (it expects mBART-25's language codes), so the exported config.json gets the model's own
`decoder_start_token_id`; and generation may end at the first step (`min_decoding_length` 0), as in
transformers. Marian goes through the converter's loader for Marian's own SentencePiece tokenizer, which no
offline test here has (a Marian model with a BPE tokenizer does not convert).

Families CTranslate2 cannot convert (nlgkd's LSTM student) get an error that names the families and formats
that work. The exported folder is run by `nlgkd/engine.py`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .engine import TOKENIZER_DIR, ExportError, require_ctranslate2
from .models import EXPORT_FILE
from .quiet import quiet_weight_bars

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32")
# model_type -> what the converter must read from config.json that transformers 5's config does not hold
CT2_FAMILIES = {
    "bart": {"normalize_before": False},
    "mbart": {"normalize_before": True},
    "pegasus": {"normalize_before": True, "normalize_embedding": False},  # no layernorm_embedding
    "marian": {},
    "t5": {},
    "mt5": {},
    "gpt2": {},
    "opt": {},
    "llama": {},
}
def export_model(model_dir: str | Path, out_dir: str | Path, fmt: str = "ctranslate2",
                 quantization: str = "int8") -> dict:
    """Convert the model folder `model_dir` (a stage folder, e.g. runs/demo/distill) into `out_dir`, which
    appears whole or not at all; returns the manifest written to out_dir/nlgkd_export.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / EXPORT_FILE).exists():
        raise ExportError(f"--out {out_dir}: the folder exists and is not an earlier export (no {EXPORT_FILE}); "
                          "nlgkd replaces only its own exports: give a new folder")
    source, target = Path(model_dir).resolve(), out_dir.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise ExportError(f"--out {out_dir}: it holds, or is inside, the model folder {model_dir}; give a folder "
                          "outside it")
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = convert_into(model_dir, partial, fmt, quantization)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return manifest


def convert_into(model_dir: str | Path, folder: Path, fmt: str = "ctranslate2", quantization: str = "int8") -> dict:
    """Write the export of `model_dir` into the existing `folder` (an export stage's folder); the manifest."""
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise ExportError(f"{model_dir}: no config.json; give a model folder such as runs/demo/distill")
    config = json.loads(config_file.read_text())
    family = config.get("model_type")
    if fmt != "ctranslate2":
        raise ExportError(f"format {fmt}: not available in this version of nlgkd; format ctranslate2 exports the "
                          f"families {', '.join(CT2_FAMILIES)}")
    if family not in CT2_FAMILIES:
        raise ExportError(f"{model_dir}: a {family!r} model, which CTranslate2 cannot convert; format ctranslate2 "
                          f"exports {', '.join(CT2_FAMILIES)} models (an LSTM student stays a PyTorch folder: "
                          "evaluate and serve run it as it is)")
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization {quantization}: choose one of {', '.join(QUANTIZATIONS)}")
    ctranslate2 = require_ctranslate2()
    from transformers import AutoTokenizer

    from .generation import position_limit
    from .models import load_pretrained

    model, tokenizer = load_pretrained(str(model_dir))
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / "model"
        shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns("stage.json", "predictions", "checkpoints"))
        (staged / "config.json").write_text(json.dumps({**config, **CT2_FAMILIES[family]}, indent=2))
        try:
            with quiet_weight_bars():  # the converter loads the staged copy with transformers: no load bar
                ctranslate2.converters.TransformersConverter(str(staged)).convert(
                    str(folder), quantization=quantization, force=True)
        except Exception as err:  # the converter's own errors (an unsupported activation, layout...)
            raise ExportError(f"{model_dir}: CTranslate2 could not convert this {family} model: {err}") from None
    encoder_decoder = bool(config.get("is_encoder_decoder"))
    if encoder_decoder:
        give_start_tokens(folder, model_dir, config, model, tokenizer)
    name_padding_rows(folder, tokenizer)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(folder / TOKENIZER_DIR))
    try:
        engine_version = version("ctranslate2")
    except PackageNotFoundError:
        engine_version = getattr(ctranslate2, "__version__", "unknown")
    manifest = {"format": fmt, "quantization": quantization, "source": str(model_dir), "model_type": family,
                "is_encoder_decoder": encoder_decoder, "params": model.num_parameters(),
                # the checkpoint's forced BOS (mBART-50's language code, BART's <s>), which nlgkd's decoding keeps
                "forced_bos_token_id": getattr(model.generation_config, "forced_bos_token_id", None),
                "position_limit": position_limit(model),
                "weights_mb": (folder / "model.bin").stat().st_size / 2**20, "ctranslate2": engine_version}
    (folder / EXPORT_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


PADDING_ROW = "<nlgkd_padding_{}>"


def name_padding_rows(folder: Path, tokenizer) -> None:
    """An embedding padded past the tokenizer (T5's 32,128 rows for 32,100 tokens) makes the converter invent
    names for the extra rows, and for T5 it reuses the sentinels' (`<extra_id_0>`...), so a padded row read back
    as text became a real token. Each gets a name of its own, which no token has: the engine can suppress them
    by name (nlgkd/engine.py), as nlgkd.generation suppresses their ids for transformers."""
    width = len(tokenizer)
    for path in folder.glob("*vocabulary.json"):
        tokens = json.loads(path.read_text(encoding="utf-8"))
        if len(tokens) > width:
            tokens[width:] = [PADDING_ROW.format(i) for i in range(len(tokens) - width)]
            path.write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")


def give_start_tokens(folder: Path, model_dir: Path, config: dict, model, tokenizer) -> None:
    """The exported config.json gets the model's own decoder start token (the converter expects mBART-25's
    language codes; see the module docstring) and a BOS token string where the tokenizer has none (mBART-50)."""
    ct2_config = json.loads((folder / "config.json").read_text())
    start = config.get("decoder_start_token_id")
    if start is None:  # transformers 5 keeps it in generation_config.json for some families (T5)
        start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        raise ExportError(f"{model_dir}: neither config.json nor generation_config.json says "
                          "decoder_start_token_id; set it in config.json (the token the decoder starts from)")
    ct2_config["decoder_start_token"] = tokenizer.convert_ids_to_tokens(start)
    if ct2_config.get("bos_token") is None:  # the engine wants a token string
        ct2_config["bos_token"] = tokenizer.cls_token or tokenizer.eos_token
    (folder / "config.json").write_text(json.dumps(ct2_config, indent=2))
