"""serving/settings.py is the only module of serving/ and backends/ that reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def environment_reads(path: Path) -> list[int]:
    """Return the lines of a module that read os.environ or call os.getenv / os.putenv."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        reads_attribute = (
            isinstance(node, ast.Attribute)
            and node.attr in {"environ", "getenv", "putenv", "environb"}
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )
        imports_name = (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in {"environ", "getenv", "environb"} for a in node.names)
        )
        if reads_attribute or imports_name:
            lines.append(node.lineno)
    return lines


def test_only_settings_reads_the_environment() -> None:
    modules = [*sorted((ROOT / "serving").rglob("*.py")), *sorted((ROOT / "backends").rglob("*.py"))]
    readers = {
        str(p.relative_to(ROOT)): found
        for p in modules
        if (found := environment_reads(p)) and p != ROOT / "serving" / "settings.py"
    }
    assert readers == {}
    assert environment_reads(ROOT / "serving" / "settings.py")  # the check finds a real reader
