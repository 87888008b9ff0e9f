"""The built-in demo task: restaurant records -> English descriptions (data-to-text).

The task imitates the E2E NLG challenge without downloading anything. A record is a small dict
of attributes::

    {"name": "The Eagle", "food": "Italian", "area": "riverside", "price": "cheap"}

Its source text is the record linearized in a fixed canonical field order (``linearize``)::

    name: The Eagle | food: Italian | price: cheap | area: riverside

and its target is a description drawn at random (``describe_record``)::

    The Eagle serves Italian food and has cheap prices. It is in the riverside area.

Targets are genuinely many-to-one, like real NLG data: every attribute has several phrasings
(drawn with unequal weights, so there is a most likely "house style" as in crowd-sourced data),
attributes are sometimes merged into one phrase, clause order is canonical about two times in three
and shuffled otherwise, and clauses are grouped into one to three sentences. As a yardstick, a
second random description scores about 43 BLEU against the single reference of the test split, and
the most "central" of 20 random descriptions (what a well-trained model decoding with beam search
approaches) about 54. The vocabulary stays at a couple of hundred word types so that a tiny model
trained on CPU for a few minutes learns the task well. Everything is driven by
``random.Random(seed)``, so the data are identical across runs, processes and platforms.
"""

from __future__ import annotations

import random

# Canonical field order of the linearized source (E2E's attribute set, with short keys).
FIELDS = ["name", "type", "food", "price", "rating", "area", "family", "near"]

NAMES = [
    "The Eagle", "The Mill", "The Phoenix", "The Golden Curry", "The Rice Boat", "The Punter",
    "The Wrestlers", "The Cricketers", "The Vaults", "The Plough", "The Waterman", "The Olive Grove",
    "The Dumpling Tree", "The Twenty Two", "Blue Spice", "Green Man", "Aromi", "Zizzi", "Cotto",
    "Fitzbillies", "Strada", "Wildwood", "Alimentum", "Clowns", "Loch Fyne", "Giraffe",
    "Bibimbap House", "Midsummer House", "Taste of Cambridge", "Browns Cambridge", "Cocum",
    "Avalon", "Raja Indian Cuisine", "Cafe Sicilia", "Cafe Rouge", "Caffe Nero", "All Bar One",
    "Burger King", "Crowne Plaza Hotel", "Rainbow Vegetarian Cafe",
]

# Allowed values of every attribute except "name" and "near" (both drawn from NAMES).
VALUES = {
    "type": ["restaurant", "coffee shop", "pub"],
    "food": ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Spanish", "Thai"],
    "price": ["cheap", "moderate", "high"],
    "rating": ["low", "average", "high"],
    "area": ["riverside", "city centre"],
    "family": ["yes", "no"],
}

# Predicate phrasings per attribute, most likely first. The subject ("The Eagle", "It", ...) is
# added by the sentence builder, so each phrase reads "<subject> <phrase>". Every phrase contains
# the attribute's value verbatim, except "family", which is said with (or without) "not".
PHRASES = {
    "type": [("is a {v}", 6), ("is a local {v}", 2), ("is a {v} in town", 1)],
    "food": [("serves {v} food", 5), ("offers {v} food", 2), ("provides {v} cuisine", 2),
             ("has {v} dishes", 1)],
    "price": [("has a {v} price range", 5), ("is in the {v} price range", 2),
              ("has {v} prices", 2), ("offers {v} prices", 1)],
    "rating": [("has a {v} customer rating", 5), ("is rated {v} by customers", 2),
               ("has a {v} rating", 2), ("has received {v} ratings", 1)],
    "area": [("is in the {v} area", 5), ("is located in the {v} area", 3),
             ("can be found in the {v}", 2)],
    "near": [("is near {v}", 5), ("is located near {v}", 2), ("is close to {v}", 2)],
}
FAMILY_PHRASES = {
    "yes": [("is family friendly", 5), ("is kid friendly", 2), ("is good for families", 1),
            ("welcomes children", 1)],
    "no": [("is not family friendly", 5), ("is not kid friendly", 2),
           ("is not good for families", 1), ("does not welcome children", 1)],
}
# Probability that a description states the attributes in a shuffled order.
SHUFFLE_PROB = 0.35
# Probability that the predicates are split into sentences the regular way (see describe_record).
REGULAR_SPLIT_PROB = 0.6
# Two attributes said in one phrase (probability of merging when both are present).
MERGE_PROB = 0.5
MERGED_PHRASES = {
    ("type", "food"): [("is a {food} {type}", 3), ("is a {type} serving {food} food", 1)],
    ("area", "near"): [("is in the {area} area near {near}", 3),
                       ("is near {near} in the {area}", 1)],
}
MERGE_PARTNER = {**{a: b for a, b in MERGED_PHRASES}, **{b: a for a, b in MERGED_PHRASES}}

DEMO_DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200, "unlabeled": 2000}
SPLITS = ["train", "validation", "test", "unlabeled"]


def linearize(record: dict) -> str:
    """Return the source text of a record: ``key: value`` pairs in canonical order, ' | ' between."""
    return " | ".join(f"{key}: {record[key]}" for key in FIELDS if key in record)


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    """Draw one phrase from a list of (phrase, weight)."""
    phrases = [phrase for phrase, _ in weighted]
    weights = [weight for _, weight in weighted]
    return rng.choices(phrases, weights=weights, k=1)[0]


