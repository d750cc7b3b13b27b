"""Label Studio connection: base URL and auth headers (legacy token or personal access token)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from serving.errors import InputError
from serving.settings import Settings

logger = logging.getLogger(__name__)

# Refresh an access token this long before its `exp` (capped to half its lifetime, for short-lived tokens).
REFRESH_MARGIN_S = 30.0
# After a failed exchange, answer from memory for this long instead of asking Label Studio again per task.
FAILURE_MEMORY_S = 2.0
_REFRESH_PATH = "/api/token/refresh/"


def mask_secret(secret: str) -> str:
    """Return a form of a secret that is safe to log: its length and last 4 characters at most."""
    if not secret:
        return "<none>"
    tail = secret[-4:] if len(secret) >= 16 else ""
    return f"<{len(secret)} chars …{tail}>"


def _b64url_json(part: str) -> dict[str, Any] | None:
    """Decode one base64url JWT segment holding a JSON object, or return None."""
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def jwt_claims(token: str) -> dict[str, Any] | None:
    """Return the payload of a JWT without verifying it (we only read `exp` and `token_type`), or None."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    header = _b64url_json(parts[0])
    if header is None or "alg" not in header:
        return None
    return _b64url_json(parts[1])


def token_kind(token: str) -> str:
    """Classify an API key: "none", "legacy" (Token auth), "pat" (refresh JWT) or "access" (Bearer JWT)."""
    if not token:
        return "none"
    claims = jwt_claims(token)
    if claims is None:
        return "legacy"
    return "pat" if claims.get("token_type", "refresh") == "refresh" else "access"


def origin(url: str) -> tuple[str, str, int] | None:
    """Return (scheme, host, port) of an http(s) URL with default ports filled in, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"} or not parts.hostname:
        return None
    host = parts.hostname.lower().rstrip(".")
    return scheme, host, port or (443 if scheme == "https" else 80)


class LabelStudioClient:
    """Know where Label Studio is and how to authenticate to it; thread-safe."""

    def __init__(self, settings: Settings, http: requests.Session | None = None) -> None:
        self._settings = settings
        self._http = http if http is not None else requests.Session()
        self._lock = threading.Lock()
        self._fallback_host = ""
        self._fallback_token = ""
        # Cached access token for the PAT it came from; `_access_until` is on the monotonic clock.
        self._access = ""
        self._access_pat = ""
        self._access_until = 0.0
        self._failure: tuple[float, str, str] | None = None  # (monotonic time, PAT, message)

    def configure_fallback(self, hostname: str, access_token: str) -> None:
        """Remember /setup's hostname and token, used only where LABEL_STUDIO_URL / _API_KEY are empty."""
        hostname = (hostname or "").strip().rstrip("/")
        if hostname and origin(hostname) is None:
            logger.warning("Ignoring /setup hostname %r: not an http(s) URL", hostname[:200])
            hostname = ""
        with self._lock:
            self._fallback_host = hostname
            self._fallback_token = (access_token or "").strip()

    @property
    def base_url(self) -> str:
        """Return Label Studio's base URL without a trailing slash, or "" when unknown."""
        return (self._settings.label_studio_url or self._fallback_host).strip().rstrip("/")

    def _token(self) -> str:
        """Return the API key to use with base_url; never send one host's key to another host."""
        configured_url = self._settings.label_studio_url.strip().rstrip("/")
        configured_key = self._settings.label_studio_api_key.strip()
        if configured_url:
            if configured_key:
                return configured_key
            # /setup's token belongs to /setup's hostname: only use it if that is the configured instance.
            same = self._fallback_host and origin(self._fallback_host) == origin(configured_url)
            return self._fallback_token if same else ""
        # No configured URL: the configured key is not sent to a host learned from an unauthenticated /setup.
        return self._fallback_token if self._fallback_host else ""

    @property
    def token_kind(self) -> str:
        """Return the kind of the key in use ("none", "legacy", "pat", "access")."""
        return token_kind(self._token())

    def is_label_studio(self, url: str) -> bool:
        """Return True when url has Label Studio's origin (scheme, host, port): it gets the auth header."""
        base = self.base_url
        return bool(base) and origin(url) is not None and origin(url) == origin(base)

    def auth_headers(self, force_refresh: bool = False, *, rejected: str | None = None) -> dict[str, str]:
        """Return the Authorization header for Label Studio (empty when no key is known).

        force_refresh exchanges the personal access token again (after a 401); `rejected` is the
        Authorization value that got the 401, so that concurrent 401s trigger a single exchange.
        """
        token = self._token()
        kind = token_kind(token)
        if kind == "none":
            return {}
        if kind == "legacy":
            return {"Authorization": f"Token {token}"}
        if kind == "access":
            return {"Authorization": f"Bearer {token}"}
        with self._lock:
            now = time.monotonic()
            cached = self._access if self._access_pat == token else ""
            if cached:
                current = f"Bearer {cached}"
                if force_refresh and rejected is not None and rejected != current:
                    return {"Authorization": current}  # another thread already refreshed
                if not force_refresh and now < self._access_until:
                    return {"Authorization": current}
            if self._failure and self._failure[1] == token and now - self._failure[0] < FAILURE_MEMORY_S:
                raise InputError(self._failure[2])
            try:
                access, lifetime_s = self._exchange(token)
            except InputError as exc:
                self._failure = (time.monotonic(), token, str(exc))
                raise
            self._failure = None
            margin = min(REFRESH_MARGIN_S, lifetime_s / 2)
            self._access, self._access_pat = access, token
            self._access_until = time.monotonic() + max(lifetime_s - margin, 0.0)
            return {"Authorization": f"Bearer {access}"}

    def _exchange(self, pat: str) -> tuple[str, float]:
        """Exchange a personal access token for an access token; return it and its lifetime in seconds."""
        base = self.base_url
        if not base:
            raise InputError(
                "Label Studio URL unknown: set LABEL_STUDIO_URL so the personal access token can be exchanged"
            )
        timeout = max(float(self._settings.download_timeout_s), 0.1)
        hint = "create a new personal access token in Label Studio (Account & Settings) and set LABEL_STUDIO_API_KEY"
        try:
            resp = self._http.post(
                base + _REFRESH_PATH,
                json={"refresh": pat},
                timeout=(min(timeout, 5.0), timeout),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise InputError(
                f"cannot reach Label Studio at {base} to exchange the personal access token "
                f"({type(exc).__name__}): check LABEL_STUDIO_URL"
            ) from None
        with resp:
            if resp.status_code != 200:
                raise InputError(
                    f"Label Studio refused the personal access token (HTTP {resp.status_code} from "
                    f"{_REFRESH_PATH}): {hint}"
                )
            try:
                access = resp.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access:
            raise InputError(f"Label Studio's {_REFRESH_PATH} answered without an access token: {hint}")
        claims = jwt_claims(access) or {}
        exp = claims.get("exp")
        # Without a readable exp, assume a short life (Label Studio's default is 300 s) and rely on 401 retries.
        lifetime = float(exp) - time.time() if isinstance(exp, int | float) else 60.0
        logger.info(
            "Exchanged the personal access token %s for an access token valid %.0f s",
            mask_secret(pat),
            lifetime,
        )
        return access, lifetime
