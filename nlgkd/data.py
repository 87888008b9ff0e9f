"""Data: loading splits as (source, target) text, tokenizing them for a model, and collating batches.

Every split is a `datasets.Dataset` with a `source` column and, except `unlabeled`, a `target` column.
Batches have one shape for every model family (see `collate`):
    input_ids, attention_mask  [B, L]   the model's input (seq2seq: the source; causal: source+sep+target)
    labels                     [B, T]   target token ids, -100 on padding
    target_offsets             [B]      causal only: position of the first target token in input_ids
so losses can compare any two models position by position on the target tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from .data_files import template_fields
from .config import SPLITS, DataConfig, DataSource, RecipeError

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataReport:
    """What loading did to each split: sizes, dropped empty examples, truncations (filled in per model)."""

    sizes: dict[str, int] = field(default_factory=dict)
    dropped_empty: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)  # multi-task: split sizes per task


# ------------------------------------------------------------------------------------- loading
def load_splits(config: DataConfig, seed: int = 0) -> tuple[datasets.DatasetDict, DataReport]:
    """Load every configured split as text pairs; empty examples are dropped and counted (or an error).
    With `data.tasks`, each task is loaded the same way, its prefix put before its sources, and the splits
    concatenated with a `task` column naming each example's task."""
    if not config.tasks:
        result, report = _load_source(config, config, seed, "data")
    else:
        per_split: dict[str, list[datasets.Dataset]] = {}
        report = DataReport()
        for name, task in config.tasks.items():
            splits, task_report = _load_source(task, config, seed, f"data.tasks.{name}")
            report.tasks[name] = task_report.sizes
            for split, ds in splits.items():
                ds = ds.map(lambda row: {"source": task.prefix + row["source"], "task": name},
                            load_from_cache_file=False, keep_in_memory=True)
                per_split.setdefault(split, []).append(ds)
                report.dropped_empty[split] = report.dropped_empty.get(split, 0) + task_report.dropped_empty[split]
        result = {split: datasets.concatenate_datasets(parts) for split, parts in per_split.items()}
        report.sizes = {split: len(ds) for split, ds in result.items()}
    if "train" not in result and "unlabeled" not in result:
        raise RecipeError("data: no train split was loaded; set data.train, data.hub or data.task")
    return datasets.DatasetDict(result), report


def _load_source(source: DataSource, config: DataConfig, seed: int, where: str):
    """(split -> text pairs, report) of one dataset; `config` has the settings shared by all tasks."""
    if source.task == "demo":
        from .demo_task import make_demo_splits

        sizes = {s: getattr(source.demo, s) for s in SPLITS}
        raw = make_demo_splits(sizes, seed=seed)
        splits = {name: datasets.Dataset.from_list(rows) for name, rows in raw.items() if rows}
    elif source.hub is not None:
        splits = _load_hub(source, where)
    else:
        splits = {}
        for split in SPLITS:
            path = source.split_file(split, parent_dir=config.dir)
            if path is not None:
                splits[split] = _load_file(path, f"{where}.{split}")
    report = DataReport()
    result = {}
    for split, ds in splits.items():
        limit = source.max_examples.get(split)
        if limit is not None and len(ds) > limit:
            ds = ds.select(range(limit))
        ds, dropped = _to_pairs(ds, source, config.on_empty, split, where, config.max_dropped_share)
        report.sizes[split] = len(ds)
        report.dropped_empty[split] = dropped
        result[split] = ds
    return result, report


def _load_file(path: str, field_path: str) -> datasets.Dataset:
    file = Path(path)
    if file.is_dir():
        raise RecipeError(f"{field_path}: {path!r} is a folder; give the file of the split inside it")
    if not file.exists():
        raise RecipeError(f"{field_path}: file {path!r} not found (paths are relative to where you run nlgkd, "
                          "or to data.dir when the recipe sets it)")
    loader = FILE_LOADERS.get(file.suffix.lower())
    if loader is None:
        raise RecipeError(f"{field_path}: {path!r} has an unknown extension; use one of {list(FILE_LOADERS)}")
    if loader in ("json", "csv"):
        try:
            file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(
                f"{field_path}: {path!r} is not UTF-8 (byte {err.start}); re-encode it, e.g. "
                f"`iconv -f latin1 -t utf-8 {path} > fixed{file.suffix}`"
            ) from None
    if file.stat().st_size == 0:
        raise RecipeError(f"{field_path}: {path!r} is empty; give a file with one example per line (or row)")
    try:
        return datasets.load_dataset(loader, data_files=str(file), split="train")
    except Exception as err:  # datasets raises many kinds; the user needs the file, the line and the reason
        reason = first_bad_json_line(file) if loader == "json" else first_ragged_csv_line(file) if loader == "csv" \
            else None
        raise RecipeError(f"{field_path}: could not read {path!r}: {reason or str(err) or type(err).__name__}") \
            from None


