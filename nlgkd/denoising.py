"""General distillation data: denoising pairs made from raw text the way the teacher was pretrained.

TinyBERT and DistilBERT distill in two stages: first a *general* distillation of the pretrained teacher on
unlabeled text with the teacher's own pretraining task, then the task-specific distillation. For a seq2seq
teacher the pretraining task is denoising, so a `distill` stage with `denoising:` trains on pairs

    input   the corrupted text            target   the original text (teacher-forced)

and the word-level objectives compare the student with the teacher's own prediction of the original at
every target position (its denoising distribution), exactly as they do on task data.

Two corruptions, one per pretraining family (`denoising.family`, default from the teacher's model type):

    bart   sentence permutation + text infilling (Lewis et al., 2020): the sentences of a text are shuffled;
           then spans of whole words, with lengths ~ Poisson(mean_span = 3), covering `noise` (default 30%)
           of the words, are each replaced by one `<mask>` token; a span of length 0 inserts a `<mask>`.
           Spans never touch each other (at least one kept word between two masks).
    t5     span corruption (Raffel et al., 2020): `noise` (default 15%) of the tokens, cut into
           round(noise tokens / mean_span) spans, are each replaced in the input by one sentinel
           `<extra_id_i>` (i = 0, 1, ... left to right); the target lists each sentinel followed by the
           tokens it hides, and ends with the next sentinel when the text ends with kept tokens (the paper's
           "Thank you <X> me to your party <Y> week." -> "<X> for inviting <Y> last <Z>"). The span layout is
           rolled by a random offset (T5's `random_roll`), so on short texts a span can start anywhere.

Sentinels and the mask token: pretrained T5 tokenizers have 100 sentinels, pretrained BART ones a `<mask>`.
Fresh nlgkd tokenizers are trained with `<mask>` and 20 sentinels (`nlgkd.models.SPECIAL_TOKENS`), so both
families work on fresh models without adding tokens (adding tokens would change the vocabulary and break
word-level KD between teacher and student). The number of T5 spans is capped by the sentinels there are.

Reproducible: the corruption of text i in epoch e depends only on (seed, e, i) (numpy's seeded
generator); a new epoch draws new noise, as pretraining does (dynamic masking).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

T5_FAMILY = ("t5", "mt5", "umt5", "longt5")
BART_FAMILY = ("bart", "mbart", "marian", "pegasus", "plbart")
DEFAULT_NOISE = {"bart": 0.3, "t5": 0.15}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------------------ pair builders
def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> list[int]:
    """`num_items` cut into `num_segments` positive lengths, uniformly over all such cuts."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]])).astype(int).tolist()


