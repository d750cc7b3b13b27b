"""What the commands share: the families handed in by the composition root, usage errors, exit codes, input files."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.jobs.inputs import input_kind, iter_json_file, iter_jsonl_file
from serving.plan.families import Registry

if TYPE_CHECKING:
    pass

# The composition root (model.py) passes its registry function; called only when models run here.
RegistryFn = Callable[[], Registry]

log = logging.getLogger("serving.cli")  # every command logs as the command line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """The command line is wrong; the message says how to fix it."""


def read_config(path: str) -> str:
    """Return the labeling config XML from a file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file (give the project's labeling config XML)")
    return p.read_text(encoding="utf-8")


def iter_file_tasks(path: Path) -> Iterator[Any]:
    """Yield the raw objects of a JSON list or JSONL file, streaming."""
    kind = input_kind(path)
    if kind == "images":
        raise UsageError(f"{path} is a folder; validate takes a JSON or JSONL pre-annotation file")
    return iter_jsonl_file(path) if kind == "jsonl" else iter_json_file(path)