def first_ragged_csv_line(file: Path) -> str | None:
    """'line N has K fields, the header M (...)' for the first CSV row whose field count differs from the header's."""
    import csv

    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                return (f"line {reader.line_num} has {len(row)} fields and the header {len(header)} ({header}); quote "
                        "fields that hold commas, e.g. \"a, b\"")
    return None


def first_bad_json_line(file: Path) -> str | None:
    """'line N is not JSON (...)' for the first line of a JSON-lines file that does not parse, else None."""
    import json

    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line.strip())
            except json.JSONDecodeError as err:
                if number == 1 and line.lstrip().startswith("["):
                    return None  # one JSON array, not JSON lines
                return f"line {number} is not JSON ({err.msg} at column {err.colno})"
    return None


def _load_hub(source: DataSource, where: str) -> dict[str, datasets.Dataset]:
    loaded = datasets.load_dataset(source.hub, source.hub_config)
    splits = {}
    for split in SPLITS:
        hub_split = source.hub_splits.get(split, split)
        if hub_split in loaded:
            splits[split] = loaded[hub_split]
    if "train" not in splits:
        raise RecipeError(
            f"{where}.hub: {source.hub!r} has splits {list(loaded)}; map one to train with {where}.hub_splits"
        )
    return splits


def render(template: str, row: dict) -> str:
    """The text a column or template gives for one row (a missing value: empty). A list or mapping cell is
    refused: its Python repr would be trained on as if it were text."""
    for name in template_fields(template):
        if isinstance(row.get(name), (list, dict)):
            raise ValueError(f"column {name!r} holds a {type(row[name]).__name__}, not text "
                             f"({str(row[name])[:60]}); choose a text column, or flatten it into one")
    if "{" not in template:
        value = row[template]
        return "" if value is None else str(value)
    return template.format_map({k: "" if v is None else v for k, v in row.items()})


def _to_pairs(ds: datasets.Dataset, source: DataSource, on_empty: str, split: str,
              where: str = "data", max_dropped_share: float = 1.0) -> tuple[datasets.Dataset, int]:
    """Map columns to source/target text; drop (and count) or reject examples with empty text."""
    needs_target = split != "unlabeled"
    specs = {"source": source.source}
    if needs_target:
        specs["target"] = source.target
    for role, spec in specs.items():
        for column in template_fields(spec):
            if column not in ds.column_names:
                raise RecipeError(
                    f"{where}.{role}: column {column!r} is not in the {split} split; its columns are {ds.column_names}"
                )
    rows = []
    dropped, first_dropped = 0, None
    for i, row in enumerate(ds):
        try:
            pair = {role: render(spec, row).strip() for role, spec in specs.items()}
        except ValueError as err:
            raise RecipeError(f"{where}.source/target: {split} example {i}: {err}") from None
        empty = [role for role, text in pair.items() if not text]
        if empty:
            if on_empty == "error":
                raise RecipeError(
                    f"{where}: {split} example {i} has an empty {empty[0]}; fix the data or set data.on_empty: drop"
                )
            dropped += 1
            first_dropped = first_dropped or (i, empty[0])
            continue
        rows.append(pair)
    if not rows:
        raise RecipeError(f"{where}: the {split} split has no usable examples ({dropped} empty ones dropped)")
    if dropped and dropped / len(ds) > max_dropped_share:
        raise RecipeError(f"{where}: {dropped} of {len(ds)} {split} examples ({dropped / len(ds):.0%}) have an empty "
                          f"source or target (the first: example {first_dropped[0]}, its {first_dropped[1]}), more "
                          f"than data.max_dropped_share {max_dropped_share:.0%}; check {where}.source / .target "
                          "and the file, or raise max_dropped_share")
    return datasets.Dataset.from_list(rows), dropped


