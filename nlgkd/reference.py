"""The recipe field reference of the docs site (docs/reference.md), rendered from what `nlgkd stages` prints:
the top level, `data`, `models` and every stage kind, each field with its type, bounds, default and help, all
read from the schema in nlgkd/config.py. Regenerate it after changing a field (a test compares the two):

    python -m nlgkd.reference --write docs/reference.md      # or: python -m nlgkd.reference > docs/reference.md
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import cli
from .config import STAGE_CONFIGS

REGENERATE = "python -m nlgkd.reference --write docs/reference.md"

HEADER = f"""# Recipe field reference

Every field a recipe can set, generated from the schema (`nlgkd/config.py`) by `{REGENERATE}`:
the same rows `nlgkd stages recipe | data | models | KIND` prints. Do not edit this page by hand; a test
fails when it is stale.

How to read it: a field nested in a mapping is written dotted (`decoding.top_p`), and `--set` takes the
same path (`--set stages.pts.decoding.top_p=0.9`). The type column gives the type, the allowed range in
parentheses and `= default`; `(required)` has no default. `NAME` in a path stands for a name you choose
(a task, a model entry). A `*` row says that a nested mapping repeats fields listed above it.
"""


def stages_output(kind: str) -> tuple[str, list[tuple[str, str, str]]]:
    """What `nlgkd stages KIND` prints (KIND a stage kind, or recipe / data / models): its text before the
    field rows, and the rows as (field, type, help); the command prints the same `fields_of`."""
    intro, rows = cli.fields_of(kind)
    return intro.strip(), list(rows)


def _escape(text: str) -> str:
    """Text for a Markdown table cell: backticked code stays code (unless it holds a pipe); the rest has the
    characters escaped that Markdown would read as markup or as a cell border."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans at all
        parts = [text.replace("`", "'")]
    out = []
    for i, part in enumerate(parts):
        if i % 2 and "|" not in part:
            out.append(f"`{part}`")
            continue
        part = re.sub(r"([\\|*_\[\]])", r"\\\1", part)
        out.append(part.replace("<", "&lt;"))
    return "".join(out)


def fields_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| field | type = default | what it does |", "|---|---|---|"]
    for name, typ, help_text in rows:
        lines.append(f"| `{name}` | {_escape(typ)} | {_escape(help_text)} |")
    return "\n".join(lines)


def _section(heading: str, kind: str) -> str:
    intro, rows = stages_output(kind)
    # the command's text starts with "KIND: what it is"; the heading already names it
    intro = intro.removeprefix(f"{kind}:").strip().rstrip(":")
    return f"{heading}\n\n{_escape(intro[:1].upper() + intro[1:])}\n\n{fields_table(rows)}\n"


def recipe_reference_markdown() -> str:
    """docs/reference.md: the top level of a recipe, data, models, then one section per stage kind."""
    parts = [HEADER,
             _section("## Top level", "recipe"),
             _section("## data", "data"),
             _section("## models", "models"),
             "## Stage kinds\n\nEvery stage has `name:` and `kind:`; any stage may declare `variants:` "
             "(see [Recipes](recipes.md#variants-and-ablations)).\n"]
    parts.extend(_section(f"### {kind}", kind) for kind in STAGE_CONFIGS)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nlgkd.reference",
                                     description="Print (or write) the recipe field reference, docs/reference.md.")
    parser.add_argument("--write", metavar="PATH", help="write it to PATH instead of printing it")
    args = parser.parse_args(argv)
    text = recipe_reference_markdown()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
