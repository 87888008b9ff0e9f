"""`prune`: a student made from a teacher by keeping chosen encoder and/or decoder layers."""
from __future__ import annotations

from ..models import save_model
from ..pruning import prune_model


def run(ctx) -> None:
    cfg = ctx.config
    teacher, tokenizer = ctx.load_model(cfg.from_)
    student, info = prune_model(teacher, cfg.encoder_layers, cfg.decoder_layers)
    ctx.info["prune"] = info
    ctx.log(f"{info['family']}: kept encoder layers {info['encoder_layers']} and decoder layers "
            f"{info['decoder_layers']} of the teacher; {info['student_params']:,} parameters "
            f"({info['compression']:.2f}x smaller)")
    if ctx.accelerator.is_main_process:
        save_model(student, tokenizer, ctx.out_dir)
