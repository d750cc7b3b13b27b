"""Resolve task data: http(s) URLs, Label Studio uploads, local files, cloud URIs, data: URIs, inline text.

Every failure for one task raises InputError with a reason that says what to fix; the runtime turns it
into an empty prediction. Downloads are bounded in time (one deadline per fetch, enforced by a watchdog
that shuts the socket down) and size, redirects are followed by hand so that every hop is re-checked
against the URL policy (cloud metadata addresses, allow-list, private addresses), and Label Studio's
Authorization header is only ever sent to Label Studio's own origin.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import concurrent.futures
import hashlib
import heapq
import io
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import posixpath
import re
import socket
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter

from serving.errors import InputError
from serving.lsclient import LabelStudioClient
from serving.settings import Settings

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 5.0
RETRY_BACKOFF_S = (0.2, 0.5)  # 3 tries in all, only for connection errors and 429/5xx
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
LS_PATH_PREFIXES = ("/data/", "/storage-data/")
DNS_CACHE_S = 30.0
USER_AGENT = "ls-ml-server/0.1 (Label Studio ML backend)"
# Given an image's (width, height) as shown, the scale its model resizes it to (<= 1 means shrink).
Shrink = Callable[[tuple[int, int]], float]
# Formats Pillow may open: common raster formats only (no EPS, which would run Ghostscript, nor exotic parsers).
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "AVIF")

# Cloud instance metadata endpoints: refused whatever the settings (AWS, GCP, Azure, Alibaba, Oracle).
_METADATA_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32", "192.0.0.192/32")
)
_METADATA_HOSTNAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SENSITIVE_PARAM = re.compile(r"sig|token|key|credential|secret|pass|auth|session|policy|code", re.IGNORECASE)
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\"\)\]]+")


def safe_url(url: str, limit: int = 200) -> str:
    """Return url fit for logs and error messages: no userinfo, sensitive query values masked, truncated."""
    if url[:5].lower() == "data:":
        head = url[: min(url.find(",") if "," in url else 40, 60)]
        return f"{head},…({len(url)} chars)"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return url[:limit]
    query = "&".join(
        f"{k}={'***' if _SENSITIVE_PARAM.search(k) else v}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    if "[" in parts.netloc:
        host = f"[{host}]"
    netloc = host + port if parts.netloc else ""
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    out = out + ("?" + query if query else "")
    return out if len(out) <= limit else out[: limit - 1] + "…"


_SENSITIVE_QUERY = re.compile(
    r"([?&][^=&\s\"']*(?:sig|token|key|credential|secret|pass|auth|session|policy|code)[^=&\s\"']*=)[^&\s\"']+",
    re.IGNORECASE,
)


class RedactQueryFilter(logging.Filter):
    """Mask signed-URL secrets in log lines of libraries that log full URLs (urllib3 at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        redacted = _SENSITIVE_QUERY.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def install_log_redaction() -> None:
    """Attach RedactQueryFilter to urllib3's loggers (idempotent)."""
    for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryFilter) for f in target.filters):
            target.addFilter(RedactQueryFilter())


def _describe(exc: BaseException) -> str:
    """Return a short reason for a network error, without the URL (which may hold a signature)."""
    text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e is not None)
    found = _ERRNO_TEXT.search(text)
    if found:
        return found.group(0).strip()
    for word in (
        "timed out",
        "Connection refused",
        "Connection reset",
        "Remote end closed",
        "SSL",
        "certificate",
    ):
        if word.lower() in text.lower():
            return word
    return type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Deadline watchdog: a read timeout bounds each recv(), not a whole download; a server that drips
# one byte at a time (in the headers or the body) would otherwise hold a worker for ever.


class _Deadline:
    """One fetch's deadline; when it passes, the sockets it used are shut down (unblocking any read)."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.done = False
        self._socks: list[Any] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Return the seconds left (<= 0 when expired)."""
        return self.at - time.monotonic()

    def expired(self) -> bool:
        """Return True when the deadline passed or the watchdog fired."""
        return self.fired or self.remaining() <= 0

    def watch(self, sock: Any) -> None:
        """Register a socket to shut down at the deadline."""
        with self._lock:
            if self.fired:
                _shutdown(sock)
            else:
                self._socks.append(sock)

    def fire(self) -> None:
        """Shut down every registered socket unless the fetch already finished."""
        with self._lock:
            if self.done:
                return
            self.fired = True
            for sock in self._socks:
                _shutdown(sock)
            self._socks.clear()

    def finish(self) -> None:
        """Mark the fetch finished: the watchdog leaves its sockets (maybe pooled) alone."""
        with self._lock:
            self.done = True
            self._socks.clear()


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError, AttributeError):
        pass


