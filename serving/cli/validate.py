"""`python -m serving validate`: check a pre-annotation file against a labeling config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.cli.common import EXIT_FAILED, EXIT_OK, UsageError, iter_file_tasks, read_config


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a pre-annotation file against a config; print every problem; exit 1 when there are errors."""
    from serving.results.schema import ConfigSchema
    from serving.results.validation.files import iter_file_problems

    schema = ConfigSchema.from_config(read_config(args.config))
    path = Path(args.input)
    if not path.is_file():
        raise UsageError(f"--input {args.input}: no such file")
    counted = {"tasks": 0}

    def counting() -> Iterator[Any]:
        for obj in iter_file_tasks(path):
            counted["tasks"] += 1
            yield obj

    errors = warnings = shown = 0
    bad_tasks: set[int] = set()
    out = sys.stdout
    for problem in iter_file_problems(schema, counting(), deep=not args.fast):
        if problem.severity == "error":
            errors += 1
            if problem.task is not None:
                bad_tasks.add(problem.task)
        else:
            warnings += 1
        if shown < args.max_problems:
            out.write(str(problem) + "\n")
            shown += 1
    if shown < errors + warnings:
        out.write(f"... {errors + warnings - shown} more problems not shown (--max-problems)\n")
    summary = f"{path.name}: {counted['tasks']} tasks checked, {errors} errors in {len(bad_tasks)} tasks, {warnings} warnings"
    out.write(summary + "\n")
    out.flush()
    return EXIT_FAILED if errors else EXIT_OK


def add_parser(sub: Any) -> None:
    """Add the `validate` subcommand to the command line's subparsers."""
    v = sub.add_parser("validate", help="check a pre-annotation file against a labeling config")
    v.add_argument("--config", required=True, help="labeling config XML file")
    v.add_argument("--input", required=True, help="pre-annotation file (JSON list or JSONL)")
    v.add_argument("--max-problems", type=int, default=1000, help="print at most this many problems")
    v.add_argument("--fast", action="store_true", help="skip the full brush RLE decode (header check only)")
    v.set_defaults(func=cmd_validate)
