"""Label config -> plan: which backend fills which control tag, with label maps and knobs."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from serving.contract import Backend, Claim, ControlTag, LabelMap, ModelSpec, ObjectTag, Target
from serving.errors import ConfigError
from serving.plan.routing import Route, label_source, route_object
from serving.results.schema import sdk_tags
from serving.settings import Settings

log = logging.getLogger(__name__)

MAX_CONFIG_CHARS = 1_000_000
TRUE = {"true", "1", "yes", "on"}


@dataclass(frozen=True)
class Plan:
    """The targets of one labeling config, grouped for the runtime."""

    config_hash: str
    targets: tuple[Target, ...]
    objects: Mapping[str, ObjectTag]
    unfilled: tuple[str, ...] = ()  # controls no backend fills ("name (Tag)")
    skipped: tuple[str, ...] = ()  # controls with model_skip="true"
    families: Mapping[str, type[Backend]] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()  # per control tag: which model serves which labels, and why
    controls: Mapping[str, ControlTag] = field(default_factory=dict)  # every control, all its labels, by name

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        """Return the distinct models this plan needs, in first-use order."""
        seen: dict[str, ModelSpec] = {}
        for target in self.targets:
            seen.setdefault(target.model.key, target.model)
        return tuple(seen.values())

    def whole_tags(self, key: str) -> tuple[Target, ...]:
        """Return the targets a model fills, each with every label of its tag (what training teaches it)."""
        return tuple(self._widened(t) for t in self.targets_of(key))

    def _widened(self, target: Target) -> Target:
        """Return a target with its tag's full label list (routing may have kept only some for its model)."""
        control = self.controls.get(target.control.name, target.control)
        linked = {role: self.controls.get(c.name, c) for role, c in target.linked.items()}
        source = linked["labels"] if not control.labels and "labels" in linked else control
        cls = self.families.get(target.model.family)
        label_map = LabelMap(source.labels, source.predicted_values, cls.aliases if cls else ())
        return replace(target, control=control, linked=linked, label_map=label_map)

    def with_trained(self, models: Mapping[str, ModelSpec], unrouted: Plan | None = None) -> Plan:
        """Return this plan with trained models in, each serving every label of its tags (what it was trained on).

        A trained model takes its tags over from the routes (zero-shot parts of those tags included).
        `unrouted` (the config planned without label routing) supplies a trained model whose tags
        routing gave to other models entirely.
        """
        taken = [self._widened(t) for t in self.targets if t.model.key in models]
        here = {t.model.key for t in taken}
        if unrouted is not None:
            taken += [
                unrouted._widened(t)
                for t in unrouted.targets
                if t.model.key in models and t.model.key not in here
            ]
        if not taken:
            return self
        names = {t.control.name for t in taken}
        kept = [t for t in self.targets if t.control.name not in names]
        trained = [replace(t, model=models[t.model.key]) for t in taken]
        return replace(self, targets=tuple(kept + trained))

    def targets_of(self, key: str) -> tuple[Target, ...]:
        """Return the targets a model (by key) fills."""
        return tuple(t for t in self.targets if t.model.key == key)

    def groups(self) -> list[tuple[ModelSpec, ObjectTag, list[Target]]]:
        """Return targets grouped by (model, object): one inference feeds every target of a group."""
        grouped: OrderedDict[tuple[str, str], tuple[ModelSpec, ObjectTag, list[Target]]] = OrderedDict()
        for target in self.targets:
            key = (target.model.key, target.obj.name)
            if key not in grouped:
                grouped[key] = (target.model, target.obj, [])
            grouped[key][2].append(target)
        return list(grouped.values())


def config_hash(label_config: str) -> str:
    """Return the cache key of a labeling config."""
    return hashlib.sha1(label_config.encode("utf-8", "replace")).hexdigest()[:16]


def _is_true(value: str) -> bool:
    return value.strip().lower() in TRUE


