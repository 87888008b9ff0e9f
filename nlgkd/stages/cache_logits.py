"""`cache_logits`: run a teacher once over training targets and store its top-k log-probabilities, so
`distill` with `cached_teacher:` trains without loading the teacher. The folder's format, and the reader
`distill` uses, are in `nlgkd/logit_cache.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch

from ..data import collate, encode
from ..progress import progress_bar
from ..pseudo_target_data import encode_pseudo_targets
from ..models import forward_on_targets, is_causal
from ..fingerprints import data_fingerprint, tokenizer_hash


def cached_examples(ctx, cfg, tokenizer) -> list[dict]:
    """The tokenized examples to cache: gold train targets, then every PT, in a fixed order. Each says its
    `kind` (gold or pt) and its `input`, so `distill` can apply its own `gold` and `pt_schedule` to the cache."""
    data_cfg = ctx.recipe.data
    examples = []
    if cfg.gold:
        train, _ = encode(ctx.data()["train"], tokenizer, data_cfg.max_source_length, data_cfg.max_target_length)
        examples += [{"source_ids": r["source_ids"], "target_ids": r["target_ids"], "kind": "gold",
                      "input": f"train/{i}"} for i, r in enumerate(train)]
    for name in cfg.pseudo_targets:
        pts = encode_pseudo_targets(ctx.artifact_dir(name), tokenizer, data_cfg)
        examples += [{"source_ids": r["source_ids"], "target_ids": r["target_ids"], "kind": "pt",
                      "input": f"{name}/{r['origin']}/{r['input_index']}"} for r in pts]
    if not examples:
        raise ValueError("nothing to cache: set gold: true or pseudo_targets: [a stage]")
    return examples


@torch.no_grad()
def run(ctx) -> None:
    cfg = ctx.config
    acc = ctx.accelerator
    teacher, tokenizer = ctx.load_model(cfg.teacher)
    teacher.to(acc.device).eval()
    examples = cached_examples(ctx, cfg, tokenizer)
    k = min(cfg.top_k, len(tokenizer))
    lengths = [len(e["target_ids"]) for e in examples]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    out = Path(ctx.out_dir)
    np_dtype = np.float16 if cfg.dtype == "fp16" else np.float32

    def create_files() -> None:  # the examples and the two arrays, which every process fills with its batches
        datasets.Dataset.from_list(examples).save_to_disk(str(out / "examples"))
        np.save(out / "offsets.npy", offsets)
        for name, dtype in (("topk_ids.npy", np.int32), ("topk_logprobs.npy", np_dtype)):
            np.lib.format.open_memmap(out / name, mode="w+", dtype=dtype, shape=(int(offsets[-1]), k)).flush()

    ctx.on_main_process(create_files)
    ids = np.load(out / "topk_ids.npy", mmap_mode="r+")
    logprobs = np.load(out / "topk_logprobs.npy", mmap_mode="r+")
    pad_id = tokenizer.pad_token_id
    batches = [list(range(i, min(i + cfg.batch_size, len(examples)))) for i in range(0, len(examples), cfg.batch_size)]
    mine = [b for j, b in enumerate(batches) if j % acc.num_processes == acc.process_index]
    for rows in progress_bar(iterable=mine, desc="cache teacher", disable=not acc.is_main_process):
        batch = collate([examples[i] for i in rows], pad_id=pad_id, causal=is_causal(teacher),
                        sep_id=tokenizer.eos_token_id)
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        logits, _ = forward_on_targets(teacher, batch)
        top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        for b, i in enumerate(rows):
            n = lengths[i]
            ids[offsets[i] : offsets[i + 1]] = top.indices[b, :n].cpu().numpy().astype(np.int32)
            logprobs[offsets[i] : offsets[i + 1]] = top.values[b, :n].cpu().numpy().astype(np_dtype)
    ids.flush()
    logprobs.flush()
    acc.wait_for_everyone()
    manifest = {
        "teacher": cfg.teacher,
        "teacher_fingerprint": ctx.reference_fingerprint(cfg.teacher),
        "tokenizer": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "k": k,
        "dtype": cfg.dtype,
        "data_fingerprint": data_fingerprint(ctx.recipe.data, ctx.recipe.seed),
        "pseudo_targets": list(cfg.pseudo_targets),
        "examples": len(examples),
        "tokens": int(offsets[-1]),
    }
    if acc.is_main_process:
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    ctx.info["cache"] = manifest
    ctx.log(f"cached top-{k} of {cfg.teacher!r} for {len(examples)} examples ({offsets[-1]} tokens)")