def t5_noise_mask(length: int, noise: float, mean_span: float, max_spans: int,
                  rng: np.random.Generator) -> list[bool]:
    """Which of `length` tokens are corrupted: round(length * noise) of them (at least 1, at most
    length - 1) in round(noise tokens / mean_span) spans (at least 1, at most `max_spans`), alternating
    with kept segments, the whole layout rolled by a random offset."""
    num_noise = min(max(int(round(length * noise)), 1), length - 1)
    num_spans = min(max(int(round(num_noise / mean_span)), 1), max_spans, num_noise, length - num_noise)
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    kept_lengths = random_segmentation(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for kept, noisy in zip(kept_lengths, noise_lengths):
        mask += [False] * kept + [True] * noisy
    offset = int(rng.integers(length))
    return mask[offset:] + mask[:offset]


def t5_span_corruption(tokens: list[int], sentinels: list[int], rng: np.random.Generator, noise: float = 0.15,
                       mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """(input, target) token ids for T5's span corruption of `tokens` (no special tokens added here).

    input: the kept tokens with each corrupted span replaced by the next sentinel; target: each sentinel
    followed by the tokens of its span, then one more sentinel if the text ends with kept tokens.
    A text of fewer than 2 tokens cannot be split into kept and corrupted parts and comes back unchanged.
    Needs at least 2 sentinels: the roll can split one span in two (at the start and the end)."""
    if len(tokens) < 2:
        return list(tokens), list(tokens)
    mask = t5_noise_mask(len(tokens), noise, mean_span, len(sentinels) - 1, rng)
    source: list[int] = []
    target: list[int] = []
    span = -1
    for i, (token, noisy) in enumerate(zip(tokens, mask)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                source.append(sentinels[span])
                target.append(sentinels[span])
            target.append(token)
        else:
            source.append(token)
    if not mask[-1] and span + 1 < len(sentinels):
        target.append(sentinels[span + 1])
    return source, target


def poisson_span_lengths(total: int, mean_span: float, rng: np.random.Generator) -> list[int]:
    """Span lengths ~ Poisson(mean_span) drawn until they cover `total` words; the last one is cut so they
    sum to exactly `total`. Zero lengths (insertions) are kept."""
    lengths: list[int] = []
    covered = 0
    while covered < total:
        length = int(rng.poisson(mean_span))
        length = min(length, total - covered)
        lengths.append(length)
        covered += length
    return lengths


def bart_text_infilling(words: list[list[int]], mask_id: int, rng: np.random.Generator, noise: float = 0.3,
                        mean_span: float = 3.0) -> list[int]:
    """BART's text infilling of a text given as words (each a list of token ids): spans covering
    round(len(words) * noise) words, lengths ~ Poisson(mean_span), each replaced by one `mask_id`; a
    0-length span inserts a mask. Spans sit in distinct gaps between kept words, so two masks never touch.
    Returns the corrupted token ids (no special tokens added here)."""
    if not words:
        return []
    num_masked = min(int(round(len(words) * noise)), len(words) - 1) if len(words) > 1 else 0
    lengths = poisson_span_lengths(num_masked, mean_span, rng) if num_masked else []
    kept = len(words) - num_masked
    while len(lengths) > kept + 1:  # more spans than gaps between kept words: merge the last two
        lengths[-2] += lengths.pop()
    gaps = sorted(rng.choice(kept + 1, size=len(lengths), replace=False).tolist()) if lengths else []
    span_at = dict(zip(gaps, lengths))
    out: list[int] = []
    position = 0
    for gap in range(kept + 1):
        if gap in span_at:
            out.append(mask_id)
            position += span_at[gap]
        if gap < kept:
            out += words[position]
            position += 1
    return out


def permute_sentences(text: str, rng: np.random.Generator) -> str:
    """The sentences of `text` (split after . ! ?) in a random order."""
    sentences = SENTENCE_END.split(text.strip())
    if len(sentences) < 2:
        return text.strip()
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)


# ---------------------------------------------------------------------------- tokenizer side
def sentinel_ids(tokenizer, field_path: str = "denoising.family") -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... as far as the tokenizer has them (at least two)."""
    vocab = tokenizer.get_vocab()
    found = []
    while f"<extra_id_{len(found)}>" in vocab:
        found.append(vocab[f"<extra_id_{len(found)}>"])
    if len(found) < 2:
        raise ValueError(f"{field_path}: t5 span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... "
                         f"but the tokenizer ({type(tokenizer).__name__}) has {len(found)}; use family: bart (needs a "
                         "mask token) or a tokenizer with sentinels (pretrained T5, or any fresh nlgkd tokenizer)")
    return found


def mask_id(tokenizer, field_path: str = "denoising.family") -> int:
    if tokenizer.mask_token_id is None:
        raise ValueError(f"{field_path}: bart text infilling needs a mask token, but the tokenizer "
                         f"({type(tokenizer).__name__}) has none; use family: t5 (needs <extra_id_N> sentinels)")
    return tokenizer.mask_token_id


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special ids the tokenizer puts around a source (e.g. [<s>], [</s>] for BART, [],
    [</s>] for T5), found by encoding a probe with and without special tokens, so corrupted inputs look
    like the sources `nlgkd.data.encode` makes."""
    bare = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], [tokenizer.eos_token_id]


def words_of(tokenizer, text: str, limit: int) -> list[list[int]]:
    """The first `limit` tokens of `text` grouped into words (fast tokenizers' word ids; with a slow
    tokenizer each token counts as a word)."""
    encoding = tokenizer(text, add_special_tokens=False)
    ids = encoding["input_ids"][:limit]
    word_ids = encoding.word_ids() if getattr(tokenizer, "is_fast", False) else list(range(len(ids)))
    words: list[list[int]] = []
    previous = object()
    for token, word in zip(ids, word_ids):
        if word is None or word != previous:
            words.append([])
        words[-1].append(token)
        previous = word
    return words


def family_of(model_type: str | None) -> str | None:
    """'bart' or 't5' for the pretraining family of a transformers model type, else None."""
    if model_type in T5_FAMILY:
        return "t5"
    if model_type in BART_FAMILY:
        return "bart"
    return None


class DenoisingPairs:
    """Tokenized denoising pairs of `texts` for one tokenizer; `for_epoch(e)` gives the examples of epoch e
    (`source_ids` = special prefix + corrupted ids + special suffix, `target_ids` = original ids + EOS, the
    layout of `nlgkd.data.encode`), with noise drawn from (seed, e, text index)."""

    def __init__(self, texts: list[str], tokenizer, family: str, noise: float | None = None,
                 mean_span: float = 3.0, permute: bool = True, seed: int = 0, max_source_length: int = 256,
                 max_target_length: int = 128):
        if family not in DEFAULT_NOISE:
            raise ValueError(f"denoising.family: {family!r} is not one of {sorted(DEFAULT_NOISE)}")
        self.texts = texts
        self.tokenizer = tokenizer
        self.family = family
        self.noise = DEFAULT_NOISE[family] if noise is None else noise
        if not 0 < self.noise < 1:
            raise ValueError(f"denoising.noise: must be between 0 and 1 (exclusive), got {self.noise}")
        if mean_span <= 0:
            raise ValueError(f"denoising.mean_span: must be > 0, got {mean_span}")
        self.mean_span = mean_span
        self.permute = permute
        self.seed = seed
        self.prefix, self.suffix = special_tokens_around(tokenizer)
        # room for the specials; the target (the original) must fit the target length too
        self.limit = min(max_source_length - len(self.prefix) - len(self.suffix), max_target_length - 1)
        self.sentinels = sentinel_ids(tokenizer) if family == "t5" else []
        self.mask = mask_id(tokenizer) if family == "bart" else None
        self.originals = [tokenizer(t, add_special_tokens=False)["input_ids"][: self.limit] for t in texts]
        self.max_source_length = max_source_length
        self._cache: tuple[int, list[dict]] | None = None

    def pair(self, index: int, epoch: int = 0) -> tuple[list[int], list[int]]:
        """(source_ids, target_ids) of text `index` in `epoch`."""
        rng = np.random.default_rng([self.seed, epoch, index])
        original = self.originals[index]
        eos = self.tokenizer.eos_token_id
        if self.family == "t5":
            corrupted, target = t5_span_corruption(original, self.sentinels, rng, self.noise, self.mean_span)
        else:
            text = permute_sentences(self.texts[index], rng) if self.permute else self.texts[index]
            corrupted = bart_text_infilling(words_of(self.tokenizer, text, self.limit), self.mask, rng,
                                            self.noise, self.mean_span)
            target = original
        source = (self.prefix + corrupted)[: self.max_source_length - len(self.suffix)] + self.suffix
        return source, target + [eos]

    def for_epoch(self, epoch: int) -> list[dict]:
        if self._cache is None or self._cache[0] != epoch:
            rows = []
            for i in range(len(self.texts)):
                source, target = self.pair(i, epoch)
                rows.append({"source_ids": source, "target_ids": target})
            self._cache = (epoch, rows)
        return self._cache[1]


# ------------------------------------------------------------------------------------- recipe
def read_text_file(path: str, column: str, field_path: str = "denoising.file") -> list[str]:
    """Texts of a .txt file (one per non-empty line) or of `column` of a jsonl/csv/parquet file."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"{field_path}: file {path!r} not found (paths are relative to where you run nlgkd)")
    if file.suffix.lower() == ".txt":
        try:
            return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"{field_path}: {path!r} is not UTF-8 text; re-encode it") from None
    from .data import _load_file

    ds = _load_file(path, field_path)
    if column not in ds.column_names:
        raise ValueError(f"denoising.file_column: {column!r} is not a column of {path!r}; its columns are "
                         f"{ds.column_names}")
    return [str(t).strip() for t in ds[column] if t is not None and str(t).strip()]


def denoising_texts(cfg, data) -> list[str]:
    """The raw texts of a `denoising:` config: its file, or the chosen columns of the chosen splits."""
    if cfg.file is not None:
        texts = read_text_file(cfg.file, cfg.file_column)
    else:
        texts = []
        for split in cfg.splits:
            if split not in data:
                raise ValueError(f"denoising.splits: {split!r} is not in the data (have {sorted(data)})")
            for column in cfg.columns:
                if column in data[split].column_names:
                    texts += [t for t in data[split][column] if t and t.strip()]
                elif split != "unlabeled":
                    raise ValueError(f"denoising.columns: {column!r} is not a column of the {split} split")
    if cfg.max_examples is not None:
        texts = texts[: cfg.max_examples]
    if not texts:
        raise ValueError("denoising: no text to build pairs from; check denoising.file / splits / columns")
    return texts


def make_denoising_data(ctx, cfg, tokenizer, teacher_model_type: str | None) -> Callable[[int], list[dict]]:
    """epoch -> denoising examples for a distill stage's `denoising:` config (`cfg`)."""
    family = cfg.family or family_of(teacher_model_type)
    if family is None:
        raise ValueError(f"denoising.family: the teacher's model type {teacher_model_type!r} has no known "
                         "pretraining family; set family: bart (text infilling) or t5 (span corruption)")
    texts = denoising_texts(cfg, ctx.data())
    data_cfg = ctx.recipe.data
    pairs = DenoisingPairs(texts, tokenizer, family, noise=cfg.noise, mean_span=cfg.mean_span,
                           permute=cfg.permute_sentences, seed=ctx.seed if cfg.seed is None else cfg.seed,
                           max_source_length=data_cfg.max_source_length, max_target_length=data_cfg.max_target_length)
    ctx.log(f"denoising: {len(texts)} texts, {family} corruption, noise {pairs.noise}, mean span {cfg.mean_span}")
    ctx.info["denoising"] = {"texts": len(texts), "family": family, "noise": pairs.noise}
    return pairs.for_epoch
