"""`augment`: new inputs made from a split's sources by masking, POS-guided replacement and n-gram sampling
(Tang et al., 2019; study stage S5). The procedure is `nlgkd.augmentation.augment_texts`.

The artifact is `dataset/` (`datasets.Dataset.save_to_disk`) with columns
    source   the augmented input text
    origin   row of the original input in the split (after the max_examples cap)
A `pseudo_targets` stage labels these inputs with `augmented: [<this stage's name>]`.
"""
from __future__ import annotations

import shutil
import time

import datasets

from ..augmentation import augment_texts, build_pos_lexicon

MASK_TOKEN = "<mask>"  # the mask token of BART's and of nlgkd's fresh tokenizers


def run(ctx) -> None:
    cfg = ctx.config
    data = ctx.data()
    if cfg.split not in data:
        raise ValueError(f"split: {cfg.split!r} is not in the data (have {sorted(data)}); "
                         "set split: to one of them or configure it under data:")
    texts = list(data[cfg.split]["source"])
    if cfg.max_examples is not None:
        texts = texts[: cfg.max_examples]

    started = time.perf_counter()
    lexicon = None
    if cfg.p_pos > 0:
        fields = [f for t in texts for f in (t.split(cfg.field_separator) if cfg.field_separator else [t])]
        try:
            lexicon = build_pos_lexicon(fields, method=cfg.pos_method)
        except RuntimeError as err:  # pos_method: spacy without spaCy or its model
            raise ValueError(f"pos_method: {err}; install spaCy and en_core_web_sm, or use distributional") from None
    ctx.log(f"augmenting {len(texts)} {cfg.split} inputs, {cfg.n_iter} variants each")
    # deterministic given the recipe seed; every process makes the same list, the main one writes it
    rows = augment_texts(texts, n_iter=cfg.n_iter, p_mask=cfg.p_mask, p_pos=cfg.p_pos, p_ng=cfg.p_ng,
                         seed=ctx.seed, mask_token=MASK_TOKEN, lexicon=lexicon,
                         field_separator=cfg.field_separator)
    elapsed = time.perf_counter() - started
    if not rows:
        raise ValueError(f"augmentation made no new inputs from {len(texts)} {cfg.split} sources; raise n_iter "
                         "or p_mask / p_pos / p_ng")

    if ctx.accelerator.is_main_process:
        target = ctx.out_dir / "dataset"
        shutil.rmtree(target, ignore_errors=True)  # left by a run killed while saving
        features = datasets.Features({"source": datasets.Value("string"), "origin": datasets.Value("int64")})
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(target))
    ctx.info["augment"] = {
        "split": cfg.split,
        "inputs": len(texts),
        "written": len(rows),
        "duplicates_dropped": len(texts) * cfg.n_iter - len(rows),
        "pos_lexicon_words": len(lexicon) if lexicon is not None else 0,
        "seconds": round(elapsed, 2),
    }
    ctx.log(f"wrote {len(rows)} augmented inputs ({len(texts) * cfg.n_iter - len(rows)} duplicates dropped) "
            f"in {elapsed:.1f}s")
    for row in rows[:3]:
        ctx.log(f"example: {texts[row['origin']]!r}\n    -> {row['source']!r}")
