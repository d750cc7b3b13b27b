"""The model families as the composition root hands them over, and how any process gets the registry back."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.contract import Backend

# The family registry: family name -> Backend class, in planning priority (backends.registry()'s answer).
Registry = Mapping[str, "type[Backend]"]

# The model families, as the composition root hands them over: its registry function (model.families),
# the registry itself, or the importable name of the function ("model:families"). A Ray actor resolves
# it in its own process; the first two pickle by reference to their module, the last is a plain string.
FamiliesSource = Callable[[], Registry] | Registry | str


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
