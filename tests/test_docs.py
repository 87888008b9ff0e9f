"""The docs: the generated recipe reference is current, the README stays short, every relative link lands on a
file, and the mkdocs site builds with warnings as errors."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlgkd.config import STAGE_CONFIGS, doc
from nlgkd.reference import REGENERATE, recipe_reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def test_reference_is_generated_from_the_current_schema():
    stored = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert stored == recipe_reference_markdown(), (
        f"docs/reference.md is stale: a recipe field changed since it was generated; run `{REGENERATE}`")


def test_a_new_field_makes_the_stored_reference_stale(monkeypatch):
    """The check above bites: a field added to a stage kind's schema changes the rendered reference."""
    @dataclasses.dataclass(kw_only=True)
    class ExportWithNewField(STAGE_CONFIGS["export"]):
        """Convert a model for an inference engine."""
        threads: int = dataclasses.field(default=1, metadata=doc("engine threads", ge=1))

    monkeypatch.setitem(STAGE_CONFIGS, "export", ExportWithNewField)
    rendered = recipe_reference_markdown()
    assert "| `threads` | integer (>= 1) = 1 | engine threads |" in rendered
    assert rendered != (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")


def test_reference_covers_every_stage_kind_and_part():
    text = recipe_reference_markdown()
    headings = set(re.findall(r"^#{2,3} (\S+)", text, re.M))
    assert {"data", "models", *STAGE_CONFIGS} <= headings
    # a field that is only in nlgkd stages' output shows up here too: decoding's fields, nested and dotted
    assert "| `decoding.top_p` |" in text and "| `joint_teaching.stop_share` |" in text


def test_reference_rows_keep_their_table_shape():
    """Every table row has exactly three cells: pipes inside types and help are escaped."""
    for line in recipe_reference_markdown().splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", CODE_SPAN.sub("code", line))
            assert len(cells) == 5, line  # the empty strings before the first and after the last border


def test_reference_command_writes_the_file(tmp_path):
    out = tmp_path / "reference.md"
    subprocess.run([sys.executable, "-m", "nlgkd.reference", "--write", str(out)], check=True, cwd=ROOT)
    assert out.read_text(encoding="utf-8") == recipe_reference_markdown()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the detail into docs/")


def relative_links(path: Path) -> list[str]:
    """The relative link targets of a Markdown file, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, mailto:, or an anchor on the same page
        targets.append(target)
    return targets


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path):
    missing = [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md#top), [web](https://example.org), [gone](nowhere.md)\n"
                    "`[code](skipped.md)`\n```\n[block](skipped.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["page.md#top", "nowhere.md"]


@pytest.mark.xdist_group("docs")
def test_docs_site_builds_without_warnings(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page left out of the nav or a missing include fails.
    Grouped: two workers building the site at once would only compete for the same two cores."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "reference" / "index.html").exists()
    # the measurements page is eval/README.md, included at build time
    assert "reproducing the study" in (tmp_path / "site" / "measurements" / "index.html").read_text().lower()
