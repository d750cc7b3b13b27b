"""What a fetch returns (`Fetched`) and the on-disk LRU of downloaded bytes under MODEL_DIR/cache/data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    """Bytes of one resolved value, with what is known about their type."""

    body: bytes
    content_type: str = ""  # lower-case MIME type without parameters, "" when unknown
    charset: str | None = None
    source: str = ""  # safe_url of where they came from, for messages
    via_label_studio: bool = False


class DiskCache:
    """Bounded on-disk LRU of downloaded bytes (mtime is the access time); never fails a fetch."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self._root = root
        self._max = max_bytes
        self._lock = threading.Lock()
        self._total: int | None = None

    def _path(self, key: str) -> Path:
        return self._root / hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: str) -> Fetched | None:
        """Return the cached entry for key, or None."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        try:
            meta_len = int.from_bytes(raw[:4], "big")
            meta = json.loads(raw[4 : 4 + meta_len])
            body = raw[4 + meta_len :]
            if len(body) != meta["size"]:
                raise ValueError("size mismatch")
        except (ValueError, KeyError, TypeError):
            logger.warning("Dropping a corrupt cache entry %s", path.name)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return Fetched(body, meta.get("content_type", ""), meta.get("charset"), meta.get("source", ""))

    def put(self, key: str, fetched: Fetched) -> None:
        """Store an entry (atomically) and evict the least recently used beyond max_bytes."""
        meta = json.dumps(
            {
                "size": len(fetched.body),
                "content_type": fetched.content_type,
                "charset": fetched.charset,
                "source": fetched.source,
            }
        ).encode()
        blob_size = 4 + len(meta) + len(fetched.body)
        if self._max <= 0 or blob_size > self._max:
            return
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(len(meta).to_bytes(4, "big"))
                fh.write(meta)
                fh.write(fetched.body)
            os.replace(tmp, self._path(key))
        except OSError as exc:
            logger.warning("Cannot write the download cache under %s: %s", self._root, exc)
            return
        with self._lock:
            if self._total is None:
                self._total = self._scan()[1]
            else:
                self._total += blob_size
            if self._total > self._max:
                self._evict()

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        entries: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            with os.scandir(self._root) as it:
                for entry in it:
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    if entry.name.startswith(".tmp-"):
                        if now - st.st_mtime > 3600:  # left by a crashed writer
                            Path(entry.path).unlink(missing_ok=True)
                        continue
                    if entry.is_file():
                        entries.append((st.st_mtime, st.st_size, Path(entry.path)))
        except OSError:
            return [], 0
        return entries, sum(e[1] for e in entries)

    def _evict(self) -> None:
        # Rescan (other worker processes share the folder) and go down to 90% to evict in batches.
        entries, total = self._scan()
        entries.sort()
        target = int(self._max * 0.9)
        for _, size, path in entries:
            if total <= target:
                break
            try:
                path.unlink()
                total -= size
            except FileNotFoundError:
                total -= size
            except OSError:
                continue
        self._total = total
