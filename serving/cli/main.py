"""The command line: `python -m serving predict ...` (batch predictions for imports), `validate`, `train`, `weights`, `plan`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence

from serving.cli import plan, predict, train, validate, weights
from serving.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RegistryFn, UsageError, log
from serving.errors import (
    NotFound,
    Overloaded,
    ServingError,
)
from serving.jobs.store import JobFailed
from serving.settings import Settings

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (default LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (predict, validate, train, weights, plan):
        command.add_parser(sub)
    return parser


def _env_log_level() -> str:
    """Return LOG_LEVEL (INFO when the environment holds a setting that does not parse: the command says so)."""
    try:
        return Settings.from_env().log_level
    except ValueError:
        return "INFO"


def main(argv: Sequence[str] | None = None, families: RegistryFn | None = None) -> int:
    """Run the command line with the model families of the composition root; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.families = families
    logging.basicConfig(
        level=getattr(logging, str(args.log_level or _env_log_level()).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except UsageError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command with --resume to continue")
        return EXIT_INTERRUPTED
    except (ServingError, JobFailed, NotFound, Overloaded) as exc:
        log.error("%s", getattr(exc, "message", None) or exc)
        return EXIT_FAILED
    except Exception as exc:
        from serving.jobs.push import PushError

        if isinstance(exc, PushError):
            log.error("%s", exc)
            return EXIT_FAILED
        raise


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
