"""`pseudo_targets`: a teacher writes K outputs per input, the training data of sequence-level KD (study
stages S4-S7).

Inputs are the sources of the splits in `inputs` and of the augment stages in `augmented`, in that order,
each capped at `max_examples`. Generation is `nlgkd.generation.generate`: length-bucketed batches, sharded
over processes, batch j seeded with seed + j when sampling, so the output does not depend on the process
count.

Nothing generated is lost to a crash. The batches are fixed by the inputs and `decoding.batch_size`, so a
batch number names the same inputs in every run of the stage. Each process keeps the batches it made and,
every `save_every` batches, writes them to `parts/part-<first batch>-<last batch>.json` (temp file +
rename, so a part file is whole or absent). A re-run with the same fingerprint finds the runner's
`.NAME.partial` folder, reads the part files back and passes them as `generate(done=...)`, which makes only
the missing batches; since batch j is always seeded with seed + j, the result equals an uninterrupted run.
The part files are removed once the final dataset is written.

With `engine: ctranslate2` a CTranslate2 copy of the teacher (converted into the stage's folder as `engine/`,
`engine_quantization` float32 by default; a teacher that is an export stage is used as it is) decodes and scores
instead of PyTorch, through the same `generate`, batches, seeds and part files. What repeats: float32 greedy and
beam PTs are the PyTorch teacher's (ties apart), and their scores agree to 1e-4; sampled ones are CTranslate2's
own draws, the same for a given seed on one machine whatever the process count or a resume (`EngineModel`
samples each batch from a freshly seeded engine), but not PyTorch's draws.

The artifact, `dataset/`, and reading it back: `nlgkd/pseudo_target_data.py`. With `teacher_api:` an LLM
behind an OpenAI-compatible API writes the same dataset (`nlgkd/stages/pseudo_targets_api.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import datasets
import torch

from ..data import collate, encode, truncate
from ..generation import effective_settings, gather_objects, generate, length_buckets
from ..models import is_causal, target_logits
from ..pseudo_target_data import FEATURES, build_rows, collect_inputs, log_examples
from .pseudo_targets_api import dry_run as dry_run_api, run as run_api

# ------------------------------------------------------------------------------------------ scoring
@torch.inference_mode()
def mean_logprobs(model, tokenizer, source_ids: list[list[int]], texts: list[str], max_target_length: int,
                  chunk: int) -> list[float | None]:
    """Mean token log-probability of each text as the target of its source, under `model`; None for ''."""
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad_id = eos if pad_id is None else pad_id
    device = next(model.parameters()).device
    scores: list[float | None] = [None] * len(texts)
    todo = [i for i, t in enumerate(texts) if t]
    targets = tokenizer([texts[i] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
    examples = [{"source_ids": source_ids[i], "target_ids": truncate(ids + [eos], max_target_length)}
                for i, ids in zip(todo, targets)]
    for start in range(0, len(examples), chunk):
        batch = collate(examples[start : start + chunk], pad_id, causal=is_causal(model), sep_id=eos)
        batch = {k: v.to(device) for k, v in batch.items()}
        logprobs = torch.log_softmax(target_logits(model, batch).float(), dim=-1)
        labels = batch["labels"]
        mask = labels != -100
        picked = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
        means = picked.sum(1) / mask.sum(1)
        for i, value in zip(todo[start : start + chunk], means.tolist()):
            scores[i] = value
    return scores


# -------------------------------------------------------------------------------------- part files
def write_part(folder: Path, batches: dict[int, dict]) -> None:
    """One part file with `batches` (batch index -> indices, outputs, scores), written atomically."""
    first, last = min(batches), max(batches)
    path = folder / f"part-{first:06d}-{last:06d}.json"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({str(j): b for j, b in batches.items()}, ensure_ascii=False))
    os.replace(tmp, path)


def read_parts(folder: Path, batches: list[list[int]]) -> dict[int, dict]:
    """Batches finished by an earlier run, keeping only those whose inputs are the batch's inputs now."""
    found = {}
    for path in sorted(folder.glob("part-*.json")):
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # unreadable: its batches are made again
        for key, batch in part.items():
            j = int(key)
            if j < len(batches) and batch["indices"] == batches[j]:
                found[j] = batch
    return found


