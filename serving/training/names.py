"""Names in training: a project's key (its folder name), model and device slugs, and the training device."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from serving.settings import Settings

PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def project_key(raw: Any) -> str | None:
    """Return the project id as a folder name: "3" from "3.1795429160", 3, or {"id": 3}; None when absent.

    Label Studio names a project "<id>.<created timestamp>" in /setup and /predict, and by a
    project object in webhooks; the id part names the project. Anything else that is not a plain
    name (slashes, dots, ..) is refused, so a project can never name a path outside MODEL_DIR.
    """
    if isinstance(raw, Mapping):
        raw = raw.get("id")
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, int):
        return str(raw)
    if not isinstance(raw, str) or not raw.strip():
        return None
    text = raw.strip()
    head, dot, tail = text.partition(".")
    if dot and head.isdigit() and tail.isdigit():
        text = head
    return text if PROJECT_RE.match(text) else None


def model_slug(key: str) -> str:
    """Return a folder name for a model key ("ner:dslim/bert-base-NER" -> "ner-dslim_bert-base-NER-1a2b3c")."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key.replace(":", "-")).strip("._")[:80]
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def training_device(settings: Settings) -> str:
    """Return the device training jobs run on: TRAIN_DEVICE, else DEVICE, else cuda when available, else cpu."""
    from serving.inference.device import pick_device

    return settings.train_device or pick_device(settings)


def device_slug(device: str) -> str:
    """Return a file-name form of a device ("cuda:1" -> "cuda-1")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", device) or "cpu"
