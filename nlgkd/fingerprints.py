"""Fingerprints: what a finished stage was made from, hashed, so a re-run knows what it can skip.

    data_fingerprint   the data config and the bytes of the split files a stage reads (`splits_read`)
    file_checksums     size and sha256 of every file a stage wrote (checked before a later stage reads them)
    tokenizer_hash     a tokenizer's vocabulary (a logit cache or soft targets fit only the same one)
    short_hash         any JSON-able value (configs, reference lists)
    BEHAVIOUR          each stage kind's behaviour version (a finished stage of an older one runs again)
    without_added_defaults   a config as fingerprints hash it (fields added since, at their old behaviour, left out)
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from .config import SPLITS, DataConfig

from .recipe import to_dict

# stage kind -> (behaviour version, what changed in it). Raised when nlgkd changes what a stage of that kind makes
# from the same config and inputs, so a stage finished by the old code runs again and the re-run says why.
# Version 1 (every kind before versions existed) is left out of fingerprints: unchanged kinds keep theirs.
DECODING_AND_SEEDING = ("every decode follows its decoding block (top_k 0 is off, the checkpoint's generation "
                        "settings only where from_checkpoint names them, max_new_tokens defaults to "
                        "data.max_target_length); training seeds its random generators when it starts; a teacher "
                        "stops on validation (patience 3 unless set)")
BEHAVIOUR = {
    "finetune": (2, DECODING_AND_SEEDING),
    "distill": (2, DECODING_AND_SEEDING),
    "pseudo_targets": (2, DECODING_AND_SEEDING),
    "evaluate": (2, DECODING_AND_SEEDING),
}


def behaviour_version(kind: str) -> int:
    return BEHAVIOUR.get(kind, (1, ""))[0]


# Config fields added after stages were recorded, each with the default that is the behaviour from before it
# existed. At that default a field is left out of the fingerprint, so upgrading nlgkd does not retrain the
# stages it finished; set to anything else, it is hashed like every other field.
ADDED_FIELDS_AT_DEFAULT = {"engine": "transformers", "engine_quantization": "float32",
                           "joint_teaching.engine": "transformers", "joint_teaching.engine_refresh_every": 20,
                           "joint_teaching.engine_quantization": "float32", "group_by_length": False,
                           "validation_decoding": None, "joint_teaching.steps_per_draw": 1,
                           "joint_teaching.stop_share": 1.0, "joint_teaching.mix": "steps",
                           "decoding.early_stopping": True, "joint_teaching.decoding.early_stopping": True,
                           **{f"{block}.{name}": default for block in ("decoding", "joint_teaching.decoding")
                              for name, default in (("min_new_tokens", 0), ("repetition_penalty", 1.0),
                                                    ("forced_bos_token", None), ("from_checkpoint", []))}}
# Speed settings, never hashed (like the CPU thread count): they change the last digits of results at most, and
# switching one on or off should not retrain a finished stage
SPEED_ONLY_FIELDS = ("compile", "fused_adamw")


def without_added_defaults(config: dict) -> dict:
    """`config` (to_dict's) without the ADDED_FIELDS_AT_DEFAULT that hold their default and without the
    SPEED_ONLY_FIELDS."""
    config = {k: v for k, v in copy.deepcopy(config).items() if k not in SPEED_ONLY_FIELDS}
    for path, default in ADDED_FIELDS_AT_DEFAULT.items():
        *parents, leaf = path.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
    return config


def splits_read(kind: str, config) -> tuple[str, ...]:
    """The data splits a stage reads, as its config declares them (`splits_read` beside each stage kind's config
    in nlgkd/config.py), in SPLITS order; its fingerprint hashes these files and no others."""
    declared = getattr(config, "splits_read", None)
    found = declared() if declared is not None else set(SPLITS)  # a kind that declares none reads everything
    return tuple(s for s in SPLITS if s in found)


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
