"""model_version of a plan: a pure function of its models' identities and weights (never load state)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from serving.contract import Backend, ModelSpec
from serving.plan.planner import Plan
from serving.settings import Settings


def plan_version(plan: Plan, families: Mapping[str, type[Backend]], settings: Settings) -> str:
    """Return the model_version of a plan (see Runtime.model_version); the trainer uses it too.

    A trained model (spec.trained) is named by its family, name and weights, not by the folder it
    lives in, so replicas mounting MODEL_DIR elsewhere agree; its versions read "<families>-trained-<hash>"
    and are never replaced by the MODEL_VERSION override (Label Studio must see the change).
    """
    trained = any(spec.trained for spec in plan.specs)
    if settings.model_version and not trained:
        return settings.model_version
    parts = sorted(
        f"{_identity(spec)}={families[spec.family].version_of(spec, settings)}" for spec in plan.specs
    )
    # what a target adds to its model's answers (a generation prompt); nothing for most families
    parts += sorted(
        f"{target.model.key}/{target.control.name}={extra}"
        for target in plan.targets
        if (extra := families[target.model.family].target_version(target, settings))
    )
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]
    names = "+".join(sorted({spec.family for spec in plan.specs}))
    if trained:
        return f"{settings.model_version or names}-trained-{digest}"
    return f"{names}-{digest}"


def _identity(spec: ModelSpec) -> str:
    return f"{spec.family}:{spec.name}+trained" if spec.trained else spec.key
