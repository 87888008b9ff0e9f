"""Tang et al. (2019) input augmentation: rates, determinism, de-duplication, field cycling."""

import random

import pytest

from nlgkd.augmentation import (
    augment_once,
    augment_texts,
    build_pos_lexicon,
    fields_to_augment,
    pos_buckets,
)

# 40 distinct words per text, so an untouched variant is rare and rates are easy to read off.
WORDS = [f"w{i}" for i in range(40)]
LONG_TEXT = " ".join(WORDS)


def test_mask_rate_matches_p_mask():
    rng = random.Random(0)
    outputs = [augment_once(LONG_TEXT, rng, p_mask=0.3, p_pos=0.0, p_ng=0.0) for _ in range(500)]
    words = [w for out in outputs for w in out.split()]
    assert len(words) == 500 * 40  # masking keeps the length
    assert abs(words.count("<mask>") / len(words) - 0.3) < 0.02


def test_pos_replacement_rate_and_same_tag():
    # Two tags: every word has at least one same-tag alternative, so each POS draw changes it.
    lexicon = {w: ("even" if int(w[1:]) % 2 == 0 else "odd") for w in WORDS}
    buckets = pos_buckets(lexicon, [LONG_TEXT])
    rng = random.Random(0)
    changed = total = 0
    for _ in range(500):
        out = augment_once(LONG_TEXT, rng, p_mask=0.0, p_pos=0.2, p_ng=0.0,
                           lexicon=lexicon, buckets=buckets).split()
        for old, new in zip(WORDS, out):
            total += 1
            if new != old:
                changed += 1
                assert lexicon[new] == lexicon[old]
    assert abs(changed / total - 0.2) < 0.02


def test_mask_and_pos_are_exclusive_per_word():
    lexicon = {w: "x" for w in WORDS}
    buckets = pos_buckets(lexicon, [LONG_TEXT])
    rng = random.Random(1)
    outs = [augment_once(LONG_TEXT, rng, p_mask=0.5, p_pos=0.5, p_ng=0.0, lexicon=lexicon, buckets=buckets)
            for _ in range(50)]
    # p_mask + p_pos = 1: every word is either masked or replaced, never kept.
    for out in outs:
        assert all(new != old for new, old in zip(out.split(), WORDS))


def test_ngram_rate_and_lengths():
    rng = random.Random(0)
    lengths = [len(augment_once(LONG_TEXT, rng, p_mask=0.0, p_pos=0.0, p_ng=0.25).split()) for _ in range(2000)]
    shortened = [n for n in lengths if n < 40]
    assert abs(len(shortened) / len(lengths) - 0.25) < 0.03
    assert set(shortened) == {1, 2, 3, 4, 5}
    # an n-gram is a contiguous piece of the original
    rng = random.Random(5)
    for _ in range(100):
        out = augment_once(LONG_TEXT, rng, p_mask=0.0, p_pos=0.0, p_ng=1.0)
        assert f" {out} " in f" {LONG_TEXT} "


def test_augment_texts_deterministic_by_seed():
    texts = [f"the cat number {i} sat on the mat near house {i % 7}" for i in range(50)]
    a = augment_texts(texts, n_iter=5, seed=3)
    assert a == augment_texts(texts, n_iter=5, seed=3)
    assert a != augment_texts(texts, n_iter=5, seed=4)


def test_augment_texts_deduplicates():
    texts = ["a b", "c d", "a b c d e f g"]
    out = augment_texts(texts, n_iter=50, p_mask=0.3, p_pos=0.0, p_ng=0.5, seed=0)
    sources = [o["source"] for o in out]
    assert len(sources) == len(set(sources))
    assert not set(sources) & set(texts)
    # "a b" has only a handful of possible variants, far fewer than 50
    assert 0 < sum(o["origin"] == 0 for o in out) < 10
    assert all(o["origin"] in (0, 1, 2) and set(o) == {"source", "origin"} for o in out)
    assert [o["origin"] for o in out] == sorted(o["origin"] for o in out)


def test_fields_to_augment_cycle():
    assert [fields_to_augment(2, i) for i in range(6)] == [[0], [1], [0, 1], [0], [1], [0, 1]]
    assert [fields_to_augment(3, i) for i in range(4)] == [[0], [1], [2], [0, 1, 2]]
    assert fields_to_augment(2, 0, offset=1) == [1]
    assert fields_to_augment(1, 7) == [0]


def test_field_cycling_in_augment_texts():
    first = " ".join(f"a{i}" for i in range(30))
    second = " ".join(f"b{i}" for i in range(30))
    text = f"{first} ; answer: {second}"
    out = augment_texts([text], n_iter=3, p_mask=0.2, p_pos=0.0, p_ng=0.0, seed=0, field_separator=" ; answer: ")
    assert len(out) == 3
    parts = [o["source"].split(" ; answer: ") for o in out]
    # iteration 0: first field only; 1: second only; 2: both (Tang et al.'s sentence-pair scheme)
    assert parts[0][0] != first and parts[0][1] == second
    assert parts[1][0] == first and parts[1][1] != second
    assert parts[2][0] != first and parts[2][1] != second


def test_distributional_lexicon_groups_slot_fillers():
    texts = [f"food: {f} | area: {a}" for f in ["Italian", "French", "Thai"] for a in ["riverside", "centre"]] * 3
    lexicon = build_pos_lexicon(texts, method="distributional")
    assert lexicon["Italian"] == lexicon["French"] == lexicon["Thai"]
    assert lexicon["riverside"] == lexicon["centre"]
    assert lexicon["Italian"] != lexicon["riverside"]


def test_demo_records_with_default_lexicon():
    texts = [f"name: {n} | food: {f} | area: {a}"
             for n in ["The Eagle", "The Mill", "Zizzi", "Aromi"]
             for f in ["Italian", "French", "Thai"] for a in ["riverside", "city centre"]]
    out = augment_texts(texts, n_iter=4, seed=0, field_separator=" | ")
    assert out
    for o in out:
        assert o["source"].count(" | ") == 2  # separators survive; one field changes at a time or all


def test_bad_arguments():
    with pytest.raises(ValueError, match="p_mask"):
        augment_texts(["a b"], 2, p_mask=1.5)
    with pytest.raises(ValueError, match="p_mask \\+ p_pos"):
        augment_texts(["a b"], 2, p_mask=0.6, p_pos=0.6)
    with pytest.raises(ValueError, match="n_iter"):
        augment_texts(["a b"], -1)
    assert augment_texts([""], 3) == []
