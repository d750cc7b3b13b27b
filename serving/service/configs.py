"""The labeling configs this server has served, kept under MODEL_DIR so `/versions` survives restarts.

Label Studio's model-version picker calls `GET /versions` without a project. The answer is the
versions this server can serve now: model_version is a pure function of a config's models and
their weights, so it is recomputed from every config seen (never a stale list of strings, and
never a version whose weights are gone). Every worker and replica sharing MODEL_DIR sees the same
files; each config is written once (atomic rename), the oldest beyond `limit` are dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class SeenConfigs:
    """Labeling configs seen by /setup and /predict, one file each under `folder`, newest first."""

    def __init__(self, folder: Path, limit: int = 256) -> None:
        """Remember where configs live; nothing is read or written until used."""
        self.folder = folder
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def key(label_config: str) -> str:
        """Return the file stem of a config (a content hash)."""
        return hashlib.sha1(label_config.encode("utf-8", "replace")).hexdigest()[:16]

    def add(self, label_config: str) -> None:
        """Record a config (once per process; cheap after the first call); never raises."""
        key = self.key(label_config)
        with self._lock:
            if key in self._known:
                return
            self._known.add(key)
        path = self.folder / f"{key}.xml"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.exists():
                os.utime(path)  # seen again: newest
                return
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".config-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(label_config)
            os.replace(tmp, path)
            self._trim()
        except OSError as exc:  # a read-only MODEL_DIR must not fail /setup
            log.warning("could not record the labeling config under %s: %s", self.folder, exc)

    def _trim(self) -> None:
        files = self._files()
        for old in files[self.limit :]:
            try:
                old.unlink()
            except OSError:
                pass

    def _files(self) -> list[Path]:
        try:
            files = [p for p in self.folder.glob("*.xml") if p.is_file()]
        except OSError:
            return []
        stamped = []
        for p in files:
            try:
                stamped.append((p.stat().st_mtime_ns, p))
            except OSError:
                continue
        return [p for _, p in sorted(stamped, key=lambda sp: (-sp[0], sp[1].name))]

    def configs(self) -> list[str]:
        """Return every recorded config, most recently seen first."""
        out = []
        for path in self._files()[: self.limit]:
            try:
                out.append(path.read_text(encoding="utf-8"))
            except OSError:
                continue
        return out
