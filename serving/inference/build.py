"""build_runtime: the one place a runtime is assembled (the app's model, the CLI, every batch engine)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from serving.fetch.local import build_resolver
from serving.fetch.resolver import Resolver
from serving.inference.metrics import Metrics
from serving.inference.runtime import Runtime
from serving.plan.families import FamiliesSource, load_families
from serving.settings import Settings


def build_runtime(
    settings: Settings,
    families: FamiliesSource,
    *,
    roots: Sequence[str | Path] | None = None,
    resolver: Resolver | None = None,
    metrics: Metrics | None = None,
) -> Runtime:
    """Return a runtime over the families: planner, model slots, batchers, the data resolver, validation.

    The resolver is set once, here or on first use: the one given, else `build_resolver` with file://
    reads under `roots` (default: under BATCH_INPUT_ROOT, built on the first task so start-up stays
    fast). /predict, the local and the Ray engines and the CLI read task data the same way.
    """
    if resolver is None and roots is not None:
        resolver = build_resolver(settings, roots)
    return Runtime(settings, load_families(families), resolver=resolver, metrics=metrics)
