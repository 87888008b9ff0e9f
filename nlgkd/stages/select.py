"""`select`: the candidate that scores best on validation becomes this stage's model.

The study chooses each stage's setting (PT decoding, K, unlabeled inputs, Joint-Teaching) on validation and
reports the winner on test. A recipe names the candidates (usually one varied distill stage: each variant is
one candidate, all trained with the same steps), a select stage scores them on the same validation examples
with the same decoding, and later stages (an evaluate stage on test) read the winner by the select stage's name.
"""
from __future__ import annotations

import json

from ..data import encode
from ..models import save_model
from ..recipe import to_dict
from ..stage_context import StageError
from .training import decoded_score


def run(ctx) -> None:
    cfg = ctx.config
    data = ctx.data()
    if "validation" not in data:
        raise ValueError(f"stage {ctx.stage.name!r}: select chooses on the validation split, and the data has none; "
                         "give data.validation")
    split = data["validation"]
    if cfg.max_examples is not None:
        split = split.select(range(min(cfg.max_examples, len(split))))
    references = list(split["target"])
    scores, chosen, best = {}, None, None  # the leader so far and its (model, tokenizer): saved, not loaded again
    for name in cfg.candidates:
        model, tokenizer = ctx.load_model(name)
        model.to(ctx.accelerator.device)
        encoded, _ = encode(split, tokenizer, ctx.recipe.data.max_source_length, ctx.recipe.data.max_target_length)
        scores[name] = round(decoded_score(ctx, model, tokenizer, list(encoded["source_ids"]), references,
                                           cfg.decoding, f"score {name}", cfg.metric, progress=True), 4)
        ctx.log(f"{name}: {cfg.metric} {scores[name]:.2f} on {len(references)} validation examples")
        if chosen is None or scores[name] > scores[chosen]:  # strictly: of equal scores the recipe's first wins
            chosen, best = name, (model, tokenizer)
    ctx.info["select"] = {"chosen": chosen, "metric": cfg.metric, "split": "validation", "examples": len(references),
                          "scores": scores, "decoding": to_dict(cfg.decoding)}
    ctx.log(f"chose {chosen} ({cfg.metric} {scores[chosen]:.2f}; "
            + ", ".join(f"{n} {s:.2f}" for n, s in scores.items() if n != chosen) + ")")
    if (check := candidate_teacher_check(ctx, chosen)) is not None:
        ctx.info["teacher_check"] = check  # later stages judge the chosen teacher by it (on_weak_teacher: stop)
    if ctx.accelerator.is_main_process:
        save_model(*best, ctx.out_dir)


def candidate_teacher_check(ctx, name: str) -> dict | None:
    """The teacher check a candidate's stage recorded (it teaches later stages through this one), or None."""
    try:
        folder = ctx.artifact_dir(name)
    except StageError:  # a models: entry, not a stage
        return None
    return json.loads((folder / "stage.json").read_text()).get("teacher_check")
