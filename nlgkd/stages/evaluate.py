"""`evaluate`: decode a split with each model and compare quality, size and speed in one table."""
from __future__ import annotations

import json
import statistics
import time

import torch

from ..data import encode
from ..generation import effective_settings, generate, length_buckets
from ..metrics import PeakMemory, format_table, text_metrics
from ..recipe import to_dict

TABLE_COLUMNS = ["model", "backend", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "pred_len", "params", "weights_mb",
                 "latency_ms", "latency_spread", "seq_per_s", "peak_mem_mb"]


def load_for_decoding(ctx, name: str):
    """(model, tokenizer, size facts) for a stage or models: entry: a PyTorch model on the stage's device, or an
    inference engine's export (an `export` stage, nlgkd/export.py) decoded by that engine."""
    from ..engine import EngineModel, is_export

    kind, _ = ctx.recipe.resolve(name, ctx.stage.index)
    if kind == "stage" and is_export(ctx.artifact_dir(name)):
        engine = EngineModel(ctx.artifact_dir(name), device=ctx.accelerator.device.type)
        return engine, engine.tokenizer, {"params": engine.manifest["params"],
                                          "weights_mb": engine.manifest["weights_mb"], "backend": engine.backend}
    model, tokenizer = ctx.load_model(name)
    model.to(ctx.accelerator.device).eval()
    # the model's own bytes (weights and buffers, tied ones once): comparable across models on any device
    weights = sum({t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values())
    return model, tokenizer, {"params": model.num_parameters(), "weights_mb": weights / 2**20, "backend": "pytorch"}


def timed_pass(model, tokenizer, sources, decoding, acc, seed: int) -> float:
    """Seconds of one generation pass over `sources` (synchronized on CUDA); the outputs are dropped."""
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    generate(model, tokenizer, sources, decoding, acc, seed=seed, progress=False)
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def speed(ctx, model, tokenizer, sources: list[list[int]], scored_seconds: float) -> dict:
    """Latency per batch and sequences/s: the median of `timing_passes` timed passes over the same batches
    (the first `timing_examples` inputs), after the scored pass warmed the model up; `latency_spread` is
    (slowest - fastest) / median of those passes, so a reader sees how far one figure can be trusted. With
    timing_passes: 0, the scored pass alone (spread unknown)."""
    cfg, acc = ctx.config, ctx.accelerator
    if cfg.timing_passes:
        timed = sources[: cfg.timing_examples] if cfg.timing_examples else sources
        seconds = [timed_pass(model, tokenizer, timed, cfg.decoding, acc, ctx.seed) for _ in range(cfg.timing_passes)]
    else:
        timed, seconds = sources, [scored_seconds]
    num_batches = len(length_buckets([len(s) for s in timed], cfg.decoding.batch_size))
    middle = statistics.median(seconds)
    return {
        # per batch of one process: the processes decode their shares of the batches at the same time
        "latency_ms": 1000 * middle / max(1, num_batches) * acc.num_processes,
        "latency_spread": (max(seconds) - min(seconds)) / middle if len(seconds) > 1 and middle else None,
        "seq_per_s": len(timed) / middle,
        "timing": {"passes": len(seconds), "examples": len(timed), "batches": num_batches,
                   "seconds": [round(s, 6) for s in seconds]},
    }


def evaluate_model(ctx, name: str) -> tuple[dict, list[dict]]:
    """Metrics and per-example predictions of one model on the configured split."""
    cfg = ctx.config
    acc = ctx.accelerator
    data = ctx.data()
    if cfg.split not in data:
        raise ValueError(f"stage {ctx.stage.name!r}: split {cfg.split!r} is not in the data "
                         f"(have {sorted(data)}); set split: to one of them")
    split = data[cfg.split]
    if cfg.max_examples is not None:
        split = split.select(range(min(cfg.max_examples, len(split))))
    model, tokenizer, size = load_for_decoding(ctx, name)
    encoded, _ = encode(split, tokenizer, ctx.recipe.data.max_source_length, ctx.recipe.data.max_target_length)
    sources = list(encoded["source_ids"])
    with PeakMemory(acc.device) as memory:  # reset per model: on CUDA its tensors, on a CPU the process's RSS
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = generate(model, tokenizer, sources, cfg.decoding, acc, seed=ctx.seed, desc=f"evaluate {name}")
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        timing = speed(ctx, model, tokenizer, sources, elapsed)
    predictions = [o[0] if o else "" for o in outputs]
    references = list(split["target"])
    metrics = text_metrics(predictions, references)
    metrics.update(
        **size,
        **timing,
        peak_mem_mb=memory.peak_mb,
        peak_mem_kind=memory.kind,  # cuda_max_allocated, cpu_peak_rss: while this model ran; cpu_max_rss: lifetime
        examples=len(sources),
        split=cfg.split,
        decoding=cfg.decoding.strategy,
        # every setting that changes the outputs (not batch_size): the report takes a teacher row from another
        # evaluate stage as the "% teacher" reference only when these match
        decoding_settings={k: v for k, v in to_dict(cfg.decoding).items() if k != "batch_size"},
        # what the decode of this model ran with (its GenerationConfig, or the engine's options)
        generation_settings=effective_settings(cfg.decoding, model, tokenizer),
        # mean token counts, for the report's FLOPs-per-generated-token estimate
        source_tokens=sum(map(len, sources)) / max(1, len(sources)),
        output_tokens=sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in predictions)
        / max(1, len(predictions)),  # + 1: the end-of-sequence token is generated too
    )
    kind, target = ctx.recipe.resolve(name, ctx.stage.index)
    if kind == "stage" and target.variant:  # the report groups rows by the stage whose variants they are
        metrics.update(variant=target.variant, variant_of=target.varied)
    rows = [{"source": s, "reference": r, "prediction": p, "outputs": o}
            for s, r, p, o in zip(split["source"], references, predictions, outputs)]
    del model
    return metrics, rows


