"""What `nlgkd validate` (and `nlgkd run --dry-run`) check in the data files before anything runs: each split's
file exists, can be read, and has the columns the recipe's `source` / `target` read. Only the first row is
read, with the standard library (pyarrow for parquet), so it takes a moment and imports no torch or datasets.
"""
from __future__ import annotations

import csv
import difflib
import functools
import json
import string
from pathlib import Path

from .config import SPLITS, DataConfig

READABLE = (".jsonl", ".json", ".csv", ".parquet")  # the extensions nlgkd/data.py loads


@functools.lru_cache(maxsize=64)  # read for every row of a split (data.render refuses list cells by it)
def template_fields(template: str) -> tuple[str, ...]:
    """Columns a field spec reads: a plain column name, or the {names} of a template."""
    if "{" not in template:
        return (template,)
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def first_row_columns(path: Path) -> list[str] | None:
    """The column names of a data file's first row (None: the file has no rows)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet

        return list(pyarrow.parquet.read_schema(path).names)
    with open(path, encoding="utf-8-sig", newline="") as f:  # a byte-order mark is read past, as `datasets` does
        if suffix == ".csv":
            return next(csv.reader(f), None)
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if line.lstrip().startswith("["):  # a .json file holding one array
                f.seek(0)
                rows = json.load(f)
                return list(rows[0]) if rows else None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number} is not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"line {number} is not a JSON object with named fields")
            return list(row)
    return None


def data_problems(config: DataConfig) -> list[str]:
    """One line per problem of the recipe's data files, naming the field, the file and what it holds."""
    datasets = [(f"data.tasks.{name}", task) for name, task in config.tasks.items()] or [("data", config)]
    problems = []
    for where, source in datasets:
        if source.task is not None or source.hub is not None:
            continue
        for split in SPLITS:
            name = source.split_file(split, parent_dir=config.dir)
            if name is None:
                continue
            path = Path(name)
            if not path.is_file():
                what = "is a folder, not a file" if path.is_dir() else "not found"
                problems.append(f"{where}.{split}: {name!r} {what} (paths are relative to where you run nlgkd, "
                                "or to data.dir)")
                continue
            if path.suffix.lower() not in READABLE:
                problems.append(f"{where}.{split}: {name!r} has an unknown extension; use one of {list(READABLE)}")
                continue
            try:
                columns = first_row_columns(path)
            except (OSError, ValueError, UnicodeDecodeError) as err:
                problems.append(f"{where}.{split}: cannot read {name!r}: {err}")
                continue
            if not columns:
                problems.append(f"{where}.{split}: {name!r} has no rows")
                continue
            roles = {"source": source.source} if split == "unlabeled" else {"source": source.source,
                                                                              "target": source.target}
            for role, spec in roles.items():
                for column in template_fields(spec):
                    if column not in columns:
                        close = difflib.get_close_matches(column, columns, n=1)
                        hint = f" (did you mean {close[0]!r}?)" if close else ""
                        problems.append(f"{where}.{role}: column {column!r} is not in {name!r}{hint}; its columns "
                                        f"are {columns}")
    return problems
