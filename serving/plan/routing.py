"""Label routing: every label of a control tag that names no model goes to a model that can predict it.

Rules (the planner applies them per object, after the families' claims, when AUTO_ROUTE is on):

- A tag with `model_name` or `model_path` keeps the family that accepted the name (no routing).
- A closed-vocabulary family that claimed a tag says which of its labels it knows (`known_labels`).
  All known: it keeps the tag. Some unknown: a zero-shot family (`zero_shot`, picked by registry
  order among those whose `route_claim` takes the tag and whose default weights are present)
  gets the unknown labels, the closed model keeps its own; each target's control then carries only
  its model's labels, so the two label sets are disjoint and their regions are simply concatenated
  (no two models ever emit the same label of one tag, so per-label NMS across them has nothing to
  merge). A `whole_tag` zero-shot family (a single choice needs one distribution over every option)
  takes a mixed tag whole. None known: the zero-shot family takes the tag.
- No zero-shot weights present: the closed model alone keeps what it knows (and a plain geometry tag,
  which draws unlabeled regions, stays with it); when nothing can serve the tag, the tag goes to the
  first zero-shot family anyway so that /setup answers 422 with its download command.
- A tag no family claimed goes to a zero-shot family the same way, else stays unfilled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from serving.contract import Backend, Claim, ControlTag, ModelSpec, ObjectTag
from serving.settings import Settings


@dataclass(frozen=True)
class Route:
    """Which model serves which labels of one control tag, and why (python -m serving plan, /setup)."""

    control: str
    tag: str
    obj: str
    family: str  # "" = nothing serves it
    model: str
    labels: tuple[str, ...]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Return the route as JSON-ready data."""
        return {
            "control": self.control,
            "tag": self.tag,
            "object": self.obj,
            "family": self.family,
            "model": self.model,
            "labels": list(self.labels),
            "reason": self.reason,
        }

    def line(self) -> str:
        """Return the route as one readable line."""
        who = f"{self.family}:{self.model}" if self.family else "nothing"
        labels = ", ".join(self.labels) if self.labels else "(the model's own)"
        return f'<{self.tag} name="{self.control}" toName="{self.obj}">  {who}  [{labels}]  {self.reason}'


@dataclass(frozen=True)
class Routed:
    """One claim the planner turns into a target, with its route."""

    family: str
    cls: type[Backend]
    claim: Claim
    route: Route


def label_source(claim: Claim) -> ControlTag:
    """Return the control whose labels a claim predicts: the tag itself, else its linked Labels tag."""
    if not claim.control.labels and "labels" in claim.linked:
        return claim.linked["labels"]
    return claim.control


def dynamic_key(control: ControlTag) -> str:
    """Return the task data key of a tag's dynamic labels (value="$key", labels from the task), else ""."""
    value = control.attr("value")
    return value[1:] if value.startswith("$") and len(value) > 1 and not control.labels else ""


def names_model(control: ControlTag) -> bool:
    """Return True when a tag picks its model itself (model_name or model_path)."""
    return bool(control.attr("model_name") or control.attr("model_path"))


def _only(control: ControlTag, labels: Sequence[str]) -> ControlTag:
    keep = set(labels)
    return replace(
        control,
        labels=tuple(label for label in control.labels if label in keep),
        predicted_values={k: v for k, v in control.predicted_values.items() if k in keep},
        label_values={k: v for k, v in control.label_values.items() if k in keep},
    )


def restrict(claim: Claim, labels: Sequence[str]) -> Claim:
    """Return a claim whose label source carries only `labels` (the model is prompted with those alone)."""
    if claim.control.labels:
        return replace(claim, control=_only(claim.control, labels))
    linked = dict(claim.linked)
    linked["labels"] = _only(linked["labels"], labels)
    return replace(claim, linked=linked)


def _route(
    family: str, cls: type[Backend], claim: Claim, obj: ObjectTag, labels: Sequence[str], why: str
) -> Routed:
    route = Route(
        claim.control.name, claim.control.tag, obj.name, family, claim.model_name, tuple(labels), why
    )
    return Routed(family, cls, claim, route)


def _zero_shot(
    obj: ObjectTag,
    claim: Claim,
    controls: Sequence[ControlTag],
    settings: Settings,
    families: Mapping[str, type[Backend]],
) -> tuple[Routed | None, Routed | None, str]:
    """Return (the first present zero-shot claim, the first absent one, why the absent ones cannot load)."""
    absent: Routed | None = None
    reasons = []
    for family, cls in families.items():
        if not cls.zero_shot:
            continue
        zclaim = cls.route_claim(obj, claim, controls, settings)
        if zclaim is None:
            continue
        reason = cls.availability(ModelSpec(family, zclaim.model_name, zclaim.model_path), settings)
        found = Routed(family, cls, zclaim, Route("", "", "", "", "", (), ""))
        if reason is None:
            return found, absent, ""
        reasons.append(f"{family}:{zclaim.model_name}: {reason}")
        absent = absent or found
    return None, absent, "; ".join(reasons)


