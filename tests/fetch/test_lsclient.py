"""LabelStudioClient: token kinds, PAT exchange, refresh on expiry and on 401, fallback, no secret in logs."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from serving.errors import InputError
from serving.fetch.lsclient import LabelStudioClient, mask_secret, origin, token_kind
from serving.settings import Settings
from tests.support.fake_ls import LEGACY_TOKEN, FakeLS, make_jwt


@pytest.fixture
def fake_ls() -> Iterator[FakeLS]:
    with FakeLS() as fake:
        yield fake


def _client(url: str = "", key: str = "") -> LabelStudioClient:
    return LabelStudioClient(Settings(label_studio_url=url, label_studio_api_key=key, download_timeout_s=2.0))


def _exchanges(fake: FakeLS) -> int:
    return len(fake.requests_to("/api/token/refresh/"))


@pytest.mark.parametrize(
    ("token", "kind"),
    [
        ("", "none"),
        (LEGACY_TOKEN, "legacy"),
        ("a.b.c", "legacy"),  # dots but not base64 JSON: not a JWT
        (make_jwt({"token_type": "refresh", "exp": 1}), "pat"),
        (make_jwt({"exp": 1}), "pat"),  # Label Studio PATs are refresh tokens; token_type may be absent
        (make_jwt({"token_type": "access", "exp": 1}), "access"),
    ],
)
def test_token_kind(token: str, kind: str) -> None:
    assert token_kind(token) == kind


def test_legacy_token_header_without_network() -> None:
    client = _client("http://127.0.0.1:9", LEGACY_TOKEN)  # port 9: nothing listens, nothing must be called
    assert client.auth_headers() == {"Authorization": f"Token {LEGACY_TOKEN}"}
    assert client.token_kind == "legacy"


def test_no_key_no_header() -> None:
    assert _client("http://127.0.0.1:9").auth_headers() == {}


def test_pat_exchanged_once_and_cached(fake_ls: FakeLS) -> None:
    client = _client(fake_ls.url + "/", fake_ls.pat)  # trailing slash tolerated
    assert client.base_url == fake_ls.url
    first = client.auth_headers()
    second = client.auth_headers()
    assert first == second == {"Authorization": f"Bearer {fake_ls.issued[0]}"}
    assert _exchanges(fake_ls) == 1
    assert fake_ls.authorized(first["Authorization"])


def test_pat_refreshed_before_expiry(fake_ls: FakeLS) -> None:
    fake_ls.access_lifetime_s = 1.0  # margin = min(30 s, half the lifetime) = 0.5 s
    client = _client(fake_ls.url, fake_ls.pat)
    first = client.auth_headers()["Authorization"]
    assert client.auth_headers()["Authorization"] == first
    assert _exchanges(fake_ls) == 1
    time.sleep(0.6)  # inside the refresh margin but before exp: a fresh token, never an expired one
    second = client.auth_headers()["Authorization"]
    assert second != first
    assert _exchanges(fake_ls) == 2
    assert fake_ls.authorized(second)


def test_force_refresh_single_exchange_for_concurrent_401s(fake_ls: FakeLS) -> None:
    client = _client(fake_ls.url, fake_ls.pat)
    stale = client.auth_headers()["Authorization"]
    fresh = client.auth_headers(force_refresh=True, rejected=stale)["Authorization"]
    assert fresh != stale and _exchanges(fake_ls) == 2
    # A second thread that saw the same stale token gets the already-refreshed one, no third exchange.
    assert client.auth_headers(force_refresh=True, rejected=stale)["Authorization"] == fresh
    assert _exchanges(fake_ls) == 2


def test_concurrent_callers_share_one_exchange(fake_ls: FakeLS) -> None:
    client = _client(fake_ls.url, fake_ls.pat)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.auth_headers()["Authorization"]))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert _exchanges(fake_ls) == 1


def test_invalid_pat_is_input_error_and_not_hammered(fake_ls: FakeLS) -> None:
    bad = make_jwt({"token_type": "refresh", "exp": time.time() + 60, "jti": "revoked"})
    client = _client(fake_ls.url, bad)
    for _ in range(3):
        with pytest.raises(InputError, match=r"refused the personal access token \(HTTP 401"):
            client.auth_headers()
    assert _exchanges(fake_ls) == 1  # the failure is remembered for a moment


def test_unreachable_label_studio() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        client = _client(f"http://127.0.0.1:{port}", make_jwt({"token_type": "refresh"}))
        with pytest.raises(InputError, match="cannot reach Label Studio"):
            client.auth_headers()


def test_fallback_from_setup_used_when_settings_empty() -> None:
    client = _client()
    assert client.base_url == "" and client.auth_headers() == {}
    client.configure_fallback("http://ls.example:8080/", "setup-token")
    assert client.base_url == "http://ls.example:8080"
    assert client.auth_headers() == {"Authorization": "Token setup-token"}
    client.configure_fallback("not a url", "x")
    assert client.base_url == ""


def test_fallback_never_overrides_or_leaks_configured_values() -> None:
    # Configured URL and key win over /setup.
    client = _client("http://ls.example", "configured-key")
    client.configure_fallback("http://evil.example", "setup-token")
    assert client.base_url == "http://ls.example"
    assert client.auth_headers() == {"Authorization": "Token configured-key"}
    # Configured URL without key: /setup's token only if /setup named the same instance.
    client = _client("http://ls.example")
    client.configure_fallback("http://LS.example:80", "setup-token")
    assert client.auth_headers() == {"Authorization": "Token setup-token"}
    client.configure_fallback("http://other.example", "setup-token")
    assert client.auth_headers() == {}
    # Configured key without URL: never sent to a host learned from an unauthenticated /setup.
    client = _client("", "configured-key")
    client.configure_fallback("http://evil.example", "")
    assert client.base_url == "http://evil.example"
    assert client.auth_headers() == {}


def test_origin_and_is_label_studio() -> None:
    assert origin("HTTP://Host.Example/a") == ("http", "host.example", 80)
    assert origin("https://h:8443") == ("https", "h", 8443)
    assert origin("ftp://h") is None and origin("http://[::1") is None
    client = _client("http://ls.example:8080")
    assert client.is_label_studio("http://LS.example:8080/data/upload/1/a.png")
    assert not client.is_label_studio("https://ls.example:8080/x")  # other scheme: other origin
    assert not client.is_label_studio("http://ls.example/x")
    assert not client.is_label_studio("http://ls.example.evil.com:8080/x")


def test_secrets_never_logged(fake_ls: FakeLS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = _client(fake_ls.url, fake_ls.pat)
    client.auth_headers()
    assert "Exchanged the personal access token" in caplog.text
    assert fake_ls.pat not in caplog.text
    assert fake_ls.issued[0] not in caplog.text
    assert fake_ls.pat[-4:] in mask_secret(fake_ls.pat) and fake_ls.pat not in mask_secret(fake_ls.pat)
