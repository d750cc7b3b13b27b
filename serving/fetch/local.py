"""file:// task data under allowed folders (batch jobs over a folder, the CLI, training), and `build_resolver`.

A file:// image goes through the same `ImageDecoder` as a download, so a batch job over a folder, the
command line, the trainer and a Ray actor give the same bytes the verdict `/predict` gives.
"""

from __future__ import annotations

import base64
import mimetypes
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from PIL import Image

from serving.errors import InputError
from serving.fetch.audio import Audio, decode_audio
from serving.fetch.cache import Fetched
from serving.fetch.decode import ImageDecoder, Shrink
from serving.fetch.resolver import Resolver, video_sampling
from serving.fetch.video import Sampling, Video, decode_video
from serving.settings import Settings


class LocalFileResolver:
    """Read file:// images and texts under allowed roots; pass every other value to the normal resolver."""

    def __init__(
        self, roots: Sequence[str | Path], fallback: Callable[[], Resolver], settings: Settings | None = None
    ) -> None:
        """Allow file:// under `roots`; `fallback` builds the resolver of every other value (on first use)."""
        self.roots = [Path(r).resolve() for r in roots if str(r)]
        self._fallback_factory = fallback
        self._fallback: Resolver | None = None
        self._lock = threading.Lock()
        self._settings = settings or Settings()
        self._decoder = ImageDecoder(self._settings.max_image_pixels)

    def _inner(self) -> Resolver:
        with self._lock:
            if self._fallback is None:
                self._fallback = self._fallback_factory()
            return self._fallback

    @property
    def client(self) -> Any:
        """Return the Label Studio client of the normal resolver (for /setup's fallback credentials)."""
        return getattr(self._inner(), "client", None)

    def local_path(self, value: str) -> Path:
        """Return the path of a file:// URI under an allowed root; raise InputError otherwise."""
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost"):
            raise InputError(f"file URI {value[:200]!r} names a remote host")
        path = Path(unquote(parts.path)).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise InputError(f"{path} is outside the input folder; refused")
        if not path.is_file():
            raise InputError(f"{path} is not a file")
        return path

    def load_image(self, value: str, task_id: int | None = None, shrink: Shrink | None = None) -> Image.Image:
        """Return an RGB, EXIF-transposed image (a JPEG maybe decoded smaller: see draft_for_model)."""
        if not (isinstance(value, str) and value.startswith("file://")):
            return self._inner().load_image(value, task_id, shrink=shrink)
        path = self.local_path(value)
        try:
            body = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path.name}: {exc.strerror}") from None
        mime = mimetypes.guess_type(path.name)[0] or ""
        return self._decoder.decode(Fetched(body, mime, None, path.name), shrink)

    def load_audio(self, value: str, task_id: int | None = None, *, sample_rate: int = 16000) -> Audio:
        """Return mono float32 audio at sample_rate (file:// decoded by the same decoder as a download)."""
        if not (isinstance(value, str) and value.startswith("file://")):
            return cast(Audio, self._inner().load_audio(value, task_id, sample_rate=sample_rate))
        return decode_audio(self._read_media(value), sample_rate, self._settings.max_audio_seconds)

    def load_video(
        self, value: str, task_id: int | None = None, *, sampling: Sampling | Mapping[str, Any] | None = None
    ) -> Video:
        """Return a video's sampled frames (file:// decoded by the same decoder as a download)."""
        if not (isinstance(value, str) and value.startswith("file://")):
            return cast(Video, self._inner().load_video(value, task_id, sampling=sampling))
        return decode_video(self._read_media(value), video_sampling(self._settings, sampling))

    def _read_media(self, value: str) -> Fetched:
        """Return a file:// audio or video file's bytes (MAX_DOWNLOAD_BYTES applies as to a download)."""
        path = self.local_path(value)
        limit = self._settings.max_download_bytes
        try:
            if limit > 0 and path.stat().st_size > limit:
                raise InputError(f"{path.name} is over MAX_DOWNLOAD_BYTES={limit}")
            body = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path.name}: {exc.strerror}") from None
        mime = mimetypes.guess_type(path.name)[0] or ""
        return Fetched(body, mime, None, path.name)

    def load_text(self, value: Any, task_id: int | None = None, *, as_url: bool | None = None) -> str:
        """Return text (file:// read as UTF-8)."""
        if isinstance(value, str) and value.startswith("file://"):
            return self.local_path(value).read_text(encoding="utf-8", errors="replace")
        kwargs = {} if as_url is None else {"as_url": as_url}
        return str(self._inner().load_text(value, task_id, **kwargs))


def file_to_data_uri(value: str) -> str:
    """Return a data: URI with the bytes of a file:// URI (to send local images to a remote server)."""
    path = Path(unquote(urlsplit(value).path))
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_resolver(settings: Settings, roots: Sequence[str | Path] = ()) -> Resolver:
    """Return the data resolver: http(s), Label Studio, cloud and data: URIs; file:// too under `roots`.

    The one place a resolver is assembled (the runtime, batch engines and the trainer call it). With
    roots, the network resolver is built on first use of a value that needs it.
    """
    from serving.fetch.lsclient import LabelStudioClient
    from serving.fetch.resolver import DataResolver

    def network() -> Resolver:
        return DataResolver(settings, LabelStudioClient(settings))

    if roots:
        return LocalFileResolver(roots, network, settings)
    return network()