def parse_config(label_config: str) -> tuple[dict[str, ObjectTag], list[ControlTag]]:
    """Parse a labeling config with label_studio_sdk's LabelInterface into our tag types."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise ConfigError("the labeling config is empty: send the project's XML config (<View>...</View>)")
    if len(label_config) > MAX_CONFIG_CHARS:
        raise ConfigError(f"the labeling config is larger than {MAX_CONFIG_CHARS} characters")
    # The validation schema parses the same text: one LabelInterface parse serves both.
    sdk_objects, sdk_controls = sdk_tags(label_config)

    objects: dict[str, ObjectTag] = {}
    for obj in sdk_objects:
        value = str(obj.value or "")
        key = value[1:] if value.startswith("$") else ""
        objects[obj.name] = ObjectTag(name=obj.name, tag=obj.tag, value_key=key, attrs=dict(obj.attr or {}))
    every = tuple((o.name, o.tag, o.value_key) for o in objects.values())
    objects = {n: replace(o, others=tuple(e for e in every if e[0] != n)) for n, o in objects.items()}

    controls: list[ControlTag] = []
    trees = _taxonomy_paths(label_config) if any(c.tag == "Taxonomy" for c in sdk_controls) else {}
    for ctrl in sdk_controls:
        to_names = list(ctrl.to_name or [])
        if not to_names:
            continue
        labels = tuple(getattr(ctrl, "labels", None) or ())
        predicted: dict[str, tuple[str, ...]] = {}
        label_values: dict[str, str] = {}
        for label, label_tag in (getattr(ctrl, "labels_attrs", None) or {}).items():
            raw = (label_tag.attr or {}).get("predicted_values", "")
            values = tuple(v.strip() for v in str(raw).split(",") if v.strip())
            if values:
                predicted[label] = values
            # the SDK names a label by its alias when it has one; keep the readable value too
            shown = str((label_tag.attr or {}).get("value") or "").strip()
            if shown and shown != label:
                label_values[label] = shown
        controls.append(
            ControlTag(
                name=ctrl.name,
                tag=ctrl.tag,
                to_name=to_names[0],
                labels=labels,
                attrs=dict(ctrl.attr or {}),
                predicted_values=predicted,
                label_values=label_values,
                paths=trees.get(ctrl.name, ()),
            )
        )
    return objects, controls


def _taxonomy_paths(label_config: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Return each Taxonomy tag's nodes as paths from the root (the SDK lists its nodes flat)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return {}
    out: dict[str, tuple[tuple[str, ...], ...]] = {}
    for tree in root.iter("Taxonomy"):
        paths: list[tuple[str, ...]] = []
        stack: list[tuple[ET.Element, tuple[str, ...]]] = [(child, ()) for child in reversed(list(tree))]
        while stack:
            node, prefix = stack.pop()
            if node.tag != "Choice":
                continue
            # Label Studio stores a node's alias when it has one, as it does for Choices
            path = (*prefix, str(node.get("alias") or node.get("value") or ""))
            paths.append(path)
            stack.extend((child, path) for child in reversed(list(node)))
        out[str(tree.get("name", ""))] = tuple(paths)
    return out


def _threshold(control: ControlTag, default: float) -> float:
    raw = control.attr("model_score_threshold")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(
            f'model_score_threshold="{raw}" on <{control.tag} name="{control.name}"> is not a number; '
            "use a value between 0 and 1"
        ) from exc
    if not 0.0 <= value <= 1.0:
        raise ConfigError(
            f'model_score_threshold="{raw}" on <{control.tag} name="{control.name}"> must be between 0 and 1'
        )
    return value


def build_plan(label_config: str, settings: Settings, families: Mapping[str, type[Backend]]) -> Plan:
    """Plan a labeling config: every control is claimed by at most one family, by priority."""
    families = dict(families)
    objects, controls = parse_config(label_config)
    skipped = tuple(f"{c.name} ({c.tag})" for c in controls if _is_true(c.attr("model_skip")))
    remaining = [c for c in controls if not _is_true(c.attr("model_skip"))]
    targets: list[Target] = []
    linked_names: set[str] = set()

    routes: list[Route] = []
    for obj in objects.values():
        claimed: list[tuple[str, type[Backend], Claim]] = []
        all_on_obj = [c for c in remaining if c.to_name == obj.name]
        for family, cls in families.items():
            on_obj = [c for c in remaining if c.to_name == obj.name]
            if not on_obj:
                break
            for claim in cls.claim(obj, on_obj, settings):
                # a linked Labels tag may serve several geometry tags (Rectangle, Polygon, KeyPoint on
                # one image), so it stays available; other linked roles belong to this claim alone
                shared = {c.name for role, c in claim.linked.items() if role == "labels"}
                consumed = {claim.control.name} | {c.name for c in claim.linked.values()} - shared
                linked_names |= shared
                remaining = [c for c in remaining if c.name not in consumed]
                claimed.append((family, cls, claim))
        unclaimed = [c for c in remaining if c.to_name == obj.name and c.name not in linked_names]
        if settings.auto_route:
            routed, unserved = route_object(obj, claimed, unclaimed, all_on_obj, settings, families)
            # a routed claim's linked per-region tags (choices, textarea) are filled by it too
            taken = {r.claim.control.name for r in routed} | {
                c.name for r in routed for role, c in r.claim.linked.items() if role != "labels"
            }
            remaining = [c for c in remaining if c.name not in taken]
            routes.extend(r.route for r in routed)
            routes.extend(u for u in unserved if u.control not in taken)
            plan_claims = [(r.family, r.cls, r.claim) for r in routed]
        else:
            plan_claims = claimed
            routes.extend(_tag_route(obj, family, claim) for family, _cls, claim in claimed)
        targets.extend(_target(obj, family, cls, claim) for family, cls, claim in plan_claims)
    unfilled = tuple(f"{c.name} ({c.tag})" for c in remaining if c.name not in linked_names)
    plan = Plan(
        config_hash=config_hash(label_config),
        targets=tuple(targets),
        objects=objects,
        unfilled=unfilled,
        skipped=skipped,
        families=families,
        routes=tuple(routes),
        controls={c.name: c for c in controls},
    )
    if not plan.targets:
        supported = sorted({phrase for cls in families.values() for phrase in cls.supported()})
        found = ", ".join(f'<{c.tag} name="{c.name}">' for c in controls) or "no control tags"
        raise ConfigError(
            f"this server cannot fill any control tag of the labeling config (found {found}); "
            f"supported: {'; '.join(supported)}. Add one of those tags, or remove model_skip"
        )
    if unfilled:
        log.info("config %s: no backend fills %s", plan.config_hash, ", ".join(unfilled))
    for route in plan.routes:
        log.info("config %s: %s", plan.config_hash, route.line())
    return plan


def _tag_route(obj: ObjectTag, family: str, claim: Claim) -> Route:
    """Return the route of a tag its family claimed by itself (AUTO_ROUTE=false)."""
    source = label_source(claim)
    return Route(
        claim.control.name,
        claim.control.tag,
        obj.name,
        family,
        claim.model_name,
        source.labels,
        "claimed by tag (AUTO_ROUTE=false)",
    )


def _target(obj: ObjectTag, family: str, cls: type[Backend], claim: Claim) -> Target:
    """Return the plan's target of one claim: its model, label map, threshold and linked tags."""
    labels_source = label_source(claim)
    return Target(
        control=claim.control,
        obj=obj,
        model=ModelSpec(family=family, name=claim.model_name, path=claim.model_path),
        label_map=LabelMap(labels_source.labels, labels_source.predicted_values, cls.aliases),
        threshold=_threshold(claim.control, cls.default_threshold),
        linked=dict(claim.linked),
        readonly=_is_true(claim.control.attr("model_readonly")),
        hidden=_is_true(claim.control.attr("model_hidden")),
    )


def unrouted_plan(
    label_config: str, settings: Settings, families: Mapping[str, type[Backend]]
) -> Plan | None:
    """Return the config planned without label routing (each tag kept by the family claiming it), or None."""
    try:
        return build_plan(label_config, settings.with_(auto_route=False), families)
    except ConfigError:  # only zero-shot families serve it: they are reached through routing alone
        return None


class Planner:
    """Build plans, cached by config hash (LS sends the same config on every call)."""

    def __init__(self, settings: Settings, families: Mapping[str, type[Backend]], size: int = 128) -> None:
        self.settings = settings
        self.families: dict[str, type[Backend]] = dict(families)
        self._cache: OrderedDict[str, Plan] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def plan(self, label_config: str) -> Plan:
        """Return the (cached) plan of a labeling config; raise ConfigError when it has nothing to fill."""
        key = config_hash(label_config) if isinstance(label_config, str) else ""
        with self._lock:
            if key and key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        plan = build_plan(label_config, self.settings, self.families)
        with self._lock:
            self._cache[key] = plan
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return plan
