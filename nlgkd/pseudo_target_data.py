"""The pseudo-target dataset that `pseudo_targets` stages write and `distill` / `cache_logits` read: its
inputs (`collect_inputs`), its rows, reading it back, and the examples a stage logs.

The artifact is `dataset/` (`datasets.Dataset.save_to_disk`; read it with `load_pseudo_targets`), one row
per kept pseudo-target:
    source       the input text
    pt           the pseudo-target text
    pt_index     0..n-1: its number among the kept PTs of that input, in generation order
    origin       the split (train, unlabeled, ...) or augment stage the input came from
    input_index  the input's row within its origin (after the max_examples cap)
    teacher      the teacher's recipe name
    decoding     the decoding strategy
    score        mean log-probability per token (EOS included) of the PT under the teacher, teacher-forced
                 on the PT as the student will see it (re-tokenized, truncated to data.max_target_length);
                 one forward pass per batch, about a tenth of the generation time on the tiny demo teacher
                 (`score_seconds` in stage.json); null only for empty outputs, which are dropped
Empty outputs are dropped and counted; with `decoding.dedup`, so are repeats of an earlier PT of the same
input.
"""
from __future__ import annotations

from pathlib import Path

import datasets

from .data import encode

EXAMPLES_IN_LOG = 3


def load_pseudo_targets(folder: str | Path) -> datasets.Dataset:
    """The PT dataset of a finished pseudo_targets stage (its folder, e.g. `ctx.artifact_dir(name)`)."""
    path = Path(folder) / "dataset"
    if not path.exists():
        raise ValueError(f"{folder} has no pseudo-target dataset ({path} is missing); run its pseudo_targets stage")
    return datasets.load_from_disk(str(path))


def encode_pseudo_targets(folder: str | Path, tokenizer, data_cfg) -> datasets.Dataset:
    """A finished stage's PTs tokenized as training examples (the PT is the target), truncated like gold."""
    pts = load_pseudo_targets(folder).rename_column("pt", "target")
    encoded, _ = encode(pts, tokenizer, data_cfg.max_source_length, data_cfg.max_target_length)
    return encoded


def load_augmented(folder: str | Path) -> datasets.Dataset:
    """The inputs an augment stage made (see `nlgkd/stages/augment.py`)."""
    path = Path(folder) / "dataset"
    if not path.exists():
        raise ValueError(f"{folder} has no augmented dataset ({path} is missing); run its augment stage")
    return datasets.load_from_disk(str(path))


# ------------------------------------------------------------------------------------------ inputs
def collect_inputs(ctx) -> list[dict]:
    """[{source, origin, input_index}] from the configured splits, then the augment stages."""
    cfg = ctx.config
    if not cfg.inputs and not cfg.augmented:
        raise ValueError("inputs and augmented are both empty; list splits in inputs (e.g. [train, unlabeled]) "
                         "or augment stages in augmented")
    sources: list[tuple[str, datasets.Dataset]] = []
    if cfg.inputs:
        data = ctx.data()
        for split in cfg.inputs:
            if split not in data:
                raise ValueError(f"inputs: split {split!r} is not in the data (have {sorted(data)}); "
                                 "remove it from inputs or configure it under data:")
            sources.append((split, data[split]))
    for name in cfg.augmented:
        sources.append((name, load_augmented(ctx.artifact_dir(name))))
    rows = []
    for origin, ds in sources:
        texts = list(ds["source"])
        # multi-task data: a PT keeps its input's task, so distill can pick that task's teachers
        tasks = list(ds["task"]) if "task" in ds.column_names else [""] * len(texts)
        if cfg.max_examples is not None:
            texts = texts[: cfg.max_examples]
        # the data loader drops empty sources; augmented ones are checked here
        rows += [{"source": t, "origin": origin, "input_index": i, "task": tasks[i]}
                 for i, t in enumerate(texts) if t.strip()]
    if not rows:
        raise ValueError(f"no inputs: {cfg.inputs + cfg.augmented} give no non-empty sources")
    return rows


FEATURES = datasets.Features({
    "source": datasets.Value("string"),
    "pt": datasets.Value("string"),
    "pt_index": datasets.Value("int32"),
    "origin": datasets.Value("string"),
    "input_index": datasets.Value("int64"),
    "teacher": datasets.Value("string"),
    "decoding": datasets.Value("string"),
    "score": datasets.Value("float32"),
    "task": datasets.Value("string"),  # multi-task data: the input's task ("" otherwise)
})


def build_rows(inputs, outputs, scores, teacher: str, strategy: str, dedup: bool) -> tuple[list[dict], int, int]:
    """Dataset rows of the kept PTs; and how many empty and duplicate outputs were dropped."""
    rows, empty, duplicates = [], 0, 0
    for item, texts, text_scores in zip(inputs, outputs, scores):
        seen = set()
        kept = 0
        for text, score in zip(texts, text_scores):
            if not text:
                empty += 1
                continue
            if dedup and text in seen:
                duplicates += 1
                continue
            seen.add(text)
            rows.append({"source": item["source"], "pt": text, "pt_index": kept, "origin": item["origin"],
                         "input_index": item["input_index"], "teacher": teacher, "decoding": strategy,
                         "score": score, "task": item.get("task", "")})
            kept += 1
    return rows, empty, duplicates


def log_examples(ctx, inputs, outputs) -> None:
    for item, texts in list(zip(inputs, outputs))[:EXAMPLES_IN_LOG]:
        shown = "\n".join(f"      pt: {t!r}" for t in texts[:3])
        ctx.log(f"example ({item['origin']} #{item['input_index']})\n    source: {item['source']!r}\n{shown}")
