"""The package layering stays true: a module imports only from its own layer or below (docs/architecture.md).

Every ``import`` and ``from ... import`` in src/diffusekit, at module level or inside a function, is parsed
with ``ast``; an import of a higher layer fails the test with the file, the line and both layers named.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffusekit"

#: Lowest first. A package may import its own layer and every layer listed before it.
LAYERS: list[set[str]] = [
    {"errors", "limits", "user_cache"},
    {"diffusion"},
    {"samplers"},
    {"networks", "runtime"},
    {"io"},
    {"pipelines"},
    {"training", "evaluation"},
    {"cli", "serve", "bench", "parity", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_LINES = 500


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "diffusekit" and len(parts) > 1 else None


def _owner(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "diffusekit":  # from diffusekit import cli
                found += [(node.lineno, f"diffusekit.{alias.name}") for alias in node.names]
    return found


SOURCES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def test_every_package_has_a_layer():
    packages = {_owner(p) for p in SOURCES}
    assert packages <= set(RANK), f"packages without a layer in LAYERS: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_look_down(path: Path):
    owner = _owner(path)
    bad = []
    for line, module in _imports(path):
        target = _top(module)
        if target is None or target == owner or target not in RANK:
            continue
        if RANK[target] > RANK[owner]:
            bad.append(f"{path.relative_to(SRC)}:{line} imports {module} ({target} is above {owner})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path: Path):
    """Control: the parser finds imports inside functions, where upward imports used to hide."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from diffusekit.pipelines.common import draw\n")
    assert _imports(probe) == [(2, "diffusekit.pipelines.common")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_stay_short(path: Path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines (limit {MAX_LINES}): split a concept out"


def test_comments_state_facts_not_tickets():
    pattern = re.compile(r"\bissue [0-9]", re.IGNORECASE)
    roots = [SRC, Path(__file__).resolve().parent]
    hits = [
        f"{p}:{i}"
        for root in roots
        for p in root.rglob("*.py")
        for i, text in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(text) and p != Path(__file__).resolve()
    ]
    assert not hits, hits
