"""`cache_logits`: run a teacher once over training targets and store its top-k log-probabilities, so
`distill` with `cached_teacher:` trains without loading the teacher.

On disk (all memory-mapped .npy, read lazily by the collator):
    examples/            datasets folder: source_ids, target_ids of every cached example, in order
    offsets.npy          [N + 1] int64: example i's tokens are rows offsets[i]:offsets[i+1]
    topk_ids.npy         [tokens, k] int32 teacher vocabulary ids, most likely first
    topk_logprobs.npy    [tokens, k] fp16/fp32 log-probabilities at temperature 1 (log_softmax of the logits)
    manifest.json        teacher fingerprint, tokenizer hash, k, dtype, data fingerprint, counts
The mass outside the top-k is not stored; `distill` handles it by `cache_tail` (renormalize over the k
ids, or one "everything else" bucket) — see `losses.sparse_kd_loss`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import collate, encode
from ..models import forward_on_targets, is_causal
from ..runner import data_fingerprint
from .pseudo_targets import encode_pseudo_targets


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


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
    if acc.is_main_process:
        datasets.Dataset.from_list(examples).save_to_disk(str(out / "examples"))
        np.save(out / "offsets.npy", offsets)
        ids = np.lib.format.open_memmap(out / "topk_ids.npy", mode="w+", dtype=np.int32, shape=(int(offsets[-1]), k))
        logprobs = np.lib.format.open_memmap(out / "topk_logprobs.npy", mode="w+", dtype=np_dtype,
                                             shape=(int(offsets[-1]), k))
    acc.wait_for_everyone()
    if not acc.is_main_process:
        ids = np.load(out / "topk_ids.npy", mmap_mode="r+")
        logprobs = np.load(out / "topk_logprobs.npy", mmap_mode="r+")
    pad_id = tokenizer.pad_token_id
    batches = [list(range(i, min(i + cfg.batch_size, len(examples)))) for i in range(0, len(examples), cfg.batch_size)]
    mine = [b for j, b in enumerate(batches) if j % acc.num_processes == acc.process_index]
    for rows in tqdm(mine, desc="cache teacher", disable=not acc.is_main_process):
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
        "teacher_fingerprint": ctx.runner.reference_fingerprint(cfg.teacher, ctx.stage.index),
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


class LogitCache:
    """Read side of a cache folder: examples, and the top-k rows of any example (memory-mapped)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.examples = datasets.load_from_disk(str(folder / "examples"))
        self.offsets = np.load(folder / "offsets.npy")
        self.ids = np.load(folder / "topk_ids.npy", mmap_mode="r")
        self.logprobs = np.load(folder / "topk_logprobs.npy", mmap_mode="r")

    def check(self, tokenizer, data_fp: str, where: str) -> None:
        # soft targets of an API teacher (`alignment.write_soft_targets`) carry their own (source, PT) pairs
        soft = self.manifest.get("kind") == "soft_targets"
        if self.manifest["tokenizer"] != tokenizer_hash(tokenizer):
            fix = ("set that pseudo_targets stage's align_to: to this student" if soft else
                   "re-run cache_logits with the student's teacher, or give the student tokenizer_from: the teacher")
            raise ValueError(f"{where}: the cache was made with another tokenizer ({self.manifest['vocab_size']} "
                             f"tokens) than the student's ({len(tokenizer)}); {fix}")
        if self.manifest.get("data_fingerprint") not in (None, data_fp):  # None: soft targets without one
            raise ValueError(f"{where}: the cache was made from other data than this recipe's; re-run cache_logits")

    def training_examples(self) -> list[dict]:
        """Every cached example, with its `kind` and `input` when the cache records them."""
        described = "kind" in self.examples.column_names
        return [{"source_ids": r["source_ids"], "target_ids": r["target_ids"], "cache_index": i,
                 **({"kind": r["kind"], "input": r["input"]} if described else {})}
                for i, r in enumerate(self.examples)]

    def collate(self, examples: list[dict], **collate_kwargs) -> dict:
        """`data.collate` plus teacher_topk_ids / teacher_topk_logprobs [B, T, k] (-1 ids where padded)."""
        batch = collate(examples, **collate_kwargs)
        t = batch["labels"].shape[1]
        k = self.ids.shape[1]
        ids = torch.full((len(examples), t, k), -1, dtype=torch.long)
        logprobs = torch.zeros((len(examples), t, k), dtype=torch.float32)
        for b, ex in enumerate(examples):
            i = ex["cache_index"]
            start, end = self.offsets[i], self.offsets[i + 1]
            ids[b, : end - start] = torch.from_numpy(np.array(self.ids[start:end], dtype=np.int64))
            logprobs[b, : end - start] = torch.from_numpy(np.array(self.logprobs[start:end], dtype=np.float32))
        batch["teacher_topk_ids"] = ids
        batch["teacher_topk_logprobs"] = logprobs
        return batch
