"""Fetch and list model weights: `python -m serving weights download|list [--family F] [--model M]`.

Serving never downloads: this command fills the caches the backends read (torchvision weights go
to `$TORCH_HOME/hub/checkpoints`), where internet exists (the Dockerfile and `make weights` run it).
Any family can take part by giving its Backend class two classmethods:
`weights_status(settings) -> list[WeightStatus-like]` (model, path, present) and
`download_weights(models, settings) -> list[str]` (paths written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from serving.cli.common import UsageError
from serving.contract import Backend
from serving.settings import Settings

log = logging.getLogger("serving.weights")


def families_with_weights(
    families: Mapping[str, type[Backend]], wanted: Sequence[str] = ()
) -> dict[str, type[Backend]]:
    """Return the families (optionally only the wanted ones) that can list and download weights."""
    unknown = [f for f in wanted if f not in families]
    if unknown:
        raise SystemExit(f"unknown family: {', '.join(unknown)} (known: {', '.join(families)})")
    return {
        name: cls
        for name, cls in families.items()
        if (not wanted or name in wanted)
        and hasattr(cls, "weights_status")
        and hasattr(cls, "download_weights")
    }


def list_weights(settings: Settings, families: Mapping[str, type[Backend]]) -> int:
    """Log every weights file the families use and whether it is present; return how many are missing."""
    missing = 0
    for family, cls in families.items():
        for status in cls.weights_status(settings):  # type: ignore[attr-defined]
            missing += not status.present
            log.info(
                "%-22s %-34s %-8s %s",
                family,
                status.model,
                "present" if status.present else "MISSING",
                status.path,
            )
    return missing


def download(settings: Settings, families: Mapping[str, type[Backend]], models: Sequence[str] = ()) -> int:
    """Download the weights of the families' models (or only `models`); return the number of failures."""
    failures = 0
    owners = {m: _owner(m, families) for m in models}
    unclaimed = {m for m, owner in owners.items() if owner is None}
    for family, cls in families.items():
        names = [m for m in models if owners[m] == family]
        if models and not names:
            continue
        try:
            for path in cls.download_weights(names, settings):  # type: ignore[attr-defined]
                log.info("%-22s ready: %s", family, path)
        except Exception as exc:  # one family's failure (no internet, bad hash) must not hide the others
            failures += 1
            log.error("%s: download failed: %s", family, exc)
    for name in sorted(unclaimed):
        failures += 1
        log.error("no family serves a model named %r", name)
    return failures


def _owner(model: str, families: Mapping[str, type[Backend]]) -> str | None:
    """Return the family that downloads a model name: one that lists it, else one that names it, before a catch-all.

    NER takes any name (a spaCy package or a Hugging Face id) and text classification any hub id, so a
    SAM or Grounding DINO id would otherwise be fetched twice or by the wrong family; a family that
    accepts a name or a hub id no model has is a catch-all.
    """
    listed = [family for family, cls in families.items() if model in cls.model_names()]
    if listed:
        return listed[0]
    accepting = [family for family, cls in families.items() if cls.accepts_model(model)]
    specific = [f for f in accepting if not any(families[f].accepts_model(x) for x in _NO_SUCH_MODELS)]
    chosen = specific or accepting
    return chosen[0] if chosen else None


_NO_SUCH_MODELS = ("\x00 no such model", "no-such-org-0/no-such-model-0")


def run(
    action: str,
    settings: Settings,
    families: Mapping[str, type[Backend]],
    only: Sequence[str] = (),
    models: Sequence[str] = (),
) -> int:
    """List ("list") or download ("download") the families' weights; return the exit code."""
    logging.getLogger("serving.weights").setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    chosen = families_with_weights(families, only)
    if action == "list":
        missing = list_weights(settings, chosen)
        if missing:
            log.info(
                "%d missing: run `python -m serving weights download` where internet is available", missing
            )
        return 0
    return 1 if download(settings, chosen, models) else 0


def cmd_weights(args: argparse.Namespace) -> int:
    """List or download the weights of every family (or of --family / --model)."""
    if args.families is None:
        raise UsageError("no model families: start the command line as `python -m serving`")
    return run(args.action, Settings.from_env(), args.families(), args.family, args.model)


def add_parser(sub: Any) -> None:
    """Add the `weights` subcommand to the command line's subparsers."""
    w = sub.add_parser("weights", help="list or download model weights (where internet exists)")
    w.add_argument("action", choices=("download", "list"))
    w.add_argument("--family", action="append", default=[], help="only this family (repeatable)")
    w.add_argument("--model", action="append", default=[], help="only this model_name (repeatable)")
    w.set_defaults(func=cmd_weights)
