"""The package's layout, as README's Architecture section describes it: at most 10 modules at the top level of
svdexp/ (the rest in packages named after the run's steps), runner.py the run's sequence (at most 200 lines), no
module of svdexp/ or benchmarks/ importing another module's private name, no two parts of svdexp (a top-level
module, or a package with its modules) importing each other's names, and no file citing what is not in the
repository (the reference notes it was built from, a folder of one machine)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "svdexp"


def module_name(path: Path) -> str:
    """``svdexp/cache/store.py`` -> ``svdexp.cache.store``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def svdexp_imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from svdexp... import name`` in ``path`` (also inside functions), and
    ``(module, "")`` of every ``import svdexp...``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "svdexp":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "svdexp"]
    return found


def part_of(module: str) -> str:
    """The part of svdexp a module belongs to: ``svdexp.cache.store`` -> ``svdexp.cache``, ``svdexp.app`` ->
    ``svdexp.app``; the package root ``svdexp`` is its own."""
    return ".".join(module.split(".")[:2])


def test_at_most_ten_modules_at_the_top_level():
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= 10, f"svdexp/ has {len(modules)} top-level modules: {modules}"


def test_the_runner_is_the_run_sequence_in_at_most_200_lines():
    lines = len((PACKAGE / "runner.py").read_text().splitlines())
    assert lines <= 200, f"svdexp/runner.py has {lines} lines"


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        own = module_name(path) if path.is_relative_to(PACKAGE) else None
        for module, name in svdexp_imports(path):
            if name.startswith("_") and module != own:
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_no_two_parts_of_svdexp_import_each_others_names():
    uses: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = part_of(module_name(path))
        for module, name in svdexp_imports(path):
            target = part_of(module if module != "svdexp" or not name else f"svdexp.{name}")
            if target not in (part, "svdexp"):
                uses.setdefault(part, set()).add(target)
    ties = sorted({tuple(sorted((a, b))) for a, targets in uses.items() for b in targets if a in uses.get(b, ())})
    assert not ties, f"parts of svdexp that import each other: {ties}"


# A folder of one machine (a home, work or temporary folder, as an absolute path's start); and the names
# of the reference notes the project was built from, which a user never has.
MACHINE_PATH = re.compile(r"(?<![\w.$~/-])/(?:root|home|work|tmp|Users|mnt|scratch)/")
OUTSIDE = re.compile(r"\b(?:METHODS|DESIGN)\.md\b|\.\./shared\b")


def test_no_file_cites_a_folder_of_one_machine_or_a_file_outside_the_repository():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".pdf", ".gguf", ".safetensors"):
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{name}: {m.group(0)}" for pattern in (MACHINE_PATH, OUTSIDE) for m in pattern.finditer(text)]
    assert not offenders, "\n".join(offenders)
