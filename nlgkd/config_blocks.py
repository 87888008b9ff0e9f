"""The recipe's building blocks that stand alone: the decoding block every decode reads, CTranslate2's weight
types, and the distill stage's sub-blocks (hidden, attention, joint_teaching, denoising). nlgkd/config.py builds
the stage configs from them (and re-exports them: import them from either).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .engine_decoding import ctranslate2_refusal
from .schema import RecipeError, doc


# CTranslate2's weight types (export stages, engine pseudo-targets)
Quantization = Literal["int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32"]


@dataclass(kw_only=True)
class DecodingConfig:
    """How text is generated on every path; `nlgkd.generation.generation_config` makes it one explicit
    GenerationConfig (the checkpoint's own contributes its token ids and what `from_checkpoint` names)."""

    strategy: Literal["greedy", "beam", "diverse_beam", "sample"] = field(default="greedy", metadata=doc(
        "greedy; beam (num_beams); diverse_beam (num_beams in num_beam_groups); sample (temperature, top_k, "
        "top_p)"))
    num_beams: int = field(default=4, metadata=doc("beam, diverse_beam: beams per input", ge=1))
    num_beam_groups: int = field(default=2, metadata=doc("diverse beam: groups", ge=1))
    diversity_penalty: float = field(default=0.5, metadata=doc("diverse beam: penalty", ge=0))
    length_penalty: float = field(default=1.0, metadata=doc("beam: > 1 favours longer outputs, < 1 shorter"))
    early_stopping: bool = field(default=True, metadata=doc(
        "beam: end once num_beams outputs have ended (true); false: transformers' default heuristic, which goes on "
        "while a better output is still likely"))
    temperature: float = field(default=1.0, metadata=doc("sample: softmax temperature", gt=0))
    top_k: int = field(default=0, metadata=doc("sample: keep the k likeliest tokens (0: off, the whole vocabulary)", ge=0))
    top_p: float = field(default=1.0, metadata=doc("sample: nucleus; keep the likeliest tokens up to this mass", gt=0, le=1))
    num_return_sequences: int = field(default=1, metadata=doc("K outputs per input", ge=1))
    max_new_tokens: Optional[int] = field(default=None, metadata=doc(
        "longest output in tokens (default: data.max_target_length), at most the model's positions", ge=1, le=100_000))
    min_new_tokens: int = field(default=0, metadata=doc("shortest output in tokens before EOS may come (0: off)", ge=0))
    no_repeat_ngram_size: int = field(default=0, metadata=doc("forbid repeating any n-gram of this size (0: off)", ge=0))
    repetition_penalty: float = field(default=1.0, metadata=doc(
        "divide the score of tokens already in the output by this (1.0: off; CTRL's penalty)", gt=0))
    forced_bos_token: Optional[str] = field(default=None, metadata=doc(
        "a token every output starts with, e.g. an mBART-50 language code (de_DE); default: the checkpoint's "
        "forced_bos_token_id, if it has one"))
    from_checkpoint: list[Literal["min_length", "no_repeat_ngram_size", "length_penalty", "repetition_penalty",
                                  "num_beams", "forced_eos_token_id"]] = field(default_factory=list, metadata=doc(
        "search settings taken from the model folder's generation_config.json (transformers' meaning) instead "
        "of this block's, e.g. [min_length, no_repeat_ngram_size] of a summarizer; default: none"))
    batch_size: int = field(default=32, metadata=doc("inputs per generate call (length-sorted)", ge=1, le=100_000))
    dedup: bool = field(default=False, metadata=doc("drop duplicate outputs of one input"))


@dataclass(kw_only=True)
class HiddenKD:
    """Hidden-state distillation: PKD (normalized MSE), DistilBERT cosine, TinyBERT projected MSE."""

    loss: Literal["pkd", "cosine", "tinybert"] = field(default="pkd", metadata=doc(
        "pkd: squared distance of L2-normalized states; cosine: 1 - cos; tinybert: MSE after a projection learned "
        "with the student (student and teacher widths may differ)"))
    weight: float = field(default=1.0, metadata=doc("added to the loss times this", ge=0))
    sides: list[Literal["encoder", "decoder"]] = field(default_factory=lambda: ["decoder"], metadata=doc(
        "the stacks whose hidden states are matched"))
    layer_map: Union[Literal["last", "skip", "uniform"], list[list[int]]] = field(
        default="skip", metadata=doc("strategy, or explicit [[student_layer, teacher_layer], ...]"))


@dataclass(kw_only=True)
class AttentionKD:
    """Attention distillation: MiniLM-v2 Q/K/V relations, or TinyBERT attention-score MSE."""

    loss: Literal["minilm", "tinybert"] = field(default="minilm", metadata=doc(
        "minilm: KL between Q-Q, K-K, V-V relations (any head counts and widths); tinybert: MSE of the attention "
        "probabilities (same head count)"))
    weight: float = field(default=1.0, metadata=doc("added to the loss times this", ge=0))
    sides: list[Literal["encoder_self", "decoder_self", "cross"]] = field(
        default_factory=lambda: ["encoder_self", "decoder_self"], metadata=doc(
            "attention blocks matched: encoder self-attention, decoder self-attention, cross-attention"))
    relations: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "k", "v"], metadata=doc(
        "minilm: which self-relations (query-query, key-key, value-value)"))
    relation_heads: int = field(default=4, metadata=doc("minilm: heads both sides are regrouped into", ge=1))
    student_layer: int = field(default=-1, metadata=doc("the student's layer (negative: from the top)"))
    teacher_layer: int = field(default=-1, metadata=doc("the teacher's layer it learns from (negative: from the top)"))