class _Watchdog:
    """One daemon thread that fires expired deadlines (a heap, not a Timer thread per download)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, deadline = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                heapq.heappop(self._heap)
            deadline.fire()


_WATCHDOG = _Watchdog()
_local = threading.local()
# Threads for DNS lookups, so that one can be abandoned at its timeout (a hung one keeps its thread).
_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")


def _pinned_addresses(host: str, port: int | None) -> list[str]:
    """Return the addresses check_url approved for host:port in this thread's current fetch, if any."""
    pinned: dict[tuple[str, int | None], list[str]] | None = getattr(_local, "pinned", None)
    if not pinned:
        return []
    return pinned.get((host.lower().rstrip("."), port), [])


class _WatchMixin:
    """Connect only to the addresses the URL policy approved; register sockets with the fetch's deadline.

    Connecting to the checked addresses (not to a second DNS answer) is what stops DNS rebinding: a
    host that answers a public address to the check and a private or metadata one to the connect.
    The TLS handshake still names and verifies the host.
    """

    _dns_host: str  # urllib3's connect target (its `host` property reads it too)

    def _new_conn(self) -> Any:
        addrs = _pinned_addresses(self.host, self.port)  # type: ignore[attr-defined]
        if not addrs:
            return super()._new_conn()  # type: ignore[misc]
        original = self._dns_host
        error: Exception | None = None
        try:
            for addr in addrs:
                self._dns_host = addr
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
                    error = exc
        finally:
            self._dns_host = original
        assert error is not None
        raise error

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        deadline = getattr(_local, "deadline", None)
        sock = getattr(self, "sock", None)
        if deadline is not None and sock is not None:
            deadline.watch(sock)
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_WatchMixin, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchMixin, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report their sockets to the current deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def make_session(pool_size: int = 16) -> requests.Session:
    """Return a requests Session whose downloads obey the per-fetch deadline watchdog."""
    session = requests.Session()
    adapter = _WatchedAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ----------------------------------------------------------------------------------------------


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


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _is_metadata_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_ipv4(ip)) is not None:
        candidates.append(v4)
    return any(c in net for c in candidates for net in _METADATA_NETS if c.version == net.version)


def _is_public_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_ipv4(ip)) is not None:
        return v4.is_global
    return ip.is_global


