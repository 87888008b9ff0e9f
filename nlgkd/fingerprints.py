"""Fingerprints: what a finished stage was made from, hashed, so a re-run knows what it can skip.

    data_fingerprint   the data config and the bytes of the split files a stage reads
    file_checksums     size and sha256 of every file a stage wrote (checked before a later stage reads them)
    tokenizer_hash     a tokenizer's vocabulary (a logit cache or soft targets fit only the same one)
    short_hash         any JSON-able value (configs, reference lists)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import SPLITS, DataConfig

from .recipe import to_dict


def file_checksums(folder: Path, only=None) -> dict[str, dict]:
    """relative path -> {bytes, sha256} of every file of a finished stage's folder but its stage.json (or of
    the relative paths in `only`, where they exist)."""
    found = {}
    paths = (folder.rglob("*") if only is None else (folder / name for name in only))
    for path in sorted(p for p in paths if p.is_file() and p.name != "stage.json"):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return found


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(config: DataConfig, seed: int, splits=SPLITS) -> str:
    """Hash of the data config and the bytes of the local files of `splits` (default: all of them). Where the
    files live (`data.dir`) is left out: the bytes are hashed, so the same files moved elsewhere keep finished
    stages; so are the other splits' files, so adding an unlabeled file does not redo a teacher."""
    described = to_dict(config)
    for source in [described, *described.get("tasks", {}).values()]:
        source.pop("dir", None)
        for split in set(SPLITS) - set(splits):
            source.pop(split, None)
            source.get("max_examples", {}).pop(split, None)
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    h.update(str(seed).encode())
    for source in [config, *config.tasks.values()]:
        for split in splits:
            path = source.split_file(split, parent_dir=config.dir)
            if not (path and Path(path).exists()):
                continue
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