# -------------------------------------------------------------------------------------------- stage
def run(ctx) -> None:
    cfg = ctx.config
    if cfg.teacher_api is not None:  # an LLM behind an OpenAI-compatible API
        return run_api(ctx)
    acc = ctx.accelerator
    inputs = collect_inputs(ctx)
    if cfg.engine == "ctranslate2":
        model = engine_teacher(ctx)
        tokenizer = model.tokenizer
    else:
        model, tokenizer = ctx.load_model(cfg.teacher)
        model.to(acc.device).eval()
    data_cfg = ctx.recipe.data
    encoded, truncated = encode(datasets.Dataset.from_list([{"source": r["source"]} for r in inputs]), tokenizer,
                                data_cfg.max_source_length, data_cfg.max_target_length)
    # duplicates are dropped in build_rows, after empty outputs, so that both are counted right
    decoding = dataclasses.replace(cfg.decoding, dedup=False)
    ctx.log(f"{len(inputs)} inputs x {decoding.num_return_sequences} outputs, {decoding.strategy} decoding")

    outputs, scores, stats = generate_with_parts(ctx, model, tokenizer, list(encoded["source_ids"]), decoding)
    rows, empty, duplicates = build_rows(inputs, outputs, scores, cfg.teacher, decoding.strategy, cfg.decoding.dedup)
    if not rows:
        raise ValueError(f"teacher {cfg.teacher!r} wrote only empty outputs for {len(inputs)} inputs; train it "
                         "longer, or check decoding (max_new_tokens, no_repeat_ngram_size)")
    if acc.is_main_process:
        target = ctx.out_dir / "dataset"
        shutil.rmtree(target, ignore_errors=True)  # left by a run killed while saving
        datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(target))
        shutil.rmtree(ctx.out_dir / "parts")
        shutil.rmtree(ctx.out_dir / ENGINE_COPY, ignore_errors=True)  # the teacher's engine copy, if made here
    per_origin = {}
    for r in inputs:
        per_origin[r["origin"]] = per_origin.get(r["origin"], 0) + 1
    ctx.info["pseudo_targets"] = {
        "inputs": per_origin,
        "outputs_per_input": decoding.num_return_sequences,
        "generation_settings": effective_settings(decoding, model, tokenizer),
        "engine": "transformers" if isinstance(model, torch.nn.Module) else model.backend,
        "pts_written": len(rows),
        "empty_dropped": empty,
        "duplicates_dropped": duplicates,
        "truncated_sources": truncated["source"],
        **stats,
    }
    dropped = (f"{empty} empty and {duplicates} duplicate outputs dropped" if cfg.decoding.dedup else
               f"{empty} empty outputs dropped; duplicates kept, as decoding.dedup is off")
    ctx.log(f"wrote {len(rows)} pseudo-targets for {len(inputs)} inputs ({dropped}) in {stats['seconds']:.1f}s")
    log_examples(ctx, inputs, outputs)


ENGINE_COPY = "engine"  # the teacher's CTranslate2 copy, in the stage's folder while it runs


def engine_teacher(ctx):
    """The teacher as a CTranslate2 model (nlgkd/engine.py): the export stage it names, or a copy converted into
    the stage's folder (`engine/`; a resumed run finds it whole or converts again; removed with the part files)."""
    from ..engine import EngineModel, is_export
    from ..models import EXPORT_FILE
    from .export import convert_named

    cfg, acc = ctx.config, ctx.accelerator
    kind, _ = ctx.recipe.resolve(cfg.teacher, before=ctx.stage.index)
    source = ctx.artifact_dir(cfg.teacher) if kind == "stage" else None
    if source is not None and is_export(source):
        folder = source
        exported = json.loads((source / EXPORT_FILE).read_text())["quantization"]
        ctx.log(f"teacher {cfg.teacher!r} is a CTranslate2 {exported} export: it decodes as it is "
                f"(engine_quantization: {cfg.engine_quantization} is for a teacher the stage converts itself)")
    else:
        folder = ctx.out_dir / ENGINE_COPY

        def convert() -> None:
            if is_export(folder):  # a resumed run's whole copy
                return
            staging = ctx.out_dir / f".{ENGINE_COPY}.partial"  # renamed once whole: a kill leaves no half copy
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            manifest = convert_named(ctx, cfg.teacher, staging, "ctranslate2", cfg.engine_quantization)
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
            ctx.log(f"teacher {cfg.teacher!r} converted to CTranslate2 {cfg.engine_quantization} "
                    f"({manifest['weights_mb']:.1f} MB) for decoding")

        ctx.on_main_process(convert)
    return EngineModel(folder, device=acc.device.type, device_index=acc.device.index or 0, reseed_per_call=True)


