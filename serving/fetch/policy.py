"""URL policy: what this server may fetch (no cloud metadata, ALLOWED_HOSTS, no private addresses), and redaction.

`UrlPolicy.check` runs on every hop of a download (redirects are followed by hand); the addresses it
approves are pinned for the connection (see transport.py). `safe_url` is how a URL appears in logs and
error messages: no userinfo, signed-URL secrets masked.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import re
import socket
import threading
import time
from urllib.parse import parse_qsl, urlsplit

from serving.errors import InputError
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.transport import DNS_POOL, describe_error, this_fetch
from serving.settings import Settings

DNS_CACHE_S = 30.0

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


class UrlPolicy:
    """Check URLs against the settings (and Label Studio's own host); cache DNS answers for DNS_CACHE_S."""

    def __init__(self, settings: Settings, client: LabelStudioClient) -> None:
        """Check against `settings`; Label Studio's host (from `client`) is always allowed."""
        self._settings = settings
        self._client = client
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._dns_lock = threading.Lock()

    def resolve_host(self, host: str, port: int) -> list[str]:
        """Return the addresses of host:port (cached), within DOWNLOAD_TIMEOUT_S."""
        key = (host, port)
        now = time.monotonic()
        with self._dns_lock:
            hit = self._dns.get(key)
            if hit and hit[0] > now:
                return hit[1]
        # getaddrinfo has no timeout of its own: a resolver that never answers would hold this worker.
        limit = max(float(self._settings.download_timeout_s), 0.01)
        lookup = DNS_POOL.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = lookup.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise InputError(
                f"DNS lookup of {host!r} timed out after {limit:g} s (DOWNLOAD_TIMEOUT_S)"
            ) from None
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise InputError(f"cannot resolve host {host!r}: {describe_error(exc)}") from None
        addrs = sorted({str(info[4][0]).split("%", 1)[0] for info in infos})
        with self._dns_lock:
            if len(self._dns) > 4096:
                self._dns.clear()
            self._dns[key] = (now + DNS_CACHE_S, addrs)
        return addrs

    def check(self, url: str) -> None:
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
            addrs = self.resolve_host(host, port or (443 if scheme == "https" else 80))
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
        pinned = getattr(this_fetch, "pinned", None)
        if pinned is not None:
            pinned[(host, port or (443 if scheme == "https" else 80))] = addrs