def task_mixture(examples: list[dict], weights: dict[str, float | None], seed: int, epoch: int) -> list[dict]:
    """One epoch of multi-task training examples, drawn by the tasks' sampling weights (MT-DNN).

    The epoch keeps the total size N; task t contributes round(N * w_t / sum(w)) examples, where a task
    without a weight counts with its own size (so all-None weights give the plain concatenation). A task
    walks through a seeded permutation of its examples, repeated when it must give more than it has, so
    every example is seen before any repeats. Pure in (seed, epoch): resumes and processes agree.
    """
    by_task: dict[str, list[dict]] = {}
    for ex in examples:
        by_task.setdefault(ex["task"], []).append(ex)
    if all(weights.get(t) is None for t in by_task):
        return list(examples)
    effective = {t: weights.get(t) if weights.get(t) is not None else float(len(rows)) for t, rows in by_task.items()}
    total_weight = sum(effective.values())
    rng = random.Random(seed * 1_000_003 + epoch)
    mixed = []
    for task in sorted(by_task):
        rows = by_task[task]
        want = round(len(examples) * effective[task] / total_weight)
        order: list[int] = []
        while len(order) < want:
            order += rng.sample(range(len(rows)), len(rows))
        mixed += [rows[i] for i in order[:want]]
    rng.shuffle(mixed)
    return mixed


# ---------------------------------------------------------------------------------- tokenizing
def truncate(ids: list[int], max_length: int | None) -> list[int]:
    """nlgkd's one truncation rule, for every source and target wherever it is tokenized (training data,
    pseudo-target scores, soft targets, the server): `ids` end in their closing token (a source's </s>, a
    target's EOS); longer than `max_length`, they keep their first max_length - 1 tokens and that closing one.
    None: no limit."""
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[: max_length - 1] + [ids[-1]]


def encode(
    ds: datasets.Dataset, tokenizer, max_source_length: int, max_target_length: int
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Token ids for each example: `source_ids` (with the tokenizer's special tokens) and `target_ids`
    (ending in EOS). Returns the dataset and how many sources/targets were truncated."""
    has_target = "target" in ds.column_names
    eos = tokenizer.eos_token_id
    truncated = {"source": 0, "target": 0}

    def one(batch):
        src = tokenizer(batch["source"], add_special_tokens=True)["input_ids"]
        out = {"source_ids": []}
        for ids in src:
            kept = truncate(ids, max_source_length)
            truncated["source"] += len(kept) < len(ids)
            out["source_ids"].append(kept)
        if has_target:
            out["target_ids"] = []
            for ids in tokenizer(batch["target"], add_special_tokens=False)["input_ids"]:
                kept = truncate(ids + [eos], max_target_length)
                truncated["target"] += len(kept) < len(ids) + 1
                out["target_ids"].append(kept)
        return out

    encoded = ds.map(one, batched=True, load_from_cache_file=False, keep_in_memory=True)
    return encoded, truncated


# ---------------------------------------------------------------------------------- collating
def collate(examples: list[dict], pad_id: int, causal: bool, sep_id: int | None = None,
            tasks: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Batch tokenized examples (see module docstring for the shapes). Right padding for training.
    With `tasks` (multi-task data) the batch also has `task_index` [B]: each example's position in `tasks`.
    An example with `ignore: True` keeps every label at -100 (it pads a batch and teaches nothing)."""
    targets = [ex["target_ids"] for ex in examples]
    width = max(len(t) for t in targets)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        if not examples[i].get("ignore"):  # a filler row (nlgkd/loop.py: epoch_loader): no label counts
            labels[i, : len(t)] = torch.tensor(t)
    if not causal:
        input_ids, attention_mask = pad([ex["source_ids"] for ex in examples], pad_id, left=False)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    else:
        prompts = [causal_prompt(ex["source_ids"], sep_id) for ex in examples]
        input_ids, attention_mask = pad([p + t for p, t in zip(prompts, targets)], pad_id, left=False)
        offsets = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "target_offsets": offsets}
    if tasks:
        batch["task_index"] = torch.tensor([tasks.index(ex["task"]) for ex in examples], dtype=torch.long)
    return batch


def causal_prompt(source_ids: list[int], sep_id: int | None) -> list[int]:
    """Decoder-only models read `source + separator` and continue with the target."""
    return list(source_ids) + ([sep_id] if sep_id is not None else [])


def pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if left:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask

