"""`export`: a model converted for an inference engine (CTranslate2), in the stage's folder; later evaluate
stages score it beside PyTorch models and `nlgkd serve` serves the folder (nlgkd/export.py)."""
from __future__ import annotations

import tempfile

from ..export import convert_into
from ..models import save_model


def run(ctx) -> None:
    cfg = ctx.config
    if not ctx.accelerator.is_main_process:
        return
    kind, _ = ctx.recipe.resolve(cfg.model, before=ctx.stage.index)
    if kind == "stage":
        manifest = convert_into(ctx.artifact_dir(cfg.model), ctx.out_dir, cfg.format, cfg.quantization)
    else:  # a models: entry (a hub name or a fresh model): saved as a folder first
        model, tokenizer = ctx.load_model(cfg.model)
        with tempfile.TemporaryDirectory() as folder:
            save_model(model, tokenizer, folder)
            manifest = convert_into(folder, ctx.out_dir, cfg.format, cfg.quantization)
    ctx.info["export"] = manifest
    ctx.log(f"{cfg.model}: {manifest['model_type']}, {manifest['params']:,} parameters -> {cfg.format} "
            f"{cfg.quantization}, {manifest['weights_mb']:.1f} MB")