def route_object(
    obj: ObjectTag,
    claimed: Sequence[tuple[str, type[Backend], Claim]],
    unclaimed: Sequence[ControlTag],
    controls: Sequence[ControlTag],
    settings: Settings,
    families: Mapping[str, type[Backend]],
) -> tuple[list[Routed], list[Route]]:
    """Route one object's claims and unclaimed tags; return the claims to plan and the routes of unfilled tags."""
    out: list[Routed] = []
    unfilled: list[Route] = []
    for family, cls, claim in claimed:
        out.extend(_route_claim(obj, family, cls, claim, controls, settings, families))
    for control in unclaimed:
        bare = Claim(control=control, model_name="")
        dynamic = dynamic_key(label_source(bare))
        if names_model(control) or not (label_source(bare).labels or dynamic):
            continue
        present, absent, why = _zero_shot(obj, bare, controls, settings, families)
        labels = label_source(bare).labels
        chosen = present or absent
        if chosen is None:
            unfilled.append(
                Route(control.name, control.tag, obj.name, "", "", labels, "no family fills this tag")
            )
            continue
        reason = "no closed-vocabulary model fills this tag: zero-shot, prompted by its labels"
        if dynamic:
            reason = f"labels from each task's ${dynamic}: zero-shot, prompted per task"
        if chosen is absent:
            reason += f" (weights missing: {why})"
        out.append(_route(chosen.family, chosen.cls, chosen.claim, obj, labels, reason))
    return out, unfilled


def _route_claim(
    obj: ObjectTag,
    family: str,
    cls: type[Backend],
    claim: Claim,
    controls: Sequence[ControlTag],
    settings: Settings,
    families: Mapping[str, type[Backend]],
) -> list[Routed]:
    source = label_source(claim)
    if names_model(claim.control):
        return [_route(family, cls, claim, obj, source.labels, "named on the tag (model_name/model_path)")]
    if cls.zero_shot:
        return [_route(family, cls, claim, obj, source.labels, "zero-shot default (DETECTOR setting)")]
    if not source.labels and dynamic_key(source):
        return _route_dynamic(obj, family, cls, claim, controls, settings, families)
    if not source.labels:
        return [_route(family, cls, claim, obj, (), "the tag has no labels: the model's own")]
    known_set = cls.known_labels(ModelSpec(family, claim.model_name, claim.model_path), source, settings)
    if known_set is None:
        return [_route(family, cls, claim, obj, source.labels, "default model of this tag")]
    known = [label for label in source.labels if label in set(known_set)]
    unknown = [label for label in source.labels if label not in set(known)]
    if not unknown:
        return [_route(family, cls, claim, obj, source.labels, "the model knows every label")]
    present, absent, why = _zero_shot(obj, claim, controls, settings, families)
    if present is not None:
        if present.cls.whole_tag or not known:
            reason = f"labels the model does not know ({', '.join(unknown)}): zero-shot, prompted by all the tag's labels"
            return [_route(present.family, present.cls, present.claim, obj, source.labels, reason)]
        return [
            _route(family, cls, restrict(claim, known), obj, known, "labels the model knows"),
            _route(
                present.family,
                present.cls,
                restrict(present.claim, unknown),
                obj,
                unknown,
                "labels no closed-vocabulary model knows: zero-shot, prompted by them",
            ),
        ]
    missing = f"; zero-shot weights missing ({why})" if why else "; no zero-shot family takes this tag"
    if known or not claim.control.labels or absent is None:
        served = known if known else source.labels
        reason = f"labels the model knows (not predicted: {', '.join(unknown)}{missing})"
        if not known:
            reason = f"the model knows none of the labels{missing}"
        return [_route(family, cls, restrict(claim, known) if known else claim, obj, served, reason)]
    return [
        _route(
            absent.family,
            absent.cls,
            absent.claim,
            obj,
            source.labels,
            f"no model knows these labels{missing}",
        )
    ]


def _route_dynamic(
    obj: ObjectTag,
    family: str,
    cls: type[Backend],
    claim: Claim,
    controls: Sequence[ControlTag],
    settings: Settings,
    families: Mapping[str, type[Backend]],
) -> list[Routed]:
    """Route a tag whose labels each task brings (value="$key") to a zero-shot family, prompted per task."""
    key = dynamic_key(label_source(claim))
    present, absent, why = _zero_shot(obj, claim, controls, settings, families)
    chosen = present or absent
    if chosen is None:
        reason = f"labels from each task's ${key}, and no zero-shot family takes this tag: the model's own"
        return [_route(family, cls, claim, obj, (), reason)]
    reason = f"labels from each task's ${key}: zero-shot, prompted per task"
    if chosen is absent:
        reason += f" (weights missing: {why})"
    return [_route(chosen.family, chosen.cls, chosen.claim, obj, (), reason)]
