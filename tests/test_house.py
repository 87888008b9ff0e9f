"""The house rules of the package's layout: no import cycles, no module over 700 lines, every recipe word of
`nlgkd stages distill` one grep away from the function that computes it."""
from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nlgkd"
MAX_LINES = 700


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, at the top or inside functions (`from . import x` of a module x
    counts as importing x; of a name defined in a package, as importing the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert "nlgkd.runner" in graph and graph["nlgkd.runner"]  # the walk sees imports at all
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(trail[trail.index(other):] + [other])
            elif other not in state:
                visit(other, trail + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The walk above would see a cycle made of relative imports inside functions."""
    package = tmp_path / "nlgkd"
    (package / "stages").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "runner.py").write_text("def f():\n    from .stages import run\n")
    (package / "stages" / "__init__.py").write_text("from .distill import run\n")
    (package / "stages" / "distill.py").write_text("from ..runner import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    graph = import_graph()
    assert graph["nlgkd.runner"] == {"nlgkd.stages"} and graph["nlgkd.stages.distill"] == {"nlgkd.runner"}
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


# command-level modules: what the CLI runs (a stage reaches none of them; what they share sits below the stages)
COMMAND_MODULES = {"nlgkd.cli", "nlgkd.runner", "nlgkd.parallel", "nlgkd.serve", "nlgkd.report", "nlgkd.reference"}


def test_stages_reach_the_run_through_their_context_only():
    """No stage module imports a command module or touches the runner behind its StageContext."""
    graph = import_graph()
    stages = {name for name in graph if name.startswith("nlgkd.stages.")}
    assert "nlgkd.stages.distill" in stages
    reaching_up = {name: sorted(graph[name] & COMMAND_MODULES) for name in stages if graph[name] & COMMAND_MODULES}
    assert not reaching_up, f"stage modules importing command modules: {reaching_up}"
    touching = [str(p.relative_to(PACKAGE)) for p in (PACKAGE / "stages").glob("*.py") if ".runner" in p.read_text()]
    assert not touching, f"stage modules that reach the runner: {touching}"


def test_every_stage_kind_declares_the_splits_it_reads():
    from nlgkd.config import STAGE_CONFIGS

    assert not [kind for kind, cls in STAGE_CONFIGS.items() if "splits_read" not in vars(cls)]


def test_no_module_over_700_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"


def distill_words() -> dict[str, list[str]]:
    """Recipe field -> its words, from the schema `nlgkd stages distill` prints."""
    from nlgkd.config import AttentionKD, DistillConfig, HiddenKD

    def words(cls, name):
        return list(typing.get_args(typing.get_type_hints(cls)[name]))

    return {"objective": words(DistillConfig, "objective"), "divergence": words(DistillConfig, "divergence"),
            "hidden.loss": words(HiddenKD, "loss"), "attention.loss": words(AttentionKD, "loss")}


def test_every_distill_word_greps_to_its_function_in_one_hop():
    """`grep -n '"logits_kd"' nlgkd/` lands on the one dict entry that maps the word to its function."""
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    defined = set(re.findall(r"^(?:def|class) (\w+)\b", sources, re.M))
    for field, words in distill_words().items():
        for word in words:
            entries = re.findall(rf'^\s+"{word}": ([\w.]+),?', sources, re.M) + re.findall(
                rf'[{{,]\s*"{word}": ([\w.]+)', sources)
            assert entries, f"{field}: {word!r} maps to no function (no '\"{word}\": function' entry)"
            for function in entries:
                last = function.rpartition(".")[2]  # stages.STAGES: "finetune": finetune.run
                assert last == "None" or last in defined, f"{field}: {word!r} -> {function}, not defined"
