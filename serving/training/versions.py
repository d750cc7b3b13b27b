"""Trained versions: models under MODEL_DIR/versions/<project>/<model>/<version>/ and each project's pointer.

A version folder appears whole (one rename); a project's `current.json` pointer is replaced atomically,
and workers stat it on each /setup and /predict of the project, re-reading it only when it changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from serving.contract import (
    ModelSpec,
    weights_fingerprint,
)
from serving.errors import BadRequest, NotFound
from serving.settings import Settings
from serving.training.names import PROJECT_RE, model_slug
from serving.util.files import write_json_atomic
from serving.util.locks import exclusive_lock

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^v(\d+)-[0-9a-z]+$")
POINTER = "current.json"
MANIFEST = "version.json"
BASE_VERSION_NAMES = frozenset({"base", "pretrained", "untrained"})


def _now() -> float:
    return time.time()


class VersionStore:
    """Trained models per project and model, and each project's `current.json` pointer."""

    def __init__(self, root: str | Path) -> None:
        """Use `root` (MODEL_DIR/versions); nothing is created until a version is published."""
        self.root = Path(root)

    @classmethod
    def for_settings(cls, settings: Settings) -> VersionStore:
        """Return the store under MODEL_DIR/versions."""
        return cls(Path(settings.model_dir) / "versions")

    def project_dir(self, project: str) -> Path:
        """Return a project's folder (refusing names that are not plain project ids)."""
        if not PROJECT_RE.match(project):
            raise BadRequest(f"project {project[:40]!r} is not a Label Studio project id")
        return self.root / project

    def projects(self) -> list[str]:
        """Return the projects that have a folder here, sorted (other entries, e.g. lost+found, are skipped)."""
        try:
            entries = list(self.root.iterdir()) if self.root.is_dir() else []
        except OSError:
            return []
        return sorted(p.name for p in entries if PROJECT_RE.match(p.name) and p.is_dir())

    def pointer_path(self, project: str) -> Path:
        """Return the project's pointer file."""
        return self.project_dir(project) / POINTER

    def stat(self, project: str) -> tuple[int, int, int] | None:
        """Return (mtime_ns, inode, size) of the project's pointer, None when it has none: one stat() call."""
        try:
            st = os.stat(self.pointer_path(project))
        except (OSError, BadRequest):
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def pointer(self, project: str) -> dict[str, Any]:
        """Return the project's pointer: {"models": {model key: entry}, "updated_at": ...}."""
        try:
            data = json.loads(self.pointer_path(project).read_text(encoding="utf-8"))
        except (OSError, ValueError, BadRequest):
            return {"models": {}}
        return data if isinstance(data, dict) and isinstance(data.get("models"), dict) else {"models": {}}

    def spec_of(self, project: str, entry: Mapping[str, Any]) -> ModelSpec:
        """Return the trained ModelSpec a pointer entry names (absolute path, so loaders need no MODEL_DIR)."""
        folder = (self.project_dir(project) / str(entry["folder"])).resolve()
        rel = str(entry.get("model_path") or "")
        return ModelSpec(
            str(entry["family"]),
            str(entry["name"]),
            str(folder / rel) if rel else str(folder),
            trained=str(entry["version"]),
        )

    def current(self, project: str) -> dict[str, ModelSpec]:
        """Return {pretrained model key: trained spec} of the project's active versions."""
        out = {}
        for key, entry in self.pointer(project).get("models", {}).items():
            try:
                out[str(key)] = self.spec_of(project, entry)
            except (KeyError, TypeError) as exc:
                log.warning("project %s: bad pointer entry for %s: %s", project, key, exc)
        return out

    def model_dir(self, project: str, model_key: str) -> Path:
        """Return where the versions of one model of a project live."""
        return self.project_dir(project) / model_slug(model_key)

    def manifests(self, project: str, model_key: str | None = None) -> list[dict[str, Any]]:
        """Return the manifests of a project's versions (of one model or all), newest first."""
        base = self.project_dir(project)
        if not base.is_dir():
            return []
        folders = (
            [self.model_dir(project, model_key)] if model_key else [p for p in base.iterdir() if p.is_dir()]
        )
        found = []
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _VERSION_RE.match(entry.name)
                if not match or not (entry / MANIFEST).is_file():
                    continue
                try:
                    manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                manifest["folder"] = f"{folder.name}/{entry.name}"
                found.append(manifest)
        return sorted(
            found, key=lambda m: (float(m.get("created_at") or 0), str(m.get("version"))), reverse=True
        )

    def publish(
        self,
        project: str,
        spec: ModelSpec,
        output: Path,
        model_path: str,
        manifest: Mapping[str, Any],
        keep: int,
    ) -> dict[str, Any]:
        """Move a finished model into its version folder (one rename), point the project at it, prune old ones.

        `output` holds the model under model/ (model_path is relative to `output`); the manifest is
        written beside it. The folder appears complete or not at all; the pointer moves after it, in one rename; only
        then are versions beyond the last `keep` removed (never the active one).
        """
        folder = self.model_dir(project, spec.key)
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = weights_fingerprint(output / "model")
        with exclusive_lock(self.project_dir(project) / ".lock"):
            numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name))]
            version = f"v{max(numbers, default=0) + 1}-{fingerprint}"
            entry = {
                **dict(manifest),
                "version": version,
                "model": spec.key,
                "family": spec.family,
                "name": spec.name,
                "model_path": model_path,
                "project": project,
                "created_at": _now(),
            }
            (output / MANIFEST).write_text(json.dumps(entry, ensure_ascii=False, indent=1), encoding="utf-8")
            final = folder / version
            try:
                os.rename(output, final)
            except OSError:  # another file system (MODEL_DIR parts mounted apart): copy, then one rename
                staging = folder / f".{version}.{uuid.uuid4().hex[:6]}.tmp"
                shutil.copytree(output, staging)
                os.rename(staging, final)
                shutil.rmtree(output, ignore_errors=True)
            self._point(project, spec.key, entry, f"{folder.name}/{version}")
            self._prune(project, spec.key, keep)
        entry["folder"] = f"{folder.name}/{version}"
        return entry

    def _point(self, project: str, model_key: str, entry: Mapping[str, Any] | None, folder: str = "") -> None:
        """Set (or with entry None, remove) one model of the project's pointer; caller holds the lock."""
        pointer = self.pointer(project)
        models = dict(pointer.get("models", {}))
        previous = models.get(model_key)
        if entry is None:
            models.pop(model_key, None)
        else:
            models[model_key] = {
                "version": entry["version"],
                "family": entry["family"],
                "name": entry["name"],
                "model_path": entry.get("model_path", ""),
                "folder": folder,
            }
        write_json_atomic(
            self.pointer_path(project),
            {"models": models, "updated_at": _now(), "previous": {model_key: previous}},
        )

    def _prune(self, project: str, model_key: str, keep: int) -> None:
        active = self.pointer(project).get("models", {}).get(model_key, {}).get("version")
        folder = self.model_dir(project, model_key)
        versions = sorted(
            ((int(m.group(1)), p) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name))),
            reverse=True,
        )
        for rank, (_, path) in enumerate(versions):
            if rank >= max(1, keep) and path.name != active:
                shutil.rmtree(path, ignore_errors=True)
                log.info(
                    "project %s: removed old version %s (TRAIN_KEEP_VERSIONS=%d)", project, path.name, keep
                )

    def activate(self, project: str, model_key: str, version: str | None) -> None:
        """Point a project's model at one of its versions, or (version None) back at the pretrained model."""
        with exclusive_lock(self.project_dir(project) / ".lock"):
            if version is None:
                self._point(project, model_key, None)
                return
            folder = self.model_dir(project, model_key) / version
            try:
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise NotFound(f"project {project} has no version {version!r} of {model_key}") from None
            self._point(project, model_key, manifest, f"{folder.parent.name}/{version}")
