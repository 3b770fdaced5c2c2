"""README's Architecture section describes the code as it is: every module is named, every named path exists, and
the quoted line counts are those of the files (within 10 %, so that a small edit does not have to touch README)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def architecture() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Architecture")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def lines_of(path: Path) -> int:
    return len(path.read_text().splitlines())


def table_rows() -> list[tuple[list[str], list[int]]]:
    """(paths, line counts) of every table row that quotes counts: the n counts belong to the first n paths."""
    rows = []
    for line in architecture().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            counts = [int(c) for c in re.findall(r"\d+", cells[1])]
            rows.append((re.findall(r"`([^`]+)`", cells[0]), counts))
    return rows


def test_every_module_and_package_of_svdexp_is_named():
    section = architecture()
    names = [p.name for p in (ROOT / "svdexp").iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").is_file())]
    missing = [name for name in sorted(names) if name not in section]
    assert not missing, f"README's Architecture section does not name {missing}"


def test_named_paths_exist_and_line_counts_match():
    rows = table_rows()
    assert len(rows) >= 10
    for paths, counts in rows:
        for path in paths:
            assert (ROOT / path).exists(), f"README names {path}, which does not exist"
        for path, count in zip(paths, counts):
            if (ROOT / path).is_file():
                actual = lines_of(ROOT / path)
                assert abs(count - actual) <= 0.1 * actual, f"README says {path} has {count} lines; it has {actual}"
    for name, count in re.findall(r"`(\w+\.py)` \((\d+)\)", architecture()):
        (path,) = [p for p in (ROOT / "svdexp").rglob(name)]
        actual = lines_of(path)
        assert abs(int(count) - actual) <= 0.1 * actual, f"README says {name} has {count} lines; it has {actual}"


def test_the_families_table_is_the_one_generated_from_the_test_list():
    from families import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text(), "regenerate it: python tests/families.py"
