"""`finetune`: cross-entropy training of a model on gold targets."""
from __future__ import annotations

from dataclasses import asdict

from ..loop import train
from ..models import save_model
from .training import (cross_entropy_step, encode_splits, make_collator, make_validator, mixed_by_task,
                       record_convergence, record_teacher_check, teacher_args)


def run(ctx) -> None:
    cfg = teacher_args(ctx, ctx.config)
    model, tokenizer = ctx.load_model(cfg.model)
    encoded = encode_splits(ctx, tokenizer)
    if "train" not in encoded:
        raise ValueError(f"stage {ctx.stage.name!r}: finetune needs a train split with targets")

    def compute_loss(model, batch, normalizer):
        return cross_entropy_step(model, batch, normalizer, cfg.label_smoothing)

    result = train(
        model=model,
        train_data=mixed_by_task(ctx, encoded["train"]),
        collate_fn=make_collator(model, tokenizer),
        compute_loss=compute_loss,
        evaluate=make_validator(model, tokenizer, encoded, ctx, cfg),
        args=cfg,
        accelerator=ctx.accelerator,
        out_dir=ctx.out_dir,
        seed=cfg.seed if cfg.seed is not None else ctx.seed,
        log=ctx.log,
    )
    ctx.info["train"] = asdict(result)
    record_convergence(ctx, result, cfg)
    record_teacher_check(ctx, model, tokenizer, encoded, result.best, cfg)  # when later stages learn from it
    if ctx.accelerator.is_main_process:
        save_model(ctx.accelerator.unwrap_model(model), tokenizer, ctx.out_dir)
