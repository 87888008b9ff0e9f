"""Export a trained model to an inference engine (CTranslate2), and run the exported folder.

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

`EngineModel` decodes an exported folder the way `nlgkd.generation.generate` decodes a PyTorch model
(greedy, beam, sampling; K outputs per input; de-duplication), so `evaluate` scores it beside PyTorch rows
and `nlgkd serve` serves it. Families CTranslate2 cannot convert (nlgkd's LSTM student) get an error that
names the families and formats that work.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .config import DecodingConfig
from .errors import ModelLoadError
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
TOKENIZER_DIR = "tokenizer"


class ExportError(ModelLoadError):
    """An export that cannot be made: the message names the model, what works, and what to do."""


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / EXPORT_FILE).exists()


def require_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise ExportError("CTranslate2 is not installed; install the export extra: pip install -e \".[export]\" "
                          "(or pip install ctranslate2)") from None
    return ctranslate2


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
    from .metrics import count_parameters
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
    if encoder_decoder:  # the model's own start token (see the module docstring)
        ct2_config = json.loads((folder / "config.json").read_text())
        start = config.get("decoder_start_token_id")
        if start is None:  # transformers 5 keeps it in generation_config.json for some families (T5)
            start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise ExportError(f"{model_dir}: neither config.json nor generation_config.json says "
                              "decoder_start_token_id; set it in config.json (the token the decoder starts from)")
        ct2_config["decoder_start_token"] = tokenizer.convert_ids_to_tokens(start)
        if ct2_config.get("bos_token") is None:  # mBART-50's tokenizer has none; the engine wants a token string
            ct2_config["bos_token"] = tokenizer.cls_token or tokenizer.eos_token
        (folder / "config.json").write_text(json.dumps(ct2_config, indent=2))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(folder / TOKENIZER_DIR))
    try:
        engine_version = version("ctranslate2")
    except PackageNotFoundError:
        engine_version = getattr(ctranslate2, "__version__", "unknown")
    manifest = {"format": fmt, "quantization": quantization, "source": str(model_dir), "model_type": family,
                "is_encoder_decoder": encoder_decoder, "params": count_parameters(model),
                # the checkpoint's forced BOS (mBART-50's language code, BART's <s>), which nlgkd's decoding keeps
                "forced_bos_token_id": getattr(model.generation_config, "forced_bos_token_id", None),
                "position_limit": position_limit(model),
                "weights_mb": (folder / "model.bin").stat().st_size / 2**20, "ctranslate2": engine_version}
    (folder / EXPORT_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


class EngineModel:
    """An exported folder, loaded for decoding on the CPU (or CUDA): `generate_texts` is what
    `nlgkd.generation.generate` calls for it, batch by batch.

    Sampling reseeds CTranslate2's generator with the seed it is given at every call (the caller passes the
    run's seed plus the batch's number), so the same batch with the same seed draws the same samples on one
    machine; greedy and beam search are deterministic. int8 kernels quantize activations per batch: an input decoded
    inside a padded batch can differ slightly from the same input decoded alone."""

    def __init__(self, folder: str | Path, device: str = "cpu", threads: int | None = None):
        from transformers import AutoTokenizer

        ctranslate2 = require_ctranslate2()
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / EXPORT_FILE).read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / TOKENIZER_DIR))
        self.encoder_decoder = self.manifest["is_encoder_decoder"]
        if threads is None:
            import torch

            threads = torch.get_num_threads()  # the count nlgkd chose for this run (nlgkd/threads.py)
        engine = ctranslate2.Translator if self.encoder_decoder else ctranslate2.Generator
        self.engine = engine(str(self.folder), device=device, compute_type="default", intra_threads=threads)
        self._ctranslate2 = ctranslate2

    @property
    def backend(self) -> str:
        return f"ctranslate2 {self.manifest['quantization']}"

    def options(self, decoding: DecodingConfig) -> dict:
        """CTranslate2's decoding options for nlgkd's decoding config, field by field what
        `nlgkd.generation.generation_config` gives transformers; what the engine cannot do is refused."""
        from .generation import within_positions

        if decoding.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding.strategy: {decoding.strategy!r} is not available on a CTranslate2 model; use "
                             "greedy, beam or sample")
        if decoding.from_checkpoint:
            raise ValueError(f"decoding.from_checkpoint: {decoding.from_checkpoint} is not available on a CTranslate2 "
                             "export (it keeps no generation_config); write those settings into the decoding block")
        if decoding.max_new_tokens is None:
            raise ValueError("decoding.max_new_tokens: not resolved; recipes fill it from data.max_target_length")
        if decoding.repetition_penalty != 1.0:  # measured: the float32 engine then ended outputs earlier
            raise ValueError("decoding.repetition_penalty: transformers also penalizes the decoder's start token or "
                             "the prompt, CTranslate2 only generated tokens, so an export would decode otherwise; "
                             "set it to 1.0 for an exported model, or evaluate the PyTorch folder")
        k = decoding.num_return_sequences
        max_new = decoding.max_new_tokens
        if self.encoder_decoder:  # the decoder start token takes the first position
            max_new = within_positions(max_new, self.manifest.get("position_limit"), 1)
        common = {"max_decoding_length": max_new, "min_decoding_length": decoding.min_new_tokens,
                  "num_hypotheses": k, "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
                  "return_end_token": True}
        if decoding.strategy == "greedy":
            return {**common, "beam_size": 1}
        if decoding.strategy == "beam":
            if not decoding.early_stopping:  # CTranslate2 ends a beam search once beam_size outputs have ended
                raise ValueError("decoding.early_stopping: false has no CTranslate2 equivalent (its beam search "
                                 "ends once num_beams outputs have ended); set it to true for an exported model")
            return {**common, "beam_size": max(decoding.num_beams, k), "length_penalty": decoding.length_penalty}
        # sample; nlgkd's top_k 0 (no top-k) is CTranslate2's 0 (the whole vocabulary)
        return {**common, "beam_size": 1, "sampling_topk": decoding.top_k, "sampling_topp": decoding.top_p,
                "sampling_temperature": decoding.temperature}

    def forced_bos(self, decoding: DecodingConfig) -> str | None:
        """The token every output starts with, as a token string (CTranslate2's target prefix), or None."""
        from .generation import forced_bos_id

        if decoding.forced_bos_token is not None:
            forced_bos_id(self.tokenizer, decoding.forced_bos_token)  # an error unless it is one of its tokens
            return decoding.forced_bos_token
        forced = self.manifest.get("forced_bos_token_id")
        return None if forced is None else self.tokenizer.convert_ids_to_tokens(forced)

    def generate_ids(self, source_ids: list[list[int]], decoding: DecodingConfig, seed: int) -> list[list[list[int]]]:
        """K generated token-id rows per source (continuations only, EOS kept where the model wrote it)."""
        tok = self.tokenizer
        options = self.options(decoding)
        if decoding.strategy == "sample":
            self._ctranslate2.set_random_seed(seed)
        if self.encoder_decoder:
            tokens = [tok.convert_ids_to_tokens(ids) for ids in source_ids]
            forced = self.forced_bos(decoding)
            prefix = {"target_prefix": [[forced]] * len(tokens)} if forced is not None else {}
            results = self.engine.translate_batch(tokens, max_batch_size=len(tokens), **prefix, **options)
        else:
            from .data import causal_prompt
            from .generation import within_positions

            prompts = [tok.convert_ids_to_tokens(causal_prompt(ids, tok.eos_token_id)) for ids in source_ids]
            # the positions left after the longest prompt
            max_length = within_positions(options.pop("max_decoding_length"), self.manifest.get("position_limit"),
                                          max(len(p) for p in prompts))
            results = self.engine.generate_batch(prompts, max_batch_size=len(prompts), max_length=max_length,
                                                 min_length=options.pop("min_decoding_length"),
                                                 include_prompt_in_result=False, **options)
        # a Translator's results hold hypotheses, a Generator's sequences
        outputs = [result.hypotheses if self.encoder_decoder else result.sequences for result in results]
        return [[tok.convert_tokens_to_ids(tokens) for tokens in rows] for rows in outputs]

    def generate_texts(self, source_ids: list[list[int]], decoding: DecodingConfig, seed: int) -> list[list[str]]:
        """K texts per source, decoded and cleaned as `nlgkd.generation.generate_batch` does."""
        grouped = [[self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in rows]
                   for rows in self.generate_ids(source_ids, decoding, seed)]
        if decoding.dedup:
            grouped = [list(dict.fromkeys(g)) for g in grouped]
        return grouped