@dataclass(kw_only=True)
class JointTeachingConfig:
    """Joint-Teaching (study stage S8): word-level KD also on prefixes the current student samples."""

    student_ratio: float = field(default=0.5, metadata=doc(
        "share of steps trained on student samples (1 = only)", ge=0, le=1))
    schedule: Literal["alternate", "random"] = field(
        default="alternate", metadata=doc("alternate: evenly spread; random: seeded coin per step"))
    decoding: DecodingConfig = field(
        default_factory=lambda: DecodingConfig(strategy="sample", top_p=0.95),
        metadata=doc("how the student writes its prefixes, one per input of the training micro-batch "
                     "(num_return_sequences 1, batch_size unused; steps_per_draw draws more at once)"))
    mix: Literal["steps", "rows"] = field(default="steps", metadata=doc(
        "steps: a student_ratio share of the optimizer steps trains on student prefixes, the others on the data's "
        "(the study); rows: every step trains on both, each input's own target and one prefix the student samples "
        "side by side, every token weighted alike and each source encoded once for both. rows puts twice the rows "
        "in a step (halve batch_size to keep a step's size) and needs student_ratio 0.5, schedule alternate and "
        "steps_per_draw 1, which only steps reads"))
    steps_per_draw: int = field(default=1, metadata=doc(
        "student steps served by one sampling call of k prefixes per input (the next k - 1 student steps train on "
        "them instead of their own batches); prefixes are then about (k - 1) / student_ratio steps old, and a "
        "resumed stage draws afresh. Needs decoding.strategy: sample", ge=1))
    stop_share: float = field(default=1.0, metadata=doc(
        "sampling ends once this share of the samples has written EOS; the others are cut there and train as the "
        "prefixes they are (no EOS counted). 1.0: when every sample has ended or max_new_tokens is reached. "
        "Below 1 (e.g. 0.9) one rambling sample no longer sets how long a whole batch decodes", gt=0, le=1))
    engine: Literal["transformers", "ctranslate2"] = field(default="transformers", metadata=doc(
        "what samples the prefixes: the student itself (exact), or a CTranslate2 copy of it made every "
        "engine_refresh_every optimizer steps (faster; the prefixes come from a student up to that many steps old)"))
    engine_refresh_every: int = field(default=20, metadata=doc(
        "engine: ctranslate2: optimizer steps between copies of the student (1: a fresh copy every student step)",
        ge=1))
    engine_quantization: Quantization = field(default="float32", metadata=doc(
        "engine: ctranslate2: the copy's weight type (float32: the student's own numbers; int8: faster only on "
        "some CPUs)"))

    def __post_init__(self):
        if self.decoding.num_return_sequences != 1:
            raise RecipeError(f"joint_teaching.decoding.num_return_sequences: the student writes one prefix per input "
                              f"for each student step (it is {self.decoding.num_return_sequences}); set it to 1, and "
                              "steps_per_draw to draw several at once")
        if self.engine == "ctranslate2":
            refusal = ctranslate2_refusal(self.decoding) or (
                "stop_share: below 1 needs transformers' stopping criteria" if self.stop_share < 1 else None)
            if refusal:
                raise RecipeError(f"joint_teaching.engine: ctranslate2: {refusal}; or use engine: transformers")
        if self.mix == "rows" and (self.student_ratio != 0.5 or self.schedule != "alternate"
                                   or self.steps_per_draw != 1):
            raise RecipeError("joint_teaching.mix: rows trains every step on both kinds of prefix, so "
                              "joint_teaching.student_ratio, schedule and steps_per_draw say nothing; leave them at "
                              f"their defaults (0.5, alternate, 1; they are {self.student_ratio}, {self.schedule!r}, "
                              f"{self.steps_per_draw}) or use mix: steps")
        if self.steps_per_draw > 1 and self.decoding.strategy != "sample":
            raise RecipeError(f"joint_teaching.steps_per_draw: {self.steps_per_draw} serves the next student steps "
                              f"with different samples of the same inputs, so it needs decoding.strategy: sample "
                              f"(it is {self.decoding.strategy!r}); set steps_per_draw: 1 or sample")


@dataclass(kw_only=True)
class DenoisingConfig:
    """General distillation data (TinyBERT / DistilBERT's first stage): denoising pairs made from raw text
    the way the teacher was pretrained; input = corrupted text, target = the original (nlgkd/denoising.py)."""

    splits: list[Literal["train", "validation", "test", "unlabeled"]] = field(
        default_factory=lambda: ["train", "unlabeled"], metadata=doc("splits whose text is used (unless file:)"))
    columns: list[Literal["source", "target"]] = field(
        default_factory=lambda: ["source"], metadata=doc("text of those splits: sources and/or targets"))
    file: Optional[str] = field(default=None, metadata=doc(
        "raw text instead of the splits: .txt (one text per line), .jsonl, .csv or .parquet"))
    file_column: str = field(default="text", metadata=doc("column of file: holding the text (not for .txt)"))
    family: Optional[Literal["bart", "t5"]] = field(default=None, metadata=doc(
        "bart: sentence permutation + text infilling with <mask>; t5: span corruption with <extra_id_N> "
        "sentinels; default: the teacher's family"))
    noise: Optional[float] = field(default=None, metadata=doc(
        "share of words (bart) or tokens (t5) corrupted; default 0.3 for bart, 0.15 for t5", gt=0, lt=1))
    mean_span: float = field(default=3.0, metadata=doc(
        "bart: Poisson lambda of span lengths; t5: mean span length", gt=0))
    permute_sentences: bool = field(default=True, metadata=doc("bart: shuffle each text's sentences"))
    seed: Optional[int] = field(default=None, metadata=doc(
        "default: the recipe seed; the noise of text i in epoch e depends only on (seed, e, i)"))
    max_examples: Optional[int] = field(default=None, metadata=doc("use the first N texts", ge=1))
