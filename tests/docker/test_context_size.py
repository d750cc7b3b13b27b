"""The .dockerignore matcher (Docker's rules) and the build-context size check of `make lint`."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import context_size
from scripts.context_size import context_files, excluded, parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("lines", "path", "left_out"),
    [
        ("*", "model.py", True),
        ("*", "serving/settings.py", True),  # `*` names the folder, and its files go with it
        ("*\n!serving/", "serving/http/app.py", False),
        ("*\n!serving/\n**/__pycache__", "serving/http/__pycache__/app.cpython-311.pyc", True),
        ("**/*.pyc", "a/b/c.pyc", True),
        ("**/*.pyc", "c.pyc", True),  # `**/` is zero or more folders
        ("/.venv", ".venv/lib/python3.11/site.py", True),  # a leading / is the context root
        ("docs/*.md", "docs/a/b.md", False),  # `*` stays within one name
        ("docs/**/*.md", "docs/a/b.md", True),
        ("mod?l.py", "model.py", True),
        ("mod?l.py", "modl.py", False),
        ("[a-c]x", "bx", True),
        ("[^a-c]x", "bx", False),
        ("# *\n", "model.py", False),  # a comment
        ("*.py\n!model.py\nmodel.py", "model.py", True),  # the last rule that matches decides
        ("*.py\n!model.py", "model.py", False),
        ("./tests/../tests", "tests/x.py", True),  # paths are cleaned
        ("fo\\*", "fo*", True),
        ("fo\\*", "foo", False),
    ],
)
def test_rules_as_docker_reads_them(lines: str, path: str, left_out: bool) -> None:
    assert excluded(path, parse(lines)) is left_out


def test_the_repository_context_is_the_app_and_its_requirements() -> None:
    rules = parse((ROOT / ".dockerignore").read_text())
    for path in (
        ".venv/bin/python",
        ".cache/ls-venv/x",
        ".git/HEAD",
        "model_dir/a.json",
        "tests/conftest.py",
    ):
        assert excluded(path, rules), path
    for path in ("serving/settings.py", "backends/ner.py", "model.py", "_wsgi.py", "requirements.txt"):
        assert not excluded(path, rules), path
    assert not excluded("wheelhouse/torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl", rules)


def test_context_walk_skips_left_out_folders_and_always_sends_the_dockerfile(tmp_path: Path) -> None:
    (tmp_path / "serving" / "__pycache__").mkdir(parents=True)
    (tmp_path / "serving" / "a.py").write_text("x = 1\n")
    (tmp_path / "serving" / "__pycache__" / "a.pyc").write_bytes(b"0" * 10)
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "big.so").write_bytes(b"0" * 100)
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    rules = parse("*\n!serving/\n**/__pycache__\n")
    assert context_files(tmp_path, rules) == [("Dockerfile", 13), ("serving/a.py", 6)]


def test_size_check_fails_on_big_code_and_counts_wheels_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".dockerignore").write_text("*\n!app/\n!wheelhouse/\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "torch-2.14.1-cp311-none-any.whl").write_bytes(b"0" * 3_000_000)
    (tmp_path / "app" / "code.py").write_bytes(b"#" * 1_500_000)
    assert context_size.main(["--root", str(tmp_path), "--max-mb", "2"]) == 0
    assert "1.50 MB of code" in capsys.readouterr().out
    (tmp_path / "app" / "data.bin").write_bytes(b"0" * 600_000)
    assert context_size.main(["--root", str(tmp_path), "--max-mb", "2"]) == 1


def test_this_checkout_passes_the_lint_limit() -> None:
    assert context_size.main(["--root", str(ROOT)]) == 0
