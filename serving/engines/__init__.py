"""Where a batch job runs: in this process (serving/jobs.py's JobRunner) or on a Ray cluster (ray.py).

Both engines build the same runtime (`build_runtime`): the model families of the composition root,
the data resolver with file:// access under the input folders, the micro-batchers and the config
validation, so a task gets the same regions whichever engine predicts it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.settings import Settings

if TYPE_CHECKING:
    from serving.contract import Backend
    from serving.runtime import Runtime

ENGINES = ("local", "ray")

# The model families, as the composition root hands them over: its registry function (model.families),
# the registry itself, or the importable name of the function ("model:families"). A Ray actor resolves
# it in its own process; the first two pickle by reference to their module, the last is a plain string.
FamiliesSource = Callable[[], Mapping[str, "type[Backend]"]] | Mapping[str, "type[Backend]"] | str

RAY_MISSING = (
    "the Ray engine needs Ray: `.venv/bin/pip install -r requirements-ray.txt` (the pinned ray[data]), "
    "or run without --engine ray"
)


def ray_installed() -> bool:
    """Return True when `ray.data` can be imported (the optional extra, requirements-ray.txt)."""
    try:
        return (
            importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
        )
    except (ImportError, ValueError):
        return False


def load_families(source: FamiliesSource) -> dict[str, type[Backend]]:
    """Return the family registry from a function, a mapping or a "module:function" name."""
    if isinstance(source, str):
        module, _, name = source.partition(":")
        if not module or not name:
            raise ValueError(f"families {source!r}: give 'module:function', e.g. 'model:families'")
        source = getattr(importlib.import_module(module), name)
    if isinstance(source, Mapping):
        return dict(source)
    if callable(source):
        return dict(source())
    raise TypeError(
        f"families must be a function, a mapping or 'module:function', not {type(source).__name__}"
    )


def build_runtime(settings: Settings, roots: Sequence[str | Path], families: FamiliesSource) -> Runtime:
    """Return the batch runtime: every family, file:// reads under `roots`, the normal resolver otherwise."""
    from serving.jobs import LocalFileResolver
    from serving.runtime import Runtime

    def resolver() -> Any:
        from serving.data import DataResolver
        from serving.lsclient import LabelStudioClient

        return DataResolver(settings, LabelStudioClient(settings))

    return Runtime(settings, load_families(families), resolver=LocalFileResolver(roots, resolver, settings))
