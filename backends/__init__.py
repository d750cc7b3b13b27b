"""Model families: one module each; the registry discovers every Backend subclass here."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from functools import lru_cache

from serving.contract import Backend

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def registry() -> dict[str, type[Backend]]:
    """Return {family: Backend class} for every backend module that imports, by priority."""
    found: dict[str, type[Backend]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # a family whose deps are missing must not take the server down
            log.warning("backend module %s not loaded: %s", info.name, exc)
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Backend)
                and obj is not Backend
                and obj.family
                and obj.__module__ == module.__name__
            ):
                found[obj.family] = obj
    return dict(sorted(found.items(), key=lambda kv: (kv[1].priority, kv[0])))
