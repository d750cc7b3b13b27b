"""HTTP transport for downloads: one deadline per fetch (a watchdog shuts its sockets down), pinned addresses.

A read timeout bounds each recv(), not a whole download; a server that drips one byte at a time (in
the headers or the body) would otherwise hold a worker for ever. The connections of `make_session()`
connect only to the addresses the URL policy approved for the current fetch (no DNS rebinding) and
register their sockets with the fetch's deadline. What a fetch is doing lives in the thread-local
`this_fetch` (its `deadline` and its `pinned` addresses), set by the resolver around each download.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import re
import socket
import threading
import time
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\"\)\]]+")


def describe_error(exc: BaseException) -> str:
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


class Deadline:
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
        self._heap: list[tuple[float, int, Deadline]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
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


WATCHDOG = _Watchdog()
# The current fetch of this thread: `deadline` (a Deadline) and `pinned` ({(host, port): addresses}).
this_fetch = threading.local()
# Threads for DNS lookups, so that one can be abandoned at its timeout (a hung one keeps its thread).
DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")


def _pinned_addresses(host: str, port: int | None) -> list[str]:
    """Return the addresses check_url approved for host:port in this thread's current fetch, if any."""
    pinned: dict[tuple[str, int | None], list[str]] | None = getattr(this_fetch, "pinned", None)
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
        deadline = getattr(this_fetch, "deadline", None)
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
