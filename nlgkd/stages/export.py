"""`export`: a model converted for an inference engine (CTranslate2), in the stage's folder; later evaluate
stages score it beside PyTorch models and `nlgkd serve` serves the folder (nlgkd/export.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..export import convert_into
from ..models import save_model


def run(ctx) -> None:
    cfg = ctx.config
    if not ctx.accelerator.is_main_process:
        return
    manifest = convert_named(ctx, cfg.model, ctx.out_dir, cfg.format, cfg.quantization)
    ctx.info["export"] = manifest
    ctx.log(f"{cfg.model}: {manifest['model_type']}, {manifest['params']:,} parameters -> {cfg.format} "
            f"{cfg.quantization}, {manifest['weights_mb']:.1f} MB")


def convert_named(ctx, name: str, folder: Path, fmt: str, quantization: str) -> dict:
    """Convert the model the recipe calls `name` into the existing `folder`; the manifest. An earlier stage's
    folder converts as it is; a models: entry (a hub name, a fresh model) is saved as a folder first."""
    kind, _ = ctx.recipe.resolve(name, before=ctx.stage.index)
    if kind == "stage":
        return convert_into(ctx.artifact_dir(name), folder, fmt, quantization)
    model, tokenizer = ctx.load_model(name)
    with tempfile.TemporaryDirectory() as saved:
        save_model(model, tokenizer, saved)
        return convert_into(saved, folder, fmt, quantization)
