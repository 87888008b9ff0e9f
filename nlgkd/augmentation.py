"""Input augmentation of Tang et al. (2019), "Distilling Task-Specific Knowledge from BERT into
Simple Neural Networks", section 3.3, applied to source texts to make new unlabeled inputs for
the teacher to label (study stage S5).

For every word of an input, draw X ~ U[0, 1]:
  - X < p_mask:                  replace the word with the mask token;
  - p_mask <= X < p_mask + p_pos: replace it with another word of the same part of speech, drawn
                                 from the unigram distribution of the training words restricted
                                 to that part of speech;
  - otherwise keep it.
Then, with probability p_ng, replace the whole example with a random n-gram of it, n ~ U{1..5}.
This is repeated ``n_iter`` times per input and duplicates are discarded.

Inputs made of several fields (sentence pairs, "question; answer: ..." templates, or the demo
task's "key: value | key: value" records) are split on ``field_separator``; the iterations cycle
through augmenting field 1 only, field 2 only, ..., and all fields at once (for two fields this is
Tang et al.'s first / second / both scheme).

Part of speech. No tagger ships with the toolkit. If spaCy and its ``en_core_web_sm`` model
happen to be installed, ``build_pos_lexicon`` uses spaCy's coarse POS tags. Otherwise it builds a
*distributional word class* lexicon from the texts themselves -- not real POS tags: words are
grouped by their most frequent left and right neighbours (the classic "words that occur in the
same contexts belong to the same class" idea), with two back-offs for words whose group would be
a singleton: the most frequent left neighbour alone, then the word's shape (capitalized, lower
case, number, punctuation). On templated data such as the demo records this recovers the slot
classes well ("Italian" and "French" both follow "food:"); on free text it is a rough stand-in
for POS that mostly groups words of similar syntactic role.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter, defaultdict

BOS, EOS = "<s>", "</s>"


# --------------------------------------------------------------------------- POS lexicon

def _shape(word: str) -> str:
    """A coarse word-shape class used as the last back-off tag."""
    if any(ch.isdigit() for ch in word):
        return "SHAPE:num"
    if not any(ch.isalnum() for ch in word):
        return "SHAPE:punct"
    if word[:1].isupper():
        return "SHAPE:cap"
    return "SHAPE:low"


def _most_frequent(counter: Counter) -> str:
    """Most frequent key; ties broken alphabetically so the result never depends on hashing."""
    return min(counter.items(), key=lambda item: (-item[1], item[0]))[0]


def _distributional_lexicon(texts: list[str], min_count: int = 2) -> dict[str, str]:
    """Word -> distributional class (see the module docstring)."""
    sentences = [text.split() for text in texts]
    counts = Counter(word for words in sentences for word in words)

    def context(word: str) -> str:
        # Rare neighbours carry no signal; collapse them so they don't split classes.
        return word.lower() if counts[word] >= min_count else "<rare>"

    left, right = defaultdict(Counter), defaultdict(Counter)
    for words in sentences:
        padded = [BOS] + words + [EOS]
        for i in range(1, len(padded) - 1):
            word = padded[i]
            left[word][padded[i - 1] if i == 1 else context(padded[i - 1])] += 1
            right[word][padded[i + 1] if i == len(padded) - 2 else context(padded[i + 1])] += 1

    top_left = {word: _most_frequent(left[word]) for word in counts}
    fine = {word: f"L={top_left[word]} R={_most_frequent(right[word])}" for word in counts}
    fine_size = Counter(fine.values())

    # Back-off 1: words alone in their (left, right) class are grouped by left neighbour only.
    lonely = [word for word in counts if fine_size[fine[word]] < 2]
    coarse_size = Counter(top_left[word] for word in lonely)

    lexicon = {}
    for word in counts:
        if fine_size[fine[word]] >= 2:
            lexicon[word] = fine[word]
        elif coarse_size[top_left[word]] >= 2:
            lexicon[word] = f"L={top_left[word]}"
        else:
            lexicon[word] = _shape(word)  # back-off 2: word shape
    return lexicon


def _spacy_lexicon(texts: list[str], model: str = "en_core_web_sm") -> dict[str, str]:
    """Word -> its most frequent spaCy coarse POS tag, tagging the whitespace tokens as given."""
    import spacy
    from spacy.tokens import Doc

    nlp = spacy.load(model)
    docs = (Doc(nlp.vocab, words=text.split()) for text in texts if text.split())
    tags = defaultdict(Counter)
    for doc in nlp.pipe(docs, batch_size=256):
        for token in doc:
            tags[token.text][token.pos_] += 1
    return {word: _most_frequent(counter) for word, counter in tags.items()}


def build_pos_lexicon(texts: list[str], method: str = "auto", min_count: int = 2) -> dict[str, str]:
    """Map every whitespace word of ``texts`` to a part-of-speech-like tag.

    ``method``: "spacy" (requires spaCy and ``en_core_web_sm``), "distributional" (always
    available; distributional word classes, see the module docstring), or "auto" (spaCy when it
    loads, else distributional). ``min_count``: neighbours seen fewer times count as "<rare>".
    """
    if method not in ("auto", "spacy", "distributional"):
        raise ValueError(
            f"build_pos_lexicon: method must be 'auto', 'spacy' or 'distributional', got {method!r}"
        )
    if method in ("auto", "spacy"):
        try:
            return _spacy_lexicon(texts)
        except Exception as error:  # spaCy missing, model missing, or any load failure
            if method == "spacy":
                raise RuntimeError(f"build_pos_lexicon: spaCy tagging failed: {error}") from error
    return _distributional_lexicon(texts, min_count=min_count)


def pos_buckets(lexicon: dict[str, str], texts: list[str]) -> dict[str, tuple[list[str], list[int]]]:
    """Tag -> (words, cumulative weights) for sampling a replacement word.

    Weights are the words' frequencies in ``texts`` (plus one, so lexicon words that never occur
    there can still be drawn): Tang et al.'s unigram distribution re-normalized within a tag.
    """
    counts = Counter(word for text in texts for word in text.split())
    by_tag = defaultdict(list)
    for word in sorted(lexicon):  # sorted: independent of how the lexicon was built or loaded
        by_tag[lexicon[word]].append(word)
    buckets = {}
    for tag, words in by_tag.items():
        cumulative, total = [], 0
        for word in words:
            total += counts[word] + 1
            cumulative.append(total)
        buckets[tag] = (words, cumulative)
    return buckets


def _same_pos_word(word: str, rng: random.Random, lexicon: dict, buckets: dict) -> str:
    """Another word with the same tag as ``word``; ``word`` itself if there is none."""
    tag = lexicon.get(word)
    if tag is None or len(buckets[tag][0]) < 2:
        return word
    words, cumulative = buckets[tag]
    # Rejection sampling keeps each draw O(log n); the retry cap only matters when ``word``
    # holds almost all of the tag's mass.
    for _ in range(20):
        index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        candidate = words[min(index, len(words) - 1)]
        if candidate != word:
            return candidate
    return word


# --------------------------------------------------------------------------- augmentation

def augment_once(text: str, rng: random.Random, p_mask: float = 0.1, p_pos: float = 0.1,
                 p_ng: float = 0.25, mask_token: str = "<mask>", lexicon: dict | None = None,
                 buckets: dict | None = None) -> str:
    """One augmented copy of ``text`` (one iteration of Tang et al.'s procedure).

    POS replacement needs ``lexicon`` and ``buckets`` (from ``pos_buckets``); without them, or for
    words missing from the lexicon, the word is kept.
    """
    words = text.split()
    if not words:
        return text
    new_words = []
    for word in words:
        x = rng.random()
        if x < p_mask:
            new_words.append(mask_token)
        elif x < p_mask + p_pos and lexicon is not None and buckets is not None:
            new_words.append(_same_pos_word(word, rng, lexicon, buckets))
        else:
            new_words.append(word)
    if rng.random() < p_ng:
        n = min(rng.randint(1, 5), len(new_words))
        start = rng.randint(0, len(new_words) - n)
        new_words = new_words[start:start + n]
    return " ".join(new_words)


def fields_to_augment(n_fields: int, iteration: int, offset: int = 0) -> list[int]:
    """Which fields iteration ``iteration`` augments: field 0, field 1, ..., then all of them.

    The cycle has ``n_fields + 1`` steps (for two fields: first, second, both). ``offset``
    rotates where the cycle starts; ``augment_texts`` passes the input's index, so that with many
    fields and few iterations every field still gets augmented somewhere in the dataset.
    """
    if n_fields <= 1:
        return [0]
    step = (iteration + offset) % (n_fields + 1)
    return list(range(n_fields)) if step == n_fields else [step]


def augment_texts(texts: list[str], n_iter: int, p_mask: float = 0.1, p_pos: float = 0.1,
                  p_ng: float = 0.25, seed: int = 0, mask_token: str = "<mask>",
                  lexicon: dict[str, str] | None = None,
                  field_separator: str | None = None) -> list[dict]:
    """Make up to ``n_iter`` augmented variants of every text (Tang et al., 2019).

    Returns ``[{"source": variant, "origin": index of the original in texts}, ...]`` in input
    order. A variant equal to any original text or to an earlier variant is dropped, so inputs
    may get fewer than ``n_iter`` variants. ``lexicon`` (word -> tag) defaults to
    ``build_pos_lexicon`` over the texts' fields. With ``field_separator``, each text is split
    into fields and the iterations cycle over which field is augmented (see
    ``fields_to_augment``); separators are kept as they are. Deterministic given ``seed``.
    """
    if not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f"augment_texts: n_iter must be an int >= 0, got {n_iter!r}")
    for name, p in (("p_mask", p_mask), ("p_pos", p_pos), ("p_ng", p_ng)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment_texts: {name} must be in [0, 1], got {p!r}")
    if p_mask + p_pos > 1.0:
        raise ValueError(f"augment_texts: p_mask + p_pos must be <= 1, got {p_mask + p_pos}")
    if field_separator == "":
        raise ValueError("augment_texts: field_separator must be a non-empty string or None")

    split = [text.split(field_separator) if field_separator else [text] for text in texts]
    flat_fields = [field for fields in split for field in fields]
    buckets = None
    if p_pos > 0:
        if lexicon is None:
            lexicon = build_pos_lexicon(flat_fields)
        buckets = pos_buckets(lexicon, flat_fields)

    rng = random.Random(seed)
    seen = set(texts)
    out = []
    for index, fields in enumerate(split):
        for iteration in range(n_iter):
            chosen = fields_to_augment(len(fields), iteration, offset=index)
            new_fields = [
                augment_once(field, rng, p_mask, p_pos, p_ng, mask_token, lexicon, buckets)
                if i in chosen else field
                for i, field in enumerate(fields)
            ]
            variant = field_separator.join(new_fields) if field_separator else new_fields[0]
            if variant in seen:
                continue
            seen.add(variant)
            out.append({"source": variant, "origin": index})
    return out