def baseline_rows(ctx) -> dict[str, tuple[dict, list[dict]]]:
    """name -> (metrics, predictions) of the trivial baselines on the evaluated split (nlgkd/teacher_check.py)."""
    from ..teacher_check import baseline_predictions, raw_sources

    data = ctx.data()
    split = data[ctx.config.split]
    if ctx.config.max_examples is not None:
        split = split.select(range(min(ctx.config.max_examples, len(split))))
    train_targets = list(data["train"]["target"]) if "train" in data else []
    sources, references = raw_sources(split, ctx.recipe.data.tasks), list(split["target"])
    found = {}
    for name, predictions in baseline_predictions(sources, train_targets).items():
        metrics = text_metrics(predictions, references)
        metrics.update(examples=len(sources), split=ctx.config.split, decoding="baseline")
        rows = [{"source": s, "reference": r, "prediction": p} for s, r, p in zip(sources, references, predictions)]
        found[name] = (metrics, rows)
    return found


def run(ctx) -> None:
    results = {}

    def record(name: str, metrics: dict, rows: list[dict]) -> None:
        results[name] = metrics
        if ctx.accelerator.is_main_process:
            folder = ctx.out_dir / "predictions"
            folder.mkdir(exist_ok=True)
            with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        speed = f", {metrics['seq_per_s']:.1f} seq/s" if "seq_per_s" in metrics else " (a trivial baseline)"
        ctx.log(f"{name}: BLEU {metrics['bleu']:.2f}, chrF {metrics['chrf']:.2f}{speed}")

    for name in ctx.config.models:
        record(name, *evaluate_model(ctx, name))
    if ctx.config.baselines:
        for name, (metrics, rows) in baseline_rows(ctx).items():
            record(name, metrics, rows)
    if ctx.accelerator.is_main_process:
        (ctx.out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        table = [{"model": name, **m} for name, m in results.items()]
        ctx.accelerator.print(format_table(table, TABLE_COLUMNS))
    ctx.info["metrics"] = results
