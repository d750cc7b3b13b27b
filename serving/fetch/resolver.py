"""Resolve task data: http(s) URLs, Label Studio uploads, local files, cloud URIs, data: URIs, inline text.

Every failure for one task raises InputError with a reason that says what to fix; the runtime turns it
into an empty prediction. Downloads are bounded in time (one deadline per fetch, enforced by a watchdog
that shuts the socket down: transport.py) and size, redirects are followed by hand so that every hop is
re-checked against the URL policy (policy.py: cloud metadata addresses, allow-list, private addresses),
and Label Studio's Authorization header is only ever sent to Label Studio's own origin. Bytes become
images and text in decode.py, the one decoder every path shares.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import mimetypes
import os
import posixpath
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urljoin, urlsplit

import requests
from PIL import Image

from serving.errors import InputError
from serving.fetch.audio import Audio, decode_audio
from serving.fetch.cache import DiskCache, Fetched
from serving.fetch.decode import ImageDecoder, Shrink, decode_text, scrub_surrogates
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.policy import UrlPolicy, install_log_redaction, safe_url
from serving.fetch.transport import WATCHDOG, Deadline, describe_error, make_session, this_fetch
from serving.fetch.video import Sampling, Video, decode_video
from serving.settings import Settings

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 5.0
RETRY_BACKOFF_S = (0.2, 0.5)  # 3 tries in all, only for connection errors and 429/5xx
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
LS_PATH_PREFIXES = ("/data/", "/storage-data/")
USER_AGENT = "ls-ml-server/0.1 (Label Studio ML backend)"


class Resolver(Protocol):
    """What the runtime, jobs and training need from a data resolver (DataResolver, LocalFileResolver, fakes)."""

    def load_image(self, value: str, task_id: int | None = None, shrink: Shrink | None = None) -> Any: ...

    def load_text(self, value: str, task_id: int | None = None, *, as_url: bool | None = None) -> str: ...

    def load_audio(self, value: str, task_id: int | None = None, *, sample_rate: int = 16000) -> Any: ...

    def load_video(
        self, value: str, task_id: int | None = None, *, sampling: Sampling | Mapping[str, Any] | None = None
    ) -> Any: ...


def _media_type(header: str | None) -> tuple[str, str | None]:
    """Split a Content-Type header into (mime type, charset)."""
    if not header:
        return "", None
    parts = [p.strip() for p in header.split(";")]
    charset = None
    for p in parts[1:]:
        name, _, value = p.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip("\"'")
    return parts[0].lower(), charset


def _b64decode_padded(text: str) -> bytes:
    """Decode strict base64, adding the padding that some writers leave out."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


_TEXT_REF_PREFIXES = ("http://", "https://", "data:", *CLOUD_SCHEMES)


def is_reference(value: str) -> bool:
    """Return True when a string is a URL or Label Studio path rather than inline text."""
    s = value.strip()
    if not s or any(c.isspace() for c in s):
        return False
    return s.lower().startswith(_TEXT_REF_PREFIXES) or s.startswith(
        ("/data/upload/", "/data/local-files", "/storage-data/")
    )


