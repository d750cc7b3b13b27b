"""`python -m serving plan`: print which model serves which labels of each control tag of a config, and why."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from serving.cli.common import EXIT_OK, UsageError, read_config
from serving.settings import Settings


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan a labeling config with this server's families and settings; print the routing table."""
    from serving.plan.planner import build_plan

    if args.families is None:
        raise UsageError("no model families to plan with: start the command line as `python -m serving`")
    settings = Settings.from_env()
    plan = build_plan(read_config(args.config), settings, args.families())
    out = sys.stdout
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
    p.add_argument("--config", required=True, help="labeling config XML file")
    p.add_argument("--json", action="store_true", help="print the routes as JSON")
    p.set_defaults(func=cmd_plan)
