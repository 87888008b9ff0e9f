"""The logit-cache format: a teacher's top-k log-probabilities of every target token, memory-mapped.

Written by the `cache_logits` stage (and, as soft targets, by `alignment.write_soft_targets`); read here by
`distill` with `cached_teacher:` or an API teacher's soft targets. On disk:
    examples/            datasets folder: source_ids, target_ids of every cached example, in order
    offsets.npy          [N + 1] int64: example i's tokens are rows offsets[i]:offsets[i+1]
    topk_ids.npy         [tokens, k] int32 teacher vocabulary ids, most likely first
    topk_logprobs.npy    [tokens, k] fp16/fp32 log-probabilities at temperature 1 (log_softmax of the logits)
    manifest.json        teacher fingerprint, tokenizer hash, k, dtype, data fingerprint, counts
The mass outside the top-k is not stored; `distill` handles it by `cache_tail` (renormalize over the k
ids, or one "everything else" bucket) — see `losses.sparse_kd_loss`.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch

from .data import collate
from .fingerprints import tokenizer_hash


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
