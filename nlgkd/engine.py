"""The inference engine's runtime: an exported folder (`nlgkd export`, an export stage) loaded for decoding.

`EngineModel` decodes an exported folder the way `nlgkd.generation.generate` decodes a PyTorch model (greedy,
beam, sampling; K outputs per input; de-duplication), so `evaluate` scores it beside PyTorch rows and
`nlgkd serve` serves it. The conversion that makes the folder is nlgkd/export.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import DecodingConfig
from .engine_decoding import ctranslate2_refusal
from .errors import ModelLoadError
from .models import EXPORT_FILE

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


def vocabulary_past(folder: Path, tokenizer) -> list[str]:
    """The names an exported model's vocabulary gives the rows past the tokenizer's (a padded embedding: T5's
    32,128 rows for 32,100 tokens; `nlgkd.export.name_padding_rows`), those no token has: the engine never
    generates them. An export made before nlgkd named them may reuse real tokens' names; those are left alone."""
    paths = sorted(folder.glob("*vocabulary.json"))  # a Translator's source and target ones are padded alike
    if not paths:
        return []
    known = tokenizer.get_vocab()
    return [name for name in json.loads(paths[0].read_text(encoding="utf-8"))[len(tokenizer):] if name not in known]


class EngineModel:
    """An exported folder, loaded for decoding on the CPU (or CUDA): `generate_texts` is what
    `nlgkd.generation.generate` calls for it, batch by batch.

    With `reseed_per_call` (pseudo-target stages, Joint-Teaching) sampling draws from an engine made for the call
    and seeded with the seed it is given (the caller passes the run's seed plus the batch's number), so the same
    batch with the same seed draws the same samples on one machine, whatever ran before; without it (evaluate,
    serve) the seed takes effect once, for the engine's first samples. Greedy and beam search are deterministic.
    int8 kernels quantize activations per batch: an input decoded inside a padded batch can differ slightly from
    the same input decoded alone."""

    def __init__(self, folder: str | Path, device: str = "cpu", threads: int | None = None, device_index: int = 0,
                 reseed_per_call: bool = False):
        from transformers import AutoTokenizer

        ctranslate2 = require_ctranslate2()
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / EXPORT_FILE).read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / TOKENIZER_DIR))
        self.encoder_decoder = self.manifest["is_encoder_decoder"]
        if threads is None:
            import torch

            threads = torch.get_num_threads()  # the count nlgkd chose for this run (nlgkd/threads.py)
        self._ctranslate2 = ctranslate2
        # device_index: this process's GPU (a sharded run decodes on every process's own card)
        self._engine_args = {"device": device, "device_index": device_index, "compute_type": "default",
                             "intra_threads": threads}
        self.reseed_per_call = reseed_per_call
        self.padding_tokens = vocabulary_past(self.folder, self.tokenizer)
        self.engine = self.new_engine()

    def new_engine(self):
        """A Translator (encoder-decoder) or Generator (decoder-only) on this folder, with its own worker threads."""
        kind = self._ctranslate2.Translator if self.encoder_decoder else self._ctranslate2.Generator
        return kind(str(self.folder), **self._engine_args)

    @property
    def backend(self) -> str:
        return f"ctranslate2 {self.manifest['quantization']}"

    def options(self, decoding: DecodingConfig) -> dict:
        """CTranslate2's decoding options for nlgkd's decoding config, field by field what
        `nlgkd.generation.generation_config` gives transformers; what the engine cannot do is refused."""
        from .generation import within_positions

        refusal = ctranslate2_refusal(decoding)
        if refusal:
            raise ValueError(refusal)
        if decoding.max_new_tokens is None:
            raise ValueError("decoding.max_new_tokens: not resolved; recipes fill it from data.max_target_length")
        k = decoding.num_return_sequences
        max_new = decoding.max_new_tokens
        if self.encoder_decoder:  # the decoder start token takes the first position
            max_new = within_positions(max_new, self.manifest.get("position_limit"), 1)
        common = {"max_decoding_length": max_new, "min_decoding_length": decoding.min_new_tokens,
                  "num_hypotheses": k, "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
                  "return_end_token": True}
        if self.padding_tokens:  # never generated, as nlgkd.generation suppresses them for transformers
            common["suppress_sequences"] = [[token] for token in self.padding_tokens]
        if decoding.strategy == "greedy":
            return {**common, "beam_size": 1}
        if decoding.strategy == "beam":
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
        k = decoding.num_return_sequences
        if decoding.strategy == "sample":
            self._ctranslate2.set_random_seed(seed)
            if self.reseed_per_call:
                # CTranslate2 seeds a worker thread's generator once, when the thread first samples; a new engine
                # has new threads, so these samples depend on `seed` alone, not on what was decoded before (a
                # resumed or sharded PT stage draws what an uninterrupted one does). The old one goes first: one
                # copy of the weights resident.
                self.engine = None
                self.engine = self.new_engine()
            # K copies of each input, one sample each: with num_hypotheses K CTranslate2 sorts an input's samples
            # by score, and the K PTs of an input would come likeliest first instead of in the order drawn
            source_ids = [ids for ids in source_ids for _ in range(k)]
            options["num_hypotheses"] = 1
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
        outputs = [r.hypotheses if self.encoder_decoder else r.sequences for r in results]
        rows = [[tok.convert_tokens_to_ids(tokens) for tokens in per_source] for per_source in outputs]
        if decoding.strategy == "sample":  # regroup the K single samples of each input
            return [[row for copy in rows[i : i + k] for row in copy] for i in range(0, len(rows), k)]
        return rows

    def mean_logprobs(self, source_ids: list[list[int]], texts: list[str], max_target_length: int,
                      chunk: int) -> list[float | None]:
        """Mean token log-probability of each text (then EOS) as the target of its source, the engine's twin of
        `nlgkd.stages.pseudo_targets.mean_logprobs` (same truncation, EOS counted); None for ''. A decoder-only
        model scores `source, EOS, target, EOS` (nlgkd's causal prompt) and the target's positions are kept."""
        from .data import causal_prompt, truncate

        tok = self.tokenizer
        scores: list[float | None] = [None] * len(texts)
        todo = [i for i, t in enumerate(texts) if t]
        if not todo:
            return scores
        targets = [truncate(ids + [tok.eos_token_id], max_target_length)
                   for ids in tok([texts[i] for i in todo], add_special_tokens=False)["input_ids"]]
        if self.encoder_decoder:
            # the Translator appends EOS to each target itself
            target_tokens = [tok.convert_ids_to_tokens(ids[:-1]) for ids in targets]
            sources = [tok.convert_ids_to_tokens(source_ids[i]) for i in todo]
            results = self.engine.score_batch(sources, target_tokens, max_batch_size=chunk, max_input_length=0)
        else:  # the Generator scores every token after the first, as given
            sequences = [tok.convert_ids_to_tokens(causal_prompt(source_ids[i], tok.eos_token_id) + ids)
                         for i, ids in zip(todo, targets)]
            results = self.engine.score_batch(sequences, max_batch_size=chunk, max_input_length=0)
        for i, ids, result in zip(todo, targets, results):
            on_target = result.log_probs[-len(ids):]
            scores[i] = sum(on_target) / len(on_target)
        return scores

    def generate_texts(self, source_ids: list[list[int]], decoding: DecodingConfig, seed: int) -> list[list[str]]:
        """K texts per source, decoded and cleaned as `nlgkd.generation.generate_batch` does."""
        grouped = [[self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in rows]
                   for rows in self.generate_ids(source_ids, decoding, seed)]
        if decoding.dedup:
            grouped = [list(dict.fromkeys(g)) for g in grouped]
        return grouped