def dry_run(ctx) -> None:
    """`nlgkd run --dry-run`: what the stage would ask an API teacher, and its estimated cost."""
    if ctx.config.teacher_api is not None:
        return dry_run_api(ctx)
    inputs = collect_inputs(ctx)
    ctx.log(f"dry run: {len(inputs)} inputs x {ctx.config.decoding.num_return_sequences} outputs from the local "
            f"teacher {ctx.config.teacher!r} (no API, no cost)")


def resumed_parts(ctx, parts, batches: list[list[int]]) -> dict[int, dict]:
    """Batch index -> what an earlier, killed run of the stage wrote for it (its parts folder), on every process."""
    acc = ctx.accelerator
    if acc.is_main_process:
        parts.mkdir(exist_ok=True)
    acc.wait_for_everyone()
    resumed = read_parts(parts, batches)
    acc.wait_for_everyone()  # every process has read the old parts before any new one appears
    if resumed:
        ctx.log(f"resuming: {len(resumed)} of {len(batches)} batches were written by an earlier run")
    return resumed


def generate_with_parts(ctx, model, tokenizer, source_ids, decoding):
    """K outputs and their scores per input, in input order, on every process; finished batches are read
    from and written to `ctx.out_dir / "parts"` (see the module docstring). Also returns counts for stage.json."""
    acc = ctx.accelerator
    k = decoding.num_return_sequences
    max_target_length = ctx.recipe.data.max_target_length
    batches = length_buckets([len(s) for s in source_ids], decoding.batch_size)
    parts = ctx.out_dir / "parts"
    resumed = resumed_parts(ctx, parts, batches)

    pending: dict[int, dict] = {}  # made here, not yet on disk
    made_scores: dict[int, list[list[float | None]]] = {}
    score_seconds = 0.0

    def flush() -> None:
        if pending:
            write_part(parts, pending)
            pending.clear()

    def on_batch(j: int, indices: list[int], outputs: list[list[str]]) -> None:
        nonlocal score_seconds
        started = time.perf_counter()
        flat = [text for texts in outputs for text in texts]
        flat_sources = [source_ids[i] for i in indices for _ in range(k)]
        chunk = max(1, decoding.batch_size)
        flat_scores = (mean_logprobs(model, tokenizer, flat_sources, flat, max_target_length, chunk)
                       if isinstance(model, torch.nn.Module) else
                       model.mean_logprobs(flat_sources, flat, max_target_length, chunk))
        scores = [flat_scores[n * k : (n + 1) * k] for n in range(len(indices))]
        score_seconds += time.perf_counter() - started
        made_scores[j] = scores
        pending[j] = {"indices": indices, "outputs": outputs, "scores": scores}
        if len(pending) >= ctx.config.save_every:
            flush()

    started = time.perf_counter()
    outputs = generate(model, tokenizer, source_ids, decoding, acc, seed=ctx.seed,
                       done={j: b["outputs"] for j, b in resumed.items()}, on_batch=on_batch,
                       desc=f"pseudo-targets {ctx.stage.name}")
    flush()
    acc.wait_for_everyone()  # every part file is written before the main process removes them
    elapsed = time.perf_counter() - started

    scores_by_batch = {j: b["scores"] for j, b in resumed.items()}
    for part in gather_objects(acc, made_scores):
        scores_by_batch.update(part)
    scores: list[list[float | None]] = [[] for _ in source_ids]  # in input order
    for j, indices in enumerate(batches):
        for i, s in zip(indices, scores_by_batch[j]):
            scores[i] = s
    made_sequences = sum(len(batch) for j, batch in enumerate(batches) if j not in resumed) * k
    stats = {
        "batches": len(batches),
        "resumed_batches": len(resumed),
        "made_batches": sum(gather_objects(acc, len(made_scores))),
        "seconds": round(elapsed, 2),  # generating, scoring and writing the batches made in this run
        "score_seconds": round(score_seconds, 2),  # of the main process
        "sequences_per_s": round(made_sequences / elapsed, 2) if elapsed > 0 else None,
    }
    return outputs, scores, stats
