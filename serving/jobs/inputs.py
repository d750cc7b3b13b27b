"""A job's inputs: a JSON list, a JSONL file or a folder of images, streamed into tasks; server-side paths checked."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from serving.errors import BadRequest, ConfigError, NotFound
from serving.settings import Settings

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def normalize_task(obj: Any, where: str = "task") -> dict[str, Any]:
    """Return a Label Studio task: a task object as is, a bare data dict wrapped as {"data": ...}."""
    if not isinstance(obj, dict):
        raise BadRequest(
            f"{where} is a {type(obj).__name__}; each task must be an object (a task or its data)"
        )
    if isinstance(obj.get("data"), dict):
        return obj
    return {"data": obj}


def input_kind(path: Path) -> str:
    """Return "images", "jsonl" or "json" for an input path."""
    if path.is_dir():
        return "images"
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return "jsonl"
    return "json"


def iter_json_file(path: Path) -> Iterator[Any]:
    import ijson

    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
        fh.seek(0)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
            fh.read(3)
        if head[:1] == b"[":
            try:
                yield from ijson.items(fh, "item", use_float=True)
            except ijson.JSONError as exc:
                raise BadRequest(f"{path.name} is not valid JSON: {exc}") from None
            return
        if head[:1] == b"{":
            try:
                yield json.loads(fh.read())
            except ValueError as exc:
                raise BadRequest(f"{path.name} is not valid JSON: {exc}") from None
            return
    raise BadRequest(
        f"{path.name} must hold a JSON list of tasks (or one task object); use .jsonl for JSON lines"
    )


def iter_jsonl_file(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise BadRequest(f"{path.name} line {lineno} is not valid JSON: {exc}") from None


def iter_image_files(folder: Path) -> Iterator[Path]:
    """Yield the image files under a folder, recursively, in a stable (sorted) order; symlinks are skipped."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_symlink() and path.is_file():
                yield path


def image_value(path: Path, folder: Path, settings: Settings, url_prefix: str = "") -> tuple[str, str | None]:
    """Return (data value Label Studio will show, local URI to predict from or None when the same).

    Under LOCAL_FILES_DOCUMENT_ROOT the value is a local-files URL that Label Studio serves and the
    resolver reads from disk; with a URL prefix (where the same files are published) it is prefix +
    relative path; otherwise a file:// URI.
    """
    real = path.resolve()
    root = settings.local_files_document_root
    if root:
        root_real = Path(root).resolve()
        if real.is_relative_to(root_real):
            return "/data/local-files/?d=" + quote(real.relative_to(root_real).as_posix(), safe="/"), None
    local = real.as_uri()
    if url_prefix:
        rel = path.relative_to(folder).as_posix()
        return url_prefix.rstrip("/") + "/" + quote(rel, safe="/"), local
    return local, None


def iter_source(
    path: Path, settings: Settings, image_key: str | None, url_prefix: str = ""
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Yield (task, local URI or None) from a JSON list, a JSONL file or a folder of images."""
    kind = input_kind(path)
    if kind == "images":
        if not image_key:
            raise ConfigError(
                'a folder of images needs an <Image name=... value="$image"/> in the labeling config'
            )
        for file in iter_image_files(path):
            value, local = image_value(file, path, settings, url_prefix)
            yield {"data": {image_key: value}}, local
        return
    items = iter_jsonl_file(path) if kind == "jsonl" else iter_json_file(path)
    for i, obj in enumerate(items):
        yield normalize_task(obj, f"task #{i} of {path.name}"), None


def resolve_input_path(settings: Settings, raw: Any) -> Path:
    """Return a server-side input path under BATCH_INPUT_ROOT; refuse anything outside it."""
    root = getattr(settings, "batch_input_root", "")
    if not root:
        raise BadRequest(
            "server-side inputs are off: set BATCH_INPUT_ROOT on the server, or send 'tasks' inline"
        )
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise BadRequest(
            "'input' must be a path (relative to BATCH_INPUT_ROOT) of a .json/.jsonl file or a folder"
        )
    root_real = Path(root).resolve()
    candidate = Path(raw)
    real = (candidate if candidate.is_absolute() else root_real / candidate).resolve()
    if not real.is_relative_to(root_real):
        raise BadRequest(f"input {raw!r} is outside BATCH_INPUT_ROOT; give a path under it")
    if not real.exists():
        raise NotFound(f"input {raw!r} does not exist under BATCH_INPUT_ROOT")
    return real