def _fix_articles(text: str) -> str:
    """Turn 'a' into 'an' before a vowel ('a Italian pub' -> 'an Italian pub')."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "A") and words[i + 1][:1].lower() in "aeiou":
            words[i] = words[i] + "n"
    return " ".join(words)


def _predicates(record: dict, rng: random.Random) -> list[str]:
    """Phrase every attribute except the name, in canonical or shuffled order."""
    keys = [key for key in FIELDS if key in record and key != "name"]
    # Most references keep the canonical order; the rest shuffle it.
    if rng.random() < SHUFFLE_PROB:
        rng.shuffle(keys)
    phrases = []
    done = set()
    for key in keys:
        if key in done:
            continue
        partner = MERGE_PARTNER.get(key)
        if partner in record and rng.random() < MERGE_PROB:
            pair = (key, partner) if (key, partner) in MERGED_PHRASES else (partner, key)
            phrases.append(_pick(rng, MERGED_PHRASES[pair]).format(**{k: record[k] for k in pair}))
            done.add(partner)
        elif key == "family":
            phrases.append(_pick(rng, FAMILY_PHRASES[record[key]]))
        else:
            phrases.append(_pick(rng, PHRASES[key]).format(v=record[key]))
        done.add(key)
    return phrases


def _join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_record(record: dict, rng: random.Random) -> str:
    """Return one randomly phrased English description of a record.

    The name opens the first sentence; the other attributes are phrased as predicates and grouped
    into one to three sentences whose subject is "It", the name again, or "The <type>".
    """
    name = record["name"]
    phrases = _predicates(record, rng)
    # Split the predicates into consecutive groups, one per sentence: usually the fewest
    # sentences of at most 3 predicates each, evenly filled; sometimes a random split.
    n = len(phrases)
    if rng.random() < REGULAR_SPLIT_PROB:
        n_sentences = (n + 2) // 3
        cuts = [round(i * n / n_sentences) for i in range(1, n_sentences)]
    else:
        n_sentences = rng.randint(max(1, (n + 2) // 3), min(3, n))
        cuts = sorted(rng.sample(range(1, n), n_sentences - 1))
    groups = [phrases[i:j] for i, j in zip([0] + cuts, cuts + [n])]

    sentences = []
    for index, group in enumerate(groups):
        if index == 0:
            # Sometimes tuck the first predicate into a relative clause: "X, which is near Y, ...".
            if len(group) >= 2 and rng.random() < 0.2:
                sentence = f"{name}, which {group[0]}, {_join(group[1:])}"
            else:
                sentence = f"{name} {_join(group)}"
        else:
            subjects = ["It", name]
            if "type" in record:
                subjects.append(f"The {record['type']}")
            sentence = f"{_pick(rng, list(zip(subjects, [4, 1, 1])))} {_join(group)}"
        sentences.append(_fix_articles(sentence) + ".")
    return " ".join(sentences)


def sample_record(rng: random.Random) -> dict:
    """Draw a record: a name plus a random subset of 2-5 other attributes (3-6 in all)."""
    record = {"name": rng.choice(NAMES)}
    others = [key for key in FIELDS if key != "name"]
    for key in rng.sample(others, rng.randint(2, 5)):
        if key == "near":
            record[key] = rng.choice([n for n in NAMES if n != record["name"]])
        else:
            record[key] = rng.choice(VALUES[key])
    return record


def _unique_records(rng: random.Random, count: int) -> list[dict]:
    """Draw ``count`` records, distinct where possible (the record space is large)."""
    records, seen = [], set()
    attempts = 0
    while len(records) < count:
        record = sample_record(rng)
        key = linearize(record)
        attempts += 1
        # Give up on distinctness only if the space is nearly exhausted (huge sizes).
        if key in seen and attempts < 50 * count:
            continue
        seen.add(key)
        records.append(record)
    return records


def make_demo_splits(sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """Build the demo dataset: {"train", "validation", "test", "unlabeled"} -> list of examples.

    Labeled examples are ``{"source": linearized record, "target": one sampled description}``;
    "unlabeled" examples have only "source". Records are distinct across all splits, so nothing
    in validation/test/unlabeled was seen in train. ``sizes`` overrides ``DEMO_DEFAULT_SIZES``
    per split. The output depends only on ``sizes`` and ``seed``.
    """
    sizes = {**DEMO_DEFAULT_SIZES, **(sizes or {})}
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"make_demo_splits: unknown split(s) {unknown}; allowed: {SPLITS}")
    for split, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"make_demo_splits: sizes[{split!r}] must be an int >= 0, got {size!r}")

    rng = random.Random(seed)
    records = _unique_records(rng, sum(sizes[split] for split in SPLITS))
    splits, start = {}, 0
    for split in SPLITS:
        chunk = records[start:start + sizes[split]]
        start += sizes[split]
        if split == "unlabeled":
            splits[split] = [{"source": linearize(r)} for r in chunk]
        else:
            splits[split] = [{"source": linearize(r), "target": describe_record(r, rng)} for r in chunk]
    return splits
