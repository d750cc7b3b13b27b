"""`python -m serving plan`: print which model serves which labels of each control tag of a config, and why.

With `--templates DIR` (Label Studio's `annotation_templates` folder) it plans every template Label Studio
ships and prints, per template, which tags get a model here: the coverage table of docs/TEMPLATES.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.cli.common import EXIT_OK, UsageError, read_config
from serving.contract import Backend
from serving.errors import ConfigError
from serving.settings import Settings

# the planner's message when no tag of a config can be filled (the whole config is unservable)
NOTHING_FILLS = "this server cannot fill any control tag"


@dataclass(frozen=True)
class Coverage:
    """What the planner does with one template: its served and unserved control tags."""

    template: str  # "group/name"
    served: tuple[str, ...]  # "name (Tag) -> family:model"
    unserved: tuple[str, ...]  # "name (Tag)"
    error: str = ""

    @property
    def status(self) -> str:
        """Return 'all', 'some', 'none' or 'error' (the config does not parse)."""
        if self.error:
            return "error"
        if self.served and not self.unserved:
            return "all"
        return "some" if self.served else "none"


def templates(folder: Path) -> Iterator[tuple[str, str]]:
    """Yield (group/name, labeling config) for every template of an annotation_templates folder, sorted."""
    import yaml

    for path in sorted(folder.glob("*/*/config.yml")):
        config = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("config", "")
        if config:
            yield f"{path.parent.parent.name}/{path.parent.name}", config


def cover(name: str, config: str, settings: Settings, families: Mapping[str, type[Backend]]) -> Coverage:
    """Plan one template and sort its control tags into served and unserved."""
    from serving.plan.planner import build_plan

    try:
        plan = build_plan(config, settings, families)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith(NOTHING_FILLS):
            found = message.split("(found ", 1)[-1].split(");", 1)[0]
            return Coverage(name, (), tuple(t.strip() for t in found.split(", ")))
        return Coverage(name, (), (), error=message)
    served = tuple(f"{r.control} ({r.tag}) -> {r.family}:{r.model}" for r in plan.routes if r.family)
    unserved = tuple(f"{r.control} ({r.tag})" for r in plan.routes if not r.family)
    return Coverage(name, served, unserved + tuple(u for u in plan.unfilled if u not in unserved))


def coverage_table(rows: list[Coverage]) -> str:
    """Return the coverage as a Markdown table under a one-line summary."""
    counts = {s: sum(r.status == s for r in rows) for s in ("all", "some", "none", "error")}
    lines = [
        f"{len(rows)} templates: every tag served in {counts['all']}, some tags in {counts['some']}, "
        f"none in {counts['none']}, configs that do not parse: {counts['error']}.",
        "",
        "| template | served | tags served (family:model) | tags not served |",
        "|---|---|---|---|",
    ]
    for r in rows:
        served = "<br>".join(r.served) or "-"
        unserved = r.error or "<br>".join(r.unserved) or "-"
        lines.append(f"| {r.template} | {r.status} | {served} | {unserved} |")
    return "\n".join(lines) + "\n"


def with_all_weights(families: Mapping[str, type[Backend]]) -> dict[str, type[Backend]]:
    """Return the families as on a server where every model's weights are present (planning only)."""

    def present(cls: type[Backend], spec: Any, settings: Any) -> None:
        return None

    return {
        name: type(cls.__name__, (cls,), {"availability": classmethod(present), "__module__": cls.__module__})
        for name, cls in families.items()
    }


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a labeling config (or every template of a folder) with this server's families and settings."""
    from serving.plan.planner import build_plan

    if args.families is None:
        raise UsageError("no model families to plan with: start the command line as `python -m serving`")
    if (args.config is None) == (args.templates is None):
        raise UsageError("give one of --config FILE or --templates DIR")
    settings = Settings.from_env()
    out = sys.stdout
    families = args.families()
    if args.all_weights:
        families = with_all_weights(families)
    if args.templates is not None:
        folder = Path(args.templates)
        rows = [cover(name, config, settings, families) for name, config in templates(folder)]
        if not rows:
            raise UsageError(f"no */*/config.yml templates under {folder}")
        out.write(coverage_table(rows))
        return EXIT_OK
    plan = build_plan(read_config(args.config), settings, families)
    if args.json:
        out.write(json.dumps([r.as_dict() for r in plan.routes], indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    for route in plan.routes:
        out.write(route.line() + "\n")
    if plan.skipped:
        out.write(f"skipped (model_skip): {', '.join(plan.skipped)}\n")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add the `plan` subcommand to the command line's subparsers."""
    p = sub.add_parser("plan", help="print which model serves which labels of each tag of a labeling config")
    p.add_argument("--config", default=None, help="labeling config XML file")
    p.add_argument(
        "--templates",
        default=None,
        help="Label Studio's annotation_templates folder: plan every template and print the coverage table",
    )
    p.add_argument("--json", action="store_true", help="print the routes as JSON")
    p.add_argument(
        "--all-weights",
        action="store_true",
        help="plan as a server with every model's weights downloaded (the Docker image's or a connected host's)",
    )
    p.set_defaults(func=cmd_plan)
