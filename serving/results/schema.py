"""The labeling config's schema: its object and control tags (parsed once by the SDK), what each control allows.

`sdk_tags` is the one place the config is parsed (LabelInterface, cached); planning (serving/plan/) and
validation (validation/) both read it. `ConfigSchema` is what a config allows, computed once per config.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.errors import ConfigError

IMAGE_OBJECTS = frozenset({"Image"})
# Controls whose value carries a label list under the lower-cased tag name (Choices under "choices").
_NOT_LABELED = frozenset({"Taxonomy"})


@dataclass(frozen=True)
class ObjectInfo:
    """An object tag of the config (Image, Text...)."""

    name: str
    tag: str
    value_key: str  # the task data key ($image -> "image"); "" when the value is not a variable
    is_url: bool  # valueType="url": the data value is a link, not inline text
    attrs: Mapping[str, str] = field(default_factory=dict)  # the tag's attributes, keys lower-cased


@dataclass(frozen=True)
class ControlInfo:
    """A control tag of the config, with what its items must look like."""

    name: str
    tag: str
    to_names: tuple[str, ...]
    types: frozenset[str]
    label_key: str | None  # the value key holding labels ("rectanglelabels", "labels", "choices")
    labels: frozenset[str] | None  # allowed labels (values and aliases); None = not checked
    labels_text: str  # for messages
    dynamic_key: str | None  # value="$options": labels come from task data
    per_region: bool
    single_choice: bool
    max_rating: int = 0  # Rating's maxRating (Label Studio's default 5); 0 for other tags

    @property
    def expected_type(self) -> str:
        """Return the result type Label Studio uses for this control."""
        return self.tag.lower()


@dataclass(frozen=True)
class ConfigSchema:
    """What a labeling config allows, pre-computed once per config."""

    controls: Mapping[str, ControlInfo]
    objects: Mapping[str, ObjectInfo]
    config_hash: str = ""
    control_list: str = field(default="", compare=False)

    @classmethod
    def from_config(cls, label_config: str) -> ConfigSchema:
        """Parse a labeling config (cached by its text); raise ConfigError on invalid XML."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise ConfigError(
                "the labeling config is empty: pass the project's XML config (<View>...</View>)"
            )
        return _schema_cached(label_config)

    def image_keys(self) -> list[str]:
        """Return the task data keys of the config's Image objects, in config order."""
        return [o.value_key for o in self.objects.values() if o.tag in IMAGE_OBJECTS and o.value_key]

    def data_keys(self) -> list[tuple[str, str]]:
        """Return (object name, data key) of every object a control points to."""
        used = {n for c in self.controls.values() for n in c.to_names}
        return [(o.name, o.value_key) for o in self.objects.values() if o.name in used and o.value_key]


@functools.lru_cache(maxsize=64)
def sdk_tags(label_config: str) -> tuple[list[Any], list[Any]]:
    """Parse a config once with the SDK's LabelInterface; return its object and control tags (read-only)."""
    try:
        from label_studio_sdk.label_interface import LabelInterface

        interface = LabelInterface(label_config)
        return list(interface.objects), list(interface.controls)
    except Exception as exc:  # the SDK raises several types for bad XML
        raise ConfigError(f"the labeling config is not valid XML: {str(exc)[:300]}") from exc


@functools.lru_cache(maxsize=64)
def _schema_cached(label_config: str) -> ConfigSchema:
    import hashlib

    sdk_objects, sdk_controls = sdk_tags(label_config)

    objects: dict[str, ObjectInfo] = {}
    for obj in sdk_objects:
        value = str(obj.value or "")
        attrs = dict(obj.attr or {})
        objects[obj.name] = ObjectInfo(
            name=obj.name,
            tag=obj.tag,
            value_key=value[1:] if value.startswith("$") else "",
            is_url=str(attrs.get("valueType", "")).lower() == "url",
            attrs={str(k).lower(): str(v) for k, v in attrs.items()},
        )

    controls: dict[str, ControlInfo] = {}
    for ctrl in sdk_controls:
        attrs = {k.lower(): str(v) for k, v in (ctrl.attr or {}).items()}
        tag = ctrl.tag
        label_key: str | None = None
        labels: frozenset[str] | None = None
        if (tag.endswith("Labels") or tag == "Choices") and tag not in _NOT_LABELED:
            label_key = tag.lower()
            allowed: set[str] = set()
            for alias, label_tag in (getattr(ctrl, "labels_attrs", None) or {}).items():
                allowed.add(str(alias))
                original = (label_tag.attr or {}).get("value")
                if original is not None:
                    allowed.add(str(original))
            labels = frozenset(allowed)
        value_attr = attrs.get("value", "")
        dynamic_key = value_attr[1:] if value_attr.startswith("$") else None
        if dynamic_key:
            labels = labels or None
        controls[ctrl.name] = ControlInfo(
            name=ctrl.name,
            tag=tag,
            to_names=tuple(ctrl.to_name or ()),
            types=frozenset({tag.lower()}),
            label_key=label_key,
            labels=labels,
            labels_text=", ".join(sorted(labels)) if labels else "none",
            dynamic_key=dynamic_key,
            per_region=attrs.get("perregion", "").lower() in {"true", "1", "yes"},
            single_choice=tag == "Choices"
            and attrs.get("choice", "single").lower() in {"single", "single-radio"},
            max_rating=_max_rating(attrs) if tag == "Rating" else 0,
        )
    digest = hashlib.sha1(label_config.encode("utf-8", "replace")).hexdigest()[:16]
    listing = ", ".join(f"{c.name} ({c.tag})" for c in controls.values()) or "none"
    return ConfigSchema(controls=controls, objects=objects, config_hash=digest, control_list=listing)


def _max_rating(attrs: Mapping[str, str]) -> int:
    """Return a Rating tag's maxRating (lower-cased attributes), 5 when absent or not a positive number."""
    try:
        value = int(str(attrs.get("maxrating", "5")).strip())
    except ValueError:
        return 5
    return value if value > 0 else 5