class DataResolver:
    """Turn the values of task.data into bytes, RGB images and text, safely; thread-safe."""

    def __init__(
        self, settings: Settings, client: LabelStudioClient, http: requests.Session | None = None
    ) -> None:
        """Fetch with `client`'s credentials for Label Studio, through `http` (a watched session by default)."""
        self._settings = settings
        self._client = client
        install_log_redaction()
        pool = max(16, 2 * int(getattr(settings, "preprocess_threads", 8)))
        self._http = http if http is not None else make_session(pool)
        self._policy = UrlPolicy(settings, client)
        self._cache = (
            DiskCache(Path(settings.model_dir) / "cache" / "data", settings.cache_max_bytes)
            if settings.cache_max_bytes > 0
            else None
        )
        self._decoder = ImageDecoder(settings.max_image_pixels)

    # ------------------------------------------------------------------ public API

    @property
    def client(self) -> LabelStudioClient:
        """Return the Label Studio client (for /setup's fallback credentials)."""
        return self._client

    def fetch_bytes(self, url: str, task_id: int | None = None) -> bytes:
        """Return the bytes behind a URL, Label Studio path, cloud URI or data: URI."""
        return self.fetch(url, task_id).body

    def fetch(self, url: str, task_id: int | None = None) -> Fetched:
        """Return the bytes behind a reference with their content type and source."""
        if not isinstance(url, str):
            raise InputError(f"expected a URL string, got {type(url).__name__}")
        try:
            return self._fetch(url.strip(), task_id)
        except InputError:
            raise
        except Exception as exc:  # bad input must never escape as another type
            logger.exception("Unexpected error resolving %s", safe_url(url))
            raise InputError(f"cannot fetch {safe_url(url)}: {type(exc).__name__}") from None

    def load_image(self, value: str, task_id: int | None = None, shrink: Shrink | None = None) -> Image.Image:
        """Return the image behind value as RGB, EXIF-transposed (as Label Studio shows it).

        With `shrink` (see draft_for_model) a JPEG may decode smaller; its info[ORIGINAL_SIZE] then
        holds the size Label Studio shows.
        """
        return self._decoder.decode(self.fetch(value, task_id), shrink)

    def load_audio(self, value: str, task_id: int | None = None, *, sample_rate: int = 16000) -> Audio:
        """Return the audio behind value as mono float32 at sample_rate (MAX_AUDIO_SECONDS enforced)."""
        return decode_audio(self.fetch(value, task_id), sample_rate, self._settings.max_audio_seconds)

    def load_video(
        self, value: str, task_id: int | None = None, *, sampling: Sampling | Mapping[str, Any] | None = None
    ) -> Video:
        """Return the sampled frames of the video behind value (VIDEO_* settings, changed by `sampling`)."""
        return decode_video(self.fetch(value, task_id), video_sampling(self._settings, sampling))

    def load_text(self, value: Any, task_id: int | None = None, *, as_url: bool | None = None) -> str:
        """Return text: value itself, or the decoded download when it is a URL (as_url forces either way)."""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InputError(f"expected text for this task, got {type(value).__name__}")
        text = value if isinstance(value, str) else str(value)
        fetch = is_reference(text) if as_url is None else as_url
        limit = self._settings.max_text_chars
        if fetch:
            fetched = self.fetch(text, task_id)
            try:
                text = decode_text(fetched)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(
                    f"cannot decode the text from {fetched.source}: {type(exc).__name__}"
                ) from None
        if limit > 0 and len(text) > limit:
            raise InputError(f"text has {len(text)} characters, over MAX_TEXT_CHARS={limit}")
        return scrub_surrogates(text)

    # ------------------------------------------------------------------ dispatch

    def _fetch(self, ref: str, task_id: int | None) -> Fetched:
        if not ref:
            raise InputError("empty URL: the task's data field is empty")
        low = ref.lower()
        if low.startswith("data:"):
            return self._data_uri(ref)
        if low.startswith(CLOUD_SCHEMES):
            return self._download(self._presign_url(ref, task_id), cacheable=False)
        if ref.startswith(("upload/", "/upload/")):  # raw upload keys found in some exports
            ref = "/data/" + ref.lstrip("/")
        if ref.startswith("/"):
            return self._fetch_path(ref)
        if low.startswith(("http://", "https://")):
            root = self._settings.local_files_document_root
            if root and self._client.is_label_studio(ref) and self._is_local_files(ref):
                local = self._read_local(ref, root)
                if local is not None:
                    return local
            return self._download(ref, cacheable=True)
        scheme, sep, _ = ref.partition(":")
        if sep and scheme.isalnum() and len(scheme) < 20:
            raise InputError(
                f"unsupported URL scheme {scheme!r}: use http(s), /data/upload, /data/local-files, "
                "s3/gs/azure-blob (through Label Studio) or data: URIs"
            )
        raise InputError(f"{safe_url(ref, 80)!r} is not a URL, a Label Studio path or a data: URI")

    def _fetch_path(self, ref: str) -> Fetched:
        """Fetch a Label Studio path (/data/upload/..., /data/local-files/?d=...): from disk when allowed."""
        root = self._settings.local_files_document_root
        if root and self._is_local_files(ref):
            local = self._read_local(ref, root)
            if local is not None:
                return local
        if not ref.startswith(LS_PATH_PREFIXES):
            raise InputError(
                f"{safe_url(ref)} is a relative path but not a Label Studio upload (/data/upload/...) "
                "or local-files (/data/local-files/?d=...) URL"
            )
        base = self._client.base_url
        if not base:
            raise InputError(
                f"cannot download {safe_url(ref)}: Label Studio's URL is unknown; set LABEL_STUDIO_URL "
                "and LABEL_STUDIO_API_KEY"
            )
        return self._download(base + ref, cacheable=True)

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        scheme = uri.split(":", 1)[0]
        if task_id is None:
            raise InputError(
                f"{scheme}:// URIs are presigned by Label Studio per task, and this request has no task id: "
                "send the task (with its id) or use an http(s) URL"
            )
        try:
            tid = int(task_id)
            if isinstance(task_id, bool) or tid < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(f"task id {task_id!r} is not a non-negative integer") from None
        base = self._client.base_url
        if not base:
            raise InputError(
                f"cannot presign {safe_url(uri)}: Label Studio's URL is unknown; set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY"
            )
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return f"{base}/tasks/{tid}/presign/?fileuri={fileuri}"  # urlsafe base64 needs no quoting

    @staticmethod
    def _is_local_files(url: str) -> bool:
        try:
            return urlsplit(url).path.rstrip("/").endswith("/data/local-files")
        except ValueError:
            return False

    # ------------------------------------------------------------------ local files and data: URIs

    def _read_local(self, url: str, root: str) -> Fetched | None:
        """Read a local-files URL under LOCAL_FILES_DOCUMENT_ROOT; None when missing (download it instead)."""
        values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise InputError(f"{safe_url(url)} has no file path in ?d=")
        if "\x00" in relative:
            raise InputError("local-files path contains a NUL byte")
        # Label Studio's own rule: ?d= is relative to the root ("/a.jpg" is <root>/a.jpg), normalised once.
        normalized = posixpath.normpath(relative).lstrip("/")
        root_real = os.path.realpath(root)
        full = os.path.realpath(os.path.join(root_real, normalized))
        if (
            normalized == ".."
            or normalized.startswith("../")
            or os.path.commonpath([root_real, full]) != root_real
        ):
            raise InputError(
                f"local-files path {relative[:200]!r} is outside LOCAL_FILES_DOCUMENT_ROOT: refused"
            )
        try:
            st = os.stat(full)
        except FileNotFoundError:
            if self._client.base_url:
                logger.info(
                    "%r is not under LOCAL_FILES_DOCUMENT_ROOT; downloading it from Label Studio", relative
                )
                return None
            raise InputError(
                f"local file {relative[:200]!r} not found under LOCAL_FILES_DOCUMENT_ROOT"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot read local file {relative[:200]!r}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"local-files path {relative[:200]!r} is not a regular file")
        limit = self._settings.max_download_bytes
        if limit > 0 and st.st_size > limit:
            raise InputError(
                f"local file {relative[:200]!r} is {st.st_size} bytes, over MAX_DOWNLOAD_BYTES={limit}"
            )
        try:
            with open(full, "rb") as fh:
                body = fh.read(limit + 1 if limit > 0 else -1)
        except OSError as exc:
            raise InputError(f"cannot read local file {relative[:200]!r}: {exc.strerror}") from None
        if limit > 0 and len(body) > limit:
            raise InputError(f"local file {relative[:200]!r} is over MAX_DOWNLOAD_BYTES={limit}")
        mime = mimetypes.guess_type(full)[0] or ""
        return Fetched(body, mime, None, f"local-files:{relative[:200]}")

    def _data_uri(self, ref: str) -> Fetched:
        header, sep, payload = ref[5:].partition(",")
        if not sep:
            raise InputError("malformed data: URI (no comma before the data)")
        params = [p.strip() for p in header.split(";")]
        mime = params[0].lower() or "text/plain"
        is_b64 = any(p.lower() == "base64" for p in params[1:])
        charset = next((p.split("=", 1)[1] for p in params[1:] if p.lower().startswith("charset=")), None)
        limit = self._settings.max_download_bytes
        estimate = len(payload) * 3 // 4 if is_b64 else len(payload) // 3
        if limit > 0 and estimate > limit:
            raise InputError(f"data: URI holds about {estimate} bytes, over MAX_DOWNLOAD_BYTES={limit}")
        if is_b64:
            text = unquote(payload) if "%" in payload else payload
            text = text.replace("-", "+").replace("_", "/")
            try:
                body = _b64decode_padded(text)
            except (binascii.Error, ValueError):
                try:  # line breaks or spaces inside (MIME style): drop them and try once more
                    body = _b64decode_padded("".join(text.split()))
                except (binascii.Error, ValueError):
                    raise InputError("data: URI is marked base64 but is not valid base64") from None
        else:
            body = unquote_to_bytes(payload)
        if limit > 0 and len(body) > limit:
            raise InputError(f"data: URI holds {len(body)} bytes, over MAX_DOWNLOAD_BYTES={limit}")
        return Fetched(body, mime, charset, safe_url(ref))

    # ------------------------------------------------------------------ URL policy

    def check_url(self, url: str) -> None:
        """Refuse a URL that this server must not fetch (scheme, metadata address, allow-list, private).

        Inside a fetch, the approved addresses are pinned: the connection goes to them and no other.
        """
        self._policy.check(url)

    # ------------------------------------------------------------------ HTTP

    def _timeout_error(self, url: str) -> InputError:
        return InputError(
            f"download of {safe_url(url)} timed out after {self._settings.download_timeout_s:g} s "
            "(DOWNLOAD_TIMEOUT_S)"
        )

    def _backoff(self, attempt: int, deadline: Deadline) -> bool:
        wait = RETRY_BACKOFF_S[attempt]
        if deadline.remaining() <= wait:
            return False
        time.sleep(wait)
        return True

    @staticmethod
    def _skip_redirect_body(resp: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        """Stop requests from reading a redirect's body (unbounded) to prepare a next hop we never use."""
        if resp.is_redirect:
            try:
                resp.raw.close()  # the connection is not reused with an unread body
            except Exception:
                pass
            resp._content = b""
            resp._content_consumed = True  # type: ignore[attr-defined]
        return resp

    def _send(self, url: str, headers: dict[str, str], deadline: Deadline) -> requests.Response:
        """GET url (headers only, body streamed), retrying connection errors and 429/5xx with backoff."""
        tries = len(RETRY_BACKOFF_S) + 1
        for attempt in range(tries):
            remaining = deadline.remaining()
            if remaining <= 0:
                raise self._timeout_error(url)
            try:
                resp = self._http.get(
                    url,
                    headers=headers,
                    stream=True,
                    allow_redirects=False,
                    timeout=(min(remaining, CONNECT_TIMEOUT_S), remaining),
                    hooks={"response": [self._skip_redirect_body]},
                )
            except requests.exceptions.SSLError as exc:
                raise InputError(f"TLS error talking to {safe_url(url)}: {describe_error(exc)}") from None
            except requests.exceptions.ConnectionError as exc:
                if deadline.expired():
                    raise self._timeout_error(url) from None
                if attempt + 1 < tries and self._backoff(attempt, deadline):
                    logger.info("Retrying %s after %s", safe_url(url), describe_error(exc))
                    continue
                raise InputError(
                    f"cannot connect to {safe_url(url)}: {describe_error(exc)} (after {attempt + 1} tries)"
                ) from None
            except requests.exceptions.Timeout:
                raise self._timeout_error(url) from None
            except requests.RequestException as exc:
                if deadline.expired():
                    raise self._timeout_error(url) from None
                raise InputError(f"request to {safe_url(url)} failed: {describe_error(exc)}") from None
            except (UnicodeError, ValueError) as exc:  # e.g. a Location header that is not UTF-8
                raise InputError(f"malformed response from {safe_url(url)}: {type(exc).__name__}") from None
            status = resp.status_code
            if (status == 429 or status >= 500) and attempt + 1 < tries and self._backoff(attempt, deadline):
                resp.close()
                logger.info("Retrying %s after HTTP %d", safe_url(url), status)
                continue
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _status_error(self, status: int, url: str, is_ls: bool) -> InputError:
        where = safe_url(url)
        if is_ls and status in {401, 403}:
            kind = self._client.token_kind
            return InputError(
                f"Label Studio refused the download of {where} (HTTP {status}, API key: {kind}): set "
                "LABEL_STUDIO_API_KEY to a valid personal access token (or a legacy token, if enabled) and "
                "LABEL_STUDIO_URL to this Label Studio"
            )
        if status in {401, 403}:
            return InputError(
                f"HTTP {status} from {where}: the URL needs credentials this server does not have"
            )
        if status == 404:
            return InputError(f"not found (HTTP 404): {where}")
        if status == 429 or status >= 500:
            return InputError(f"HTTP {status} from {where} (retried with backoff within DOWNLOAD_TIMEOUT_S)")
        return InputError(f"HTTP {status} from {where}")

    def _read_body(self, resp: requests.Response, deadline: Deadline, url: str) -> bytes:
        limit = self._settings.max_download_bytes
        length = resp.headers.get("Content-Length", "")
        if limit > 0 and length.strip().isdigit() and int(length) > limit:
            raise InputError(f"{safe_url(url)} is {int(length)} bytes, over MAX_DOWNLOAD_BYTES={limit}")
        raw = resp.raw
        read1 = getattr(raw, "read1", None)
        buf = bytearray()
        while True:
            if deadline.expired():
                raise self._timeout_error(url)
            try:
                chunk = (
                    read1(CHUNK_BYTES, decode_content=True)
                    if read1 is not None
                    else raw.read(CHUNK_BYTES, decode_content=True)
                )
            except Exception as exc:  # urllib3/ssl/socket errors mid-body, all mean "broken download"
                if deadline.expired():
                    raise self._timeout_error(url) from None
                raise InputError(f"download of {safe_url(url)} broke off: {describe_error(exc)}") from None
            if not chunk:
                break
            buf += chunk
            if limit > 0 and len(buf) > limit:
                raise InputError(f"{safe_url(url)} is over MAX_DOWNLOAD_BYTES={limit}")
        if deadline.expired():  # the watchdog may have cut the body short
            raise self._timeout_error(url)
        return bytes(buf)

    def _download(self, url: str, *, cacheable: bool) -> Fetched:
        """GET url with the deadline, size limit, manual re-checked redirects, LS auth and the disk cache."""
        previous_pins = getattr(this_fetch, "pinned", None)
        this_fetch.pinned = {}
        try:
            return self._download_pinned(url, cacheable)
        finally:
            this_fetch.pinned = previous_pins

    def _download_pinned(self, url: str, cacheable: bool) -> Fetched:
        self.check_url(url)
        cache = self._cache if cacheable else None
        if cache is not None and (hit := cache.get(url)) is not None:
            return Fetched(
                hit.body, hit.content_type, hit.charset, hit.source, self._client.is_label_studio(url)
            )
        started = time.monotonic()
        deadline = Deadline(started + max(float(self._settings.download_timeout_s), 0.01))
        previous = getattr(this_fetch, "deadline", None)
        this_fetch.deadline = deadline
        WATCHDOG.add(deadline)
        try:
            fetched, no_store = self._follow(url, deadline)
        finally:
            deadline.finish()
            this_fetch.deadline = previous
        logger.debug(
            "Fetched %s: %d bytes in %.0f ms",
            fetched.source,
            len(fetched.body),
            (time.monotonic() - started) * 1e3,
        )
        if cache is not None and not no_store:
            cache.put(url, fetched)
        return fetched

    def _follow(self, url: str, deadline: Deadline) -> tuple[Fetched, bool]:
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            if hop:
                self.check_url(current)
            is_ls = self._client.is_label_studio(current)
            headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
            if is_ls:
                headers.update(self._client.auth_headers())
            resp = self._send(current, headers, deadline)
            if resp.status_code == 401 and is_ls and self._client.token_kind == "pat":
                resp.close()
                rejected = headers.get("Authorization")
                headers.update(self._client.auth_headers(force_refresh=True, rejected=rejected))
                resp = self._send(current, headers, deadline)
            try:
                if resp.status_code in REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise InputError(
                            f"HTTP {resp.status_code} from {safe_url(current)} without a Location"
                        )
                    current = urljoin(current, location.strip())
                    continue
                if resp.status_code >= 400:
                    raise self._status_error(resp.status_code, current, is_ls)
                if resp.status_code >= 300 or resp.status_code < 200:
                    raise InputError(f"unexpected HTTP {resp.status_code} from {safe_url(current)}")
                body = self._read_body(resp, deadline, current)
                mime, charset = _media_type(resp.headers.get("Content-Type"))
                no_store = "no-store" in resp.headers.get("Cache-Control", "").lower()
                return Fetched(body, mime, charset, safe_url(current), is_ls), no_store
            finally:
                resp.close()
        raise InputError(
            f"too many redirects (more than {MAX_REDIRECTS}) from {safe_url(url)}: a redirect loop?"
        )


def video_sampling(settings: Settings, change: Sampling | Mapping[str, Any] | None = None) -> Sampling:
    """Return how videos are sampled: the VIDEO_* settings, or `change` (a Sampling, or the fields it sets)."""
    if isinstance(change, Sampling):
        return change
    base = Sampling(
        fps=settings.video_sample_fps,
        max_frames=settings.video_max_frames,
        max_side=settings.video_frame_max_side,
        max_seconds=settings.max_video_seconds,
    )
    return dataclasses.replace(base, **dict(change)) if change else base