def _host_matches(host: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        p = pattern.strip().lower().rstrip(".")
        if p.startswith("*."):
            if host.endswith(p[1:]):
                return True
        elif host == p:
            return True
    return False


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


def _looks_like_html(body: bytes, content_type: str) -> bool:
    head = body[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return content_type in {"text/html", "application/xhtml+xml"} or head.startswith(
        (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<script")
    )


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float single-channel images to 8-bit RGB (Pillow would clip)."""
    arr = np.asarray(im)
    if im.mode == "F":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if lo >= 0.0 and hi <= 1.0:
            gray = np.rint(values * 255.0)
        else:
            gray = np.rint((values - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(values)
    else:
        values = arr.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 65535:
            gray = (values + 128) // 257  # 16-bit full range -> 8-bit, rounded
        else:
            gray = (values - lo) * 255 // (hi - lo) if hi > lo else np.zeros_like(values)
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
            logger.debug("CMYK ICC conversion failed (%s); using the plain formula", exc)
    return im.convert("RGB")


# PIL image info key under which a shrunk decode keeps the original (EXIF-oriented) width and height.
ORIGINAL_SIZE = "lsml_original_size"
# EXIF orientations that swap width and height (transposed / rotated by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def draft_for_model(im: Image.Image, shrink: Shrink | None) -> tuple[int, int] | None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the model shrinks it at least that much anyway.

    `shrink` gives, for the image's (EXIF-oriented) size, the scale the model resizes it to; libjpeg's
    DCT scaling then skips most of the decode (a 12-megapixel photo for an 800-pixel detector decodes at
    half size, ~2x faster). Never below the model's size: the model still resizes from a larger image.
    Returns the original oriented size when the decode was reduced, else None.
    """
    if shrink is None or im.format not in ("JPEG", "MPO"):
        return None
    width, height = im.size
    try:
        swapped = im.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS
    except Exception:  # broken EXIF: orientation is ignored later too
        swapped = False
    oriented = (height, width) if swapped else (width, height)
    try:
        scale = float(shrink(oriented))
    except Exception:  # a hint only: decode in full rather than fail the task
        logger.debug("input_scale failed for a %dx%d image; decoding in full", *oriented, exc_info=True)
        return None
    if not 0 < scale <= 0.5:  # libjpeg's smallest step is 1/2
        return None
    im.draft(im.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
    return oriented if im.size != (width, height) else None


def _b64decode_padded(text: str) -> bytes:
    """Decode strict base64, adding the padding that some writers leave out."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha composited on white, 16-bit scaled, CMYK through its profile."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _high_depth_to_rgb(im)
    if mode == "P":
        return _composite_on_white(im) if "transparency" in im.info else im.convert("RGB")
    if mode in {"RGBA", "RGBa", "LA", "La", "PA"} or "transparency" in im.info:
        return _composite_on_white(im)
    return im.convert("RGB")


# Tie-break among equally plausible guesses: the most used legacy charsets first.
_COMMON_CHARSETS = (
    "cp1252",
    "latin_1",
    "iso8859_15",
    "cp1250",
    "cp1251",
    "gb18030",
    "cp932",
    "euc_kr",
    "big5",
)


def _detect_charset(body: bytes) -> tuple[str, str] | None:
    """Guess a legacy charset: most coherent language first, then least chaos, then the most common."""
    try:
        import charset_normalizer

        # BOM-less UTF-16/32 guesses are noise here (text with NUL bytes is refused before).
        matches = [
            m for m in charset_normalizer.from_bytes(body) if not m.encoding.startswith(("utf_16", "utf_32"))
        ]
    except Exception:  # a detector failure only means "unknown encoding"
        return None
    if not matches:
        return None

    # charset_normalizer's own best() ranks by chaos alone and picks e.g. mac_latin2 for French cp1252 text.
    def rank(m: Any) -> tuple[float, float, int]:
        common = (
            _COMMON_CHARSETS.index(m.encoding) if m.encoding in _COMMON_CHARSETS else len(_COMMON_CHARSETS)
        )
        return -round(m.coherence, 2), round(m.chaos, 2), common

    best = min(matches, key=rank)
    return best.encoding, str(best)


def _decode_text(fetched: Fetched) -> str:
    """Decode downloaded text: BOM, then declared charset, then UTF-8, then a detected charset."""
    body = fetched.body
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if body.startswith(bom):
            try:
                return body.decode(encoding)
            except UnicodeDecodeError:
                break
    if fetched.charset:
        try:
            return body.decode(fetched.charset)
        except (LookupError, UnicodeDecodeError):
            logger.info("Text from %s is not valid %s as declared", fetched.source, fetched.charset)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        first_bad = exc.start
    if b"\x00" in body:
        raise InputError(f"{fetched.source} is binary data, not text")
    best = _detect_charset(body)
    if best is not None:
        logger.info("Text from %s decoded as %s (detected)", fetched.source, best[0])
        return best[1]
    raise InputError(
        f"text from {fetched.source} is not valid UTF-8 (bad byte at offset {first_bad}) and its encoding "
        "could not be detected: save it as UTF-8 or send a charset in Content-Type"
    )


def _scrub_surrogates(text: str) -> str:
    """Replace lone surrogates (possible in JSON strings) one for one, so character offsets stay valid."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


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
        self._settings = settings
        self._client = client
        install_log_redaction()
        pool = max(16, 2 * int(getattr(settings, "preprocess_threads", 8)))
        self._http = http if http is not None else make_session(pool)
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._dns_lock = threading.Lock()
        self._cache = (
            DiskCache(Path(settings.model_dir) / "cache" / "data", settings.cache_max_bytes)
            if settings.cache_max_bytes > 0
            else None
        )
        Image.init()  # registers every plugin, so Image.OPEN lists the formats this Pillow build has
        self._formats = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)
        # Pillow raises DecompressionBombError past 2x this and warns past 1x; load_image also checks explicitly.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels if settings.max_image_pixels > 0 else None
        # Treat Pillow's bomb warning as an error process-wide (a thread-local catch_warnings does not exist).
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

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
        fetched = self.fetch(value, task_id)
        try:
            return self._decode_image(fetched, shrink)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"cannot decode the image from {fetched.source}: {type(exc).__name__}: {exc}"
            ) from None

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
                text = _decode_text(fetched)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(
                    f"cannot decode the text from {fetched.source}: {type(exc).__name__}"
                ) from None
        if limit > 0 and len(text) > limit:
            raise InputError(f"text has {len(text)} characters, over MAX_TEXT_CHARS={limit}")
        return _scrub_surrogates(text)

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

    def _resolve_host(self, host: str, port: int) -> list[str]:
        key = (host, port)
        now = time.monotonic()
        with self._dns_lock:
            hit = self._dns.get(key)
            if hit and hit[0] > now:
                return hit[1]
        # getaddrinfo has no timeout of its own: a resolver that never answers would hold this worker.
        limit = max(float(self._settings.download_timeout_s), 0.01)
        lookup = _DNS_POOL.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise InputError(
                f"DNS lookup of {host!r} timed out after {limit:g} s (DOWNLOAD_TIMEOUT_S)"
            ) from None
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise InputError(f"cannot resolve host {host!r}: {_describe(exc)}") from None
        addrs = sorted({str(info[4][0]).split("%", 1)[0] for info in infos})
        with self._dns_lock:
            if len(self._dns) > 4096:
                self._dns.clear()
            self._dns[key] = (now + DNS_CACHE_S, addrs)
        return addrs

    def check_url(self, url: str) -> None:
        """Refuse a URL that this server must not fetch (scheme, metadata address, allow-list, private).

        Inside a fetch, the approved addresses are pinned: the connection goes to them and no other.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InputError(f"malformed URL {safe_url(url)}") from None
        scheme = parts.scheme.lower()
        if scheme not in {"http", "https"}:
            raise InputError(f"refusing to follow {safe_url(url)}: only http(s) URLs are fetched")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise InputError(f"URL {safe_url(url)} has no host")
        if host in _METADATA_HOSTNAMES:
            raise InputError(f"refusing {safe_url(url)}: cloud metadata endpoints are never fetched")
        base = self._client.base_url
        ls_host = (urlsplit(base).hostname or "").lower().rstrip(".") if base else ""
        is_ls_host = bool(ls_host) and host == ls_host
        allowed = tuple(self._settings.allowed_hosts)
        if allowed and not is_ls_host and not _host_matches(host, allowed):
            raise InputError(f"refusing {safe_url(url)}: host {host!r} is not in ALLOWED_HOSTS")
        try:  # an IP literal needs no lookup (and must be refused even where the resolver cannot parse it)
            addrs = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
        except ValueError:
            addrs = self._resolve_host(host, port or (443 if scheme == "https" else 80))
        for addr in addrs:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                continue
            what = f"{host!r} resolves to" if host != str(ip) else "it is"
            if _is_metadata_ip(ip):
                raise InputError(
                    f"refusing {safe_url(url)}: {what} {ip}, a link-local / cloud metadata address"
                )
            if not self._settings.allow_private_urls and not is_ls_host and not _is_public_ip(ip):
                raise InputError(
                    f"refusing {safe_url(url)}: {what} the private address {ip} (ALLOW_PRIVATE_URLS is off)"
                )
        pinned = getattr(_local, "pinned", None)
        if pinned is not None:
            pinned[(host, port or (443 if scheme == "https" else 80))] = addrs

    # ------------------------------------------------------------------ HTTP

    def _timeout_error(self, url: str) -> InputError:
        return InputError(
            f"download of {safe_url(url)} timed out after {self._settings.download_timeout_s:g} s "
            "(DOWNLOAD_TIMEOUT_S)"
        )

    def _backoff(self, attempt: int, deadline: _Deadline) -> bool:
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

    def _send(self, url: str, headers: dict[str, str], deadline: _Deadline) -> requests.Response:
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
                raise InputError(f"TLS error talking to {safe_url(url)}: {_describe(exc)}") from None
            except requests.exceptions.ConnectionError as exc:
                if deadline.expired():
                    raise self._timeout_error(url) from None
                if attempt + 1 < tries and self._backoff(attempt, deadline):
                    logger.info("Retrying %s after %s", safe_url(url), _describe(exc))
                    continue
                raise InputError(
                    f"cannot connect to {safe_url(url)}: {_describe(exc)} (after {attempt + 1} tries)"
                ) from None
            except requests.exceptions.Timeout:
                raise self._timeout_error(url) from None
            except requests.RequestException as exc:
                if deadline.expired():
                    raise self._timeout_error(url) from None
                raise InputError(f"request to {safe_url(url)} failed: {_describe(exc)}") from None
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

    def _read_body(self, resp: requests.Response, deadline: _Deadline, url: str) -> bytes:
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
                raise InputError(f"download of {safe_url(url)} broke off: {_describe(exc)}") from None
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
        previous_pins = getattr(_local, "pinned", None)
        _local.pinned = {}
        try:
            return self._download_pinned(url, cacheable)
        finally:
            _local.pinned = previous_pins

    def _download_pinned(self, url: str, cacheable: bool) -> Fetched:
        self.check_url(url)
        cache = self._cache if cacheable else None
        if cache is not None and (hit := cache.get(url)) is not None:
            return Fetched(
                hit.body, hit.content_type, hit.charset, hit.source, self._client.is_label_studio(url)
            )
        started = time.monotonic()
        deadline = _Deadline(started + max(float(self._settings.download_timeout_s), 0.01))
        previous = getattr(_local, "deadline", None)
        _local.deadline = deadline
        _WATCHDOG.add(deadline)
        try:
            fetched, no_store = self._follow(url, deadline)
        finally:
            deadline.finish()
            _local.deadline = previous
        logger.debug(
            "Fetched %s: %d bytes in %.0f ms",
            fetched.source,
            len(fetched.body),
            (time.monotonic() - started) * 1e3,
        )
        if cache is not None and not no_store:
            cache.put(url, fetched)
        return fetched

    def _follow(self, url: str, deadline: _Deadline) -> tuple[Fetched, bool]:
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

    # ------------------------------------------------------------------ images

    def _decode_image(self, fetched: Fetched, shrink: Shrink | None = None) -> Image.Image:
        body = fetched.body
        where = fetched.source
        if not body:
            raise InputError(f"{where} is empty (0 bytes), not an image")
        max_pixels = self._settings.max_image_pixels
        try:
            im = Image.open(io.BytesIO(body), formats=self._formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image {where} is too large: {exc} (MAX_IMAGE_PIXELS={max_pixels})") from None
        except UnidentifiedImageError:
            raise self._not_an_image(fetched) from None
        except Exception as exc:
            raise InputError(f"cannot open the image from {where}: {type(exc).__name__}: {exc}") from None
        width, height = im.size
        if width <= 0 or height <= 0:
            raise InputError(f"image {where} has an empty size {width}x{height}")
        if max_pixels > 0 and width * height > max_pixels:
            raise InputError(
                f"image {where} is {width}x{height} = {width * height} pixels, over MAX_IMAGE_PIXELS={max_pixels}"
            )
        original = draft_for_model(im, shrink)
        try:
            im.load()  # decode fully now: a truncated file fails here, not later inside a model
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"image {where} is too large: {exc}") from None
        except Exception as exc:
            raise InputError(f"image {where} is truncated or corrupt: {exc}") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an already decoded image
        except Exception as exc:  # broken EXIF: keep the pixels as stored
            logger.warning("Ignoring unreadable EXIF orientation of %s: %s", where, exc)
        try:
            rgb = to_rgb(im)
        except Exception as exc:
            raise InputError(f"cannot convert image {where} (mode {im.mode}) to RGB: {exc}") from None
        if original is not None:
            rgb.info[ORIGINAL_SIZE] = original
        return rgb

    @staticmethod
    def _not_an_image(fetched: Fetched) -> InputError:
        body, where = fetched.body, fetched.source
        if _looks_like_html(body, fetched.content_type):
            if fetched.via_label_studio:
                return InputError(
                    f"Label Studio answered {where} with an HTML page (its login page?) instead of an image: "
                    "check LABEL_STUDIO_API_KEY"
                )
            return InputError(f"{where} returned an HTML page, not an image: check the URL")
        if body[:512].lstrip().lower().startswith((b"<svg", b"<?xml")):
            return InputError(f"{where} is SVG/XML; only raster images (JPEG, PNG, ...) are supported")
        kind = f" (Content-Type {fetched.content_type})" if fetched.content_type else ""
        return InputError(
            f"{where}{kind} is not an image this server can read; supported: {', '.join(IMAGE_FORMATS)}"
        )
