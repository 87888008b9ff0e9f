"""The distill stage's training data: gold targets, pseudo-targets (one per input each epoch, or all), a top-k
cache's examples, and the denoising pairs of general distillation."""
from __future__ import annotations

from ..denoising import make_denoising_data
from ..pseudo_target_data import encode_pseudo_targets
from .training import mixed_by_task


def cached_training_data(cache, cfg, log):
    """epoch -> examples of a top-k cache (`cached_teacher:`), chosen by the stage's own `gold` and
    `pt_schedule`, as `training_data` chooses from the recipe's gold targets and pseudo-targets."""
    rows = cache.training_examples()
    if rows and "kind" not in rows[0]:
        log("note: this cache does not record which examples are gold and which pseudo-targets (it predates "
            "nlgkd recording them): every cached example trains every epoch; re-run its stage to choose")
        return lambda epoch: rows
    gold = [row for row in rows if row["kind"] == "gold"]
    if cfg.gold and not gold:
        raise ValueError("gold: true, but the cached teacher holds no gold targets (its cache_logits stage has "
                         "gold: false, or it holds an API teacher's soft targets); set gold: false")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["kind"] == "pt":
            groups.setdefault(row["input"], []).append(row)
    gold = gold if cfg.gold else []
    if not gold and not groups:
        raise ValueError("no training targets: the cache holds only gold targets and this stage has gold: false")
    return with_pseudo_targets(lambda epoch: gold, list(groups.values()), cfg.pt_schedule)


def with_pseudo_targets(gold_for_epoch, groups: list[list[dict]], pt_schedule: str):
    """epoch -> gold examples plus pseudo-targets; `groups` holds each input's K PTs. `cycle` gives each input
    its PT number (epoch mod K), as in the study; `all` gives all K every epoch; `all_together` too, with each
    example's `group` (an input's PTs share one; the loop keeps a group side by side: `nlgkd.loop.grouped_order`)."""
    if pt_schedule == "all":
        every_pt = [row for rows in groups for row in rows]
        return lambda epoch: gold_for_epoch(epoch) + every_pt
    if pt_schedule == "all_together":
        grouped = [{**row, "group": g} for g, rows in enumerate(groups) for row in rows]
        return lambda epoch: [{**row, "group": len(groups) + i} for i, row in enumerate(gold_for_epoch(epoch))] \
            + grouped
    return lambda epoch: gold_for_epoch(epoch) + [rows[epoch % len(rows)] for rows in groups]


def training_data(ctx, cfg, tokenizer, encoded):
    """epoch -> tokenized examples: gold targets (if `gold`) plus this epoch's pseudo-targets (`pt_schedule`:
    see `with_pseudo_targets`)."""
    gold_for_epoch = mixed_by_task(ctx, list(encoded["train"]) if cfg.gold and "train" in encoded else [])
    groups: list[list[dict]] = []
    for name in cfg.pseudo_targets:
        pts = encode_pseudo_targets(ctx.artifact_dir(name), tokenizer, ctx.recipe.data)
        by_input: dict[tuple, list[dict]] = {}
        for row in pts:
            by_input.setdefault((name, row["origin"], row["input_index"]), []).append(row)
        groups += [sorted(rows, key=lambda r: r["pt_index"]) for rows in by_input.values()]
        ctx.log(f"{name}: {len(pts)} pseudo-targets for {len(by_input)} inputs")
    if not gold_for_epoch(0) and not groups:
        raise ValueError("no training targets: set gold: true (with a train split) or pseudo_targets: [a stage]")
    return with_pseudo_targets(gold_for_epoch, groups, cfg.pt_schedule)


def with_denoising(ctx, cfg, tokenizer, encoded, teacher_model_type: str):
    """epoch -> this epoch's denoising pairs (general distillation, `nlgkd/denoising.py`), plus the stage's
    gold targets and pseudo-targets when it has any (`gold: false` and no pseudo_targets: pairs only)."""
    denoised = make_denoising_data(ctx, cfg.denoising, tokenizer, teacher_model_type)
    if not cfg.gold and not cfg.pseudo_targets:
        return denoised
    task_data = training_data(ctx, cfg, tokenizer, encoded)
    return lambda epoch: task_data(epoch) + denoised(epoch)
