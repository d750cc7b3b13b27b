"""DataResolver against a fake Label Studio on 127.0.0.1: every URL kind, auth, limits, URL safety."""

from __future__ import annotations

import base64
import gzip
import io
import logging
import socket
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import requests
from PIL import Image

from serving.errors import InputError
from serving.fetch.decode import ORIGINAL_SIZE
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.policy import _host_matches, safe_url
from serving.fetch.resolver import DataResolver, is_reference
from serving.settings import Settings
from tests.support.fake_ls import LEGACY_TOKEN, FakeLS, Handler

TIMEOUT_S = 0.5


def png_bytes(im: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    """Encode an image."""
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


RED_PNG = png_bytes(Image.new("RGB", (7, 5), (255, 0, 0)))


@pytest.fixture
def fake_ls() -> Iterator[FakeLS]:
    with FakeLS() as fake:
        yield fake


Make = Callable[..., DataResolver]


@pytest.fixture
def make(fake_ls: FakeLS, tmp_path: Path) -> Make:
    """Build a resolver pointed at the fake Label Studio; keyword arguments override settings."""

    def build(http: requests.Session | None = None, **overrides: Any) -> DataResolver:
        base: dict[str, Any] = {
            "label_studio_url": fake_ls.url,
            "label_studio_api_key": LEGACY_TOKEN,
            "model_dir": str(tmp_path / "model_dir"),
            "download_timeout_s": 2.0,
            "cache_max_bytes": 0,
        }
        settings = Settings(**{**base, **overrides})
        return DataResolver(settings, LabelStudioClient(settings), http=http)

    return build


class NoNetwork(requests.Session):
    """A session that fails the test if anything is requested."""

    def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise AssertionError(f"network used: {args[:2]}")


# ---------------------------------------------------------------------------------- URL kinds and auth


def test_http_url_no_auth_to_third_party(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.bucket["a.png"] = RED_PNG
    im = make().load_image(f"{fake_ls.other_url}/bucket/a.png")
    assert im.mode == "RGB" and im.size == (7, 5) and im.getpixel((0, 0)) == (255, 0, 0)
    assert "Authorization" not in fake_ls.requests_to("/bucket/")[0].headers


def test_upload_with_legacy_token(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/3/a.png"] = RED_PNG
    resolver = make()
    assert resolver.load_image("/data/upload/3/a.png").size == (7, 5)
    assert resolver.fetch_bytes("upload/3/a.png") == RED_PNG  # raw upload key form
    assert resolver.fetch_bytes(f"{fake_ls.url}/data/upload/3/a.png") == RED_PNG  # absolute LS URL
    assert {s.headers.get("Authorization") for s in fake_ls.requests_to("/data/upload/")} == {
        f"Token {LEGACY_TOKEN}"
    }


def test_upload_with_pat_exchanges_and_refreshes_on_401(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.png"] = RED_PNG
    resolver = make(label_studio_api_key=fake_ls.pat)
    assert resolver.fetch_bytes("/data/upload/1/a.png") == RED_PNG
    assert len(fake_ls.issued) == 1
    assert fake_ls.requests_to("/data/upload/")[0].headers["Authorization"] == f"Bearer {fake_ls.issued[0]}"
    fake_ls.revoked.add(fake_ls.issued[0])  # LS rejects the cached token before its exp: 401, refresh, retry
    assert resolver.fetch_bytes("/data/upload/1/a.png") == RED_PNG
    assert len(fake_ls.issued) == 2
    statuses = [s.headers["Authorization"] for s in fake_ls.requests_to("/data/upload/")]
    assert statuses == [f"Bearer {fake_ls.issued[0]}"] * 2 + [f"Bearer {fake_ls.issued[1]}"]


def test_upload_with_expired_access_token_refreshed(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.png"] = RED_PNG
    fake_ls.access_lifetime_s = 0.6
    resolver = make(label_studio_api_key=fake_ls.pat)
    resolver.fetch_bytes("/data/upload/1/a.png")
    time.sleep(0.7)  # the first access token is now expired on the server too
    assert resolver.fetch_bytes("/data/upload/1/a.png") == RED_PNG
    assert len(fake_ls.issued) == 2
    assert all(s.path != "/data/upload/1/a.png" or s.headers["Authorization"] for s in fake_ls.seen)


def test_resolver_exposes_its_client(make: Make, fake_ls: FakeLS) -> None:
    resolver = make(label_studio_url="", label_studio_api_key="")
    resolver.client.configure_fallback(fake_ls.url, LEGACY_TOKEN)
    fake_ls.files["/data/upload/1/a.png"] = RED_PNG
    assert resolver.fetch_bytes("/data/upload/1/a.png") == RED_PNG


def test_upload_without_key_says_what_to_set(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.png"] = RED_PNG
    with pytest.raises(InputError, match=r"HTTP 401.*LABEL_STUDIO_API_KEY"):
        make(label_studio_api_key="").load_image("/data/upload/1/a.png")


def test_upload_login_page_is_explained(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.login_redirect = True  # real LS redirects anonymous requests to its HTML login page
    with pytest.raises(InputError, match=r"HTML page \(its login page\?\).*LABEL_STUDIO_API_KEY"):
        make(label_studio_api_key="wrong").load_image("/data/upload/1/a.png")


def test_upload_without_label_studio_url(make: Make) -> None:
    with pytest.raises(InputError, match="set LABEL_STUDIO_URL"):
        make(label_studio_url="").load_image("/data/upload/1/a.png")


@pytest.mark.parametrize(
    "uri", ["s3://bucket/dir/a.png", "gs://bucket/a.png", "azure-blob://container/a.png"]
)
def test_cloud_uri_presigned_without_leaking_auth(
    make: Make, fake_ls: FakeLS, uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_ls.bucket[uri.split("://", 1)[1]] = RED_PNG
    im = make().load_image(uri, task_id=42)
    assert im.size == (7, 5)
    presign = fake_ls.requests_to("/tasks/42/presign/")
    assert len(presign) == 1 and presign[0].headers["Authorization"] == f"Token {LEGACY_TOKEN}"
    fileuri = presign[0].path.split("fileuri=", 1)[1]
    assert base64.urlsafe_b64decode(fileuri + "=" * (-len(fileuri) % 4)).decode() == uri
    bucket = fake_ls.requests_to("/bucket/")
    assert len(bucket) == 1 and "Authorization" not in bucket[0].headers
    assert "secret123" not in caplog.text and LEGACY_TOKEN not in caplog.text


def test_cloud_uri_without_task_id(make: Make) -> None:
    with pytest.raises(InputError, match="no task id"):
        make(http=NoNetwork()).load_image("s3://bucket/a.png")
    with pytest.raises(InputError, match="not a non-negative integer"):
        make(http=NoNetwork()).load_image("s3://bucket/a.png", task_id="1/../../admin")  # type: ignore[arg-type]


@pytest.fixture
def doc_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(RED_PNG)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("inside the root")
    (tmp_path / "secret.txt").write_text("outside the root")
    return root


def test_local_files_read_from_root(make: Make, fake_ls: FakeLS, doc_root: Path) -> None:
    resolver = make(local_files_document_root=str(doc_root), http=NoNetwork())
    assert resolver.load_image("/data/local-files/?d=sub/a.png").size == (7, 5)
    assert resolver.load_image("/data/local-files/?d=sub%2Fa.png").size == (7, 5)
    assert resolver.load_image(f"{fake_ls.url}/data/local-files/?d=sub/a.png").size == (7, 5)
    # Label Studio's rule: ?d= is relative to the root, so an absolute path cannot leave it.
    assert resolver.load_text("/data/local-files/?d=/etc/passwd") == "inside the root"


@pytest.mark.parametrize(
    "d",
    [
        "../secret.txt",
        "sub/../../secret.txt",
        "%2e%2e/secret.txt",
        "%2E%2E%2Fsecret.txt",
        "sub/%2e%2e/%2e%2e/secret.txt",
        "..",
        "link/secret.txt",  # a symlink inside the root pointing outside
    ],
)
def test_local_files_traversal_refused(make: Make, fake_ls: FakeLS, doc_root: Path, d: str) -> None:
    (doc_root / "link").symlink_to(doc_root.parent)
    resolver = make(local_files_document_root=str(doc_root))
    with pytest.raises(InputError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        resolver.load_text(f"/data/local-files/?d={d}")
    assert fake_ls.seen == []  # refused, not retried through Label Studio


def test_local_files_bad_paths(make: Make, doc_root: Path) -> None:
    resolver = make(label_studio_url="", local_files_document_root=str(doc_root), http=NoNetwork())
    with pytest.raises(InputError, match="NUL"):
        resolver.fetch_bytes("/data/local-files/?d=sub/a.png%00.txt")
    with pytest.raises(InputError, match="no file path"):
        resolver.fetch_bytes("/data/local-files/?x=1")
    with pytest.raises(InputError, match="not a regular file"):
        resolver.fetch_bytes("/data/local-files/?d=sub")
    with pytest.raises(InputError, match="not found under LOCAL_FILES_DOCUMENT_ROOT"):
        resolver.fetch_bytes("/data/local-files/?d=sub/missing.png")
    with pytest.raises(InputError, match="over MAX_DOWNLOAD_BYTES"):
        make(local_files_document_root=str(doc_root), max_download_bytes=10).fetch_bytes(
            "/data/local-files/?d=sub/a.png"
        )


def test_local_files_from_label_studio(make: Make, fake_ls: FakeLS, doc_root: Path) -> None:
    fake_ls.local_files["dir/b.png"] = RED_PNG
    assert make().fetch_bytes("/data/local-files/?d=dir/b.png") == RED_PNG  # no root: download with auth
    # A root is set but lacks the file: Label Studio may still have it.
    assert (
        make(local_files_document_root=str(doc_root)).fetch_bytes("/data/local-files/?d=dir/b.png") == RED_PNG
    )
    assert [s.headers["Authorization"] for s in fake_ls.requests_to("/data/local-files/")] == [
        f"Token {LEGACY_TOKEN}"
    ] * 2


def test_data_uris(make: Make) -> None:
    resolver = make(http=NoNetwork())
    uri = "data:image/png;base64," + base64.b64encode(RED_PNG).decode()
    assert resolver.load_image(uri).getpixel((3, 3)) == (255, 0, 0)
    assert resolver.load_image(uri.replace("base64,", "base64,\n")).size == (7, 5)  # wrapped base64
    encoded = base64.b64encode(RED_PNG).decode()
    mime = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))  # MIME line length
    assert resolver.fetch_bytes("data:image/png;base64," + mime) == RED_PNG
    urlsafe = base64.urlsafe_b64encode(RED_PNG).decode().rstrip("=")  # URL-safe alphabet, no padding
    assert resolver.fetch_bytes("data:image/png;base64," + urlsafe) == RED_PNG
    assert resolver.load_text("data:text/plain,hello%20world") == "hello world"
    assert resolver.load_text("data:text/plain;charset=latin-1,caf%E9") == "café"
    assert resolver.load_text("data:,caf%C3%A9") == "café"
    with pytest.raises(InputError, match="not valid base64"):
        resolver.fetch_bytes("data:image/png;base64,@@@@")
    with pytest.raises(InputError, match="no comma"):
        resolver.fetch_bytes("data:image/png;base64")
    with pytest.raises(InputError, match="MAX_DOWNLOAD_BYTES"):
        make(max_download_bytes=10, http=NoNetwork()).fetch_bytes(uri)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
        ("just some words", "not a URL"),
        ("/etc/passwd", "not a Label Studio upload"),
        ("http://[::1", "malformed URL"),
        ("http:///nohost", "no host"),
    ],
)
def test_bad_references(make: Make, value: str, reason: str) -> None:
    with pytest.raises(InputError, match=reason):
        make(http=NoNetwork()).load_image(value)


def test_non_string_value(make: Make) -> None:
    with pytest.raises(InputError, match="expected a URL string, got dict"):
        make(http=NoNetwork()).load_image({"url": "x"})  # type: ignore[arg-type]


def test_unexpected_exception_becomes_input_error(make: Make, fake_ls: FakeLS) -> None:
    class Broken(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            raise RuntimeError("library bug")

    with pytest.raises(InputError, match="RuntimeError"):
        make(http=Broken()).load_image(f"{fake_ls.url}/x.png")


# ---------------------------------------------------------------------------------- time, size, redirects, status


def _sleep_then_send(seconds: float) -> Callable[[Handler], None]:
    def route(h: Handler) -> None:
        time.sleep(seconds)
        h.send(200, RED_PNG, "image/png")

    return route


def _drip_body(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    for _ in range(1000):
        h.wfile.write(b"x")
        h.wfile.flush()
        time.sleep(0.02)


def _drip_headers(h: Handler) -> None:
    h.wfile.write(b"HTTP/1.0 200 OK\r\n")
    for _ in range(1000):
        h.wfile.write(b"X-Slow: y\r\n")  # every line arrives well within the read timeout
        h.wfile.flush()
        time.sleep(0.02)


@pytest.mark.parametrize(
    "route",
    [_sleep_then_send(3.0), _drip_body, _drip_headers],
    ids=["slow-headers", "drip-body", "drip-headers"],
)
def test_timeouts_hold_the_deadline(make: Make, fake_ls: FakeLS, route: Callable[[Handler], None]) -> None:
    fake_ls.routes["/slow"] = route
    resolver = make(download_timeout_s=TIMEOUT_S)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"timed out after 0.5 s"):
        resolver.load_image(f"{fake_ls.other_url}/slow")
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT_S + 0.4, elapsed


def test_drip_body_deadline_without_watchdog_session(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.routes["/slow"] = _drip_body
    started = time.monotonic()
    with pytest.raises(InputError, match="timed out"):
        make(download_timeout_s=TIMEOUT_S, http=requests.Session()).fetch_bytes(f"{fake_ls.other_url}/slow")
    assert time.monotonic() - started < TIMEOUT_S + 0.4


def _big(with_length: bool) -> Callable[[Handler], None]:
    def route(h: Handler) -> None:
        h.send_response(200)
        if with_length:
            h.send_header("Content-Length", "5000")
        h.end_headers()
        h.wfile.write(b"y" * 5000)  # HTTP/1.0 without a length: the body ends when the server closes

    return route


@pytest.mark.parametrize("with_length", [True, False])
def test_oversize_refused(make: Make, fake_ls: FakeLS, with_length: bool) -> None:
    fake_ls.routes["/big"] = _big(with_length)
    with pytest.raises(InputError, match="over MAX_DOWNLOAD_BYTES=1000"):
        make(max_download_bytes=1000).fetch_bytes(f"{fake_ls.other_url}/big")
    assert make(max_download_bytes=5000).fetch_bytes(f"{fake_ls.other_url}/big") == b"y" * 5000


def test_redirects_followed_and_loop_refused(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.bucket["a.png"] = RED_PNG
    fake_ls.routes["/r1"] = lambda h: h.send(302, Location="/r2")
    fake_ls.routes["/r2"] = lambda h: h.send(307, Location=f"{fake_ls.other_url}/bucket/a.png")
    assert make().fetch_bytes(f"{fake_ls.other_url}/r1") == RED_PNG
    fake_ls.routes["/loop"] = lambda h: h.send(302, Location="/loop")
    with pytest.raises(InputError, match=r"too many redirects \(more than 5\)"):
        make().fetch_bytes(f"{fake_ls.other_url}/loop")
    assert len(fake_ls.requests_to("/loop")) == 6


def test_redirect_body_never_read(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.bucket["a.png"] = RED_PNG

    def huge_redirect(h: Handler) -> None:
        h.send_response(302)
        h.send_header("Location", f"{fake_ls.other_url}/bucket/a.png")
        h.send_header("Content-Length", str(10**9))
        h.end_headers()
        for _ in range(1000):  # 1 GB unless the client hangs up
            h.wfile.write(b"z" * 1_000_000)

    fake_ls.routes["/huge"] = huge_redirect
    started = time.monotonic()
    assert make().fetch_bytes(f"{fake_ls.other_url}/huge") == RED_PNG
    assert time.monotonic() - started < 1.0


def test_gzip_bomb_limited(make: Make, fake_ls: FakeLS) -> None:
    bomb = gzip.compress(b"\0" * 20_000_000)  # 20 MB in about 20 KB
    fake_ls.routes["/gz"] = lambda h: h.send(200, bomb, "image/png", Content_Encoding="gzip")
    with pytest.raises(InputError, match="over MAX_DOWNLOAD_BYTES=1000000"):
        make(max_download_bytes=1_000_000).fetch_bytes(f"{fake_ls.other_url}/gz")
    ok = gzip.compress(RED_PNG)
    fake_ls.routes["/gz"] = lambda h: h.send(200, ok, "image/png", Content_Encoding="gzip")
    assert make().fetch_bytes(f"{fake_ls.other_url}/gz") == RED_PNG


def test_non_utf8_location(make: Make, fake_ls: FakeLS) -> None:
    def route(h: Handler) -> None:
        h.wfile.write(b"HTTP/1.0 302 Found\r\nLocation: /caf\xe9\r\nContent-Length: 0\r\n\r\n")

    fake_ls.routes["/latin"] = route
    with pytest.raises(InputError, match="malformed response"):
        make().fetch_bytes(f"{fake_ls.other_url}/latin")


def test_redirect_from_label_studio_drops_auth(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.bucket["a.png"] = RED_PNG
    fake_ls.routes["/data/upload/1/moved.png"] = lambda h: h.send(
        302, Location=f"{fake_ls.other_url}/bucket/a.png"
    )
    assert make().fetch_bytes("/data/upload/1/moved.png") == RED_PNG
    assert "Authorization" not in fake_ls.requests_to("/bucket/")[0].headers


def test_redirect_to_metadata_refused(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.routes["/evil"] = lambda h: h.send(302, Location="http://169.254.169.254/latest/meta-data/")
    with pytest.raises(InputError, match="cloud metadata"):
        make().fetch_bytes(f"{fake_ls.other_url}/evil")


def _status_sequence(fake_ls: FakeLS, path: str, statuses: list[int]) -> None:
    remaining = list(statuses)

    def route(h: Handler) -> None:
        status = remaining.pop(0) if remaining else 200
        h.send(status, RED_PNG if status == 200 else b"error page", "image/png")

    fake_ls.routes[path] = route


@pytest.mark.parametrize(
    ("statuses", "tries", "error"),
    [
        ([503, 429], 3, None),
        ([500, 502, 503], 3, r"HTTP 503 .* \(retried with backoff"),
        ([404], 1, r"not found \(HTTP 404\)"),
        ([400], 1, "HTTP 400"),
        ([403], 1, "needs credentials"),
    ],
)
def test_status_retries(
    make: Make, fake_ls: FakeLS, statuses: list[int], tries: int, error: str | None
) -> None:
    _status_sequence(fake_ls, "/s", statuses)
    resolver = make()
    if error is None:
        assert resolver.fetch_bytes(f"{fake_ls.other_url}/s") == RED_PNG
    else:
        with pytest.raises(InputError, match=error):
            resolver.fetch_bytes(f"{fake_ls.other_url}/s")
    assert len(fake_ls.requests_to("/s")) == tries


def test_connection_refused_retried_then_reported(make: Make) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(InputError, match=r"cannot connect to .*Connection refused.* \(after 3 tries\)"):
            make().fetch_bytes(f"http://127.0.0.1:{port}/a.png")
        assert 0.7 <= time.monotonic() - started < 1.5  # backoff 0.2 + 0.5 s


# ---------------------------------------------------------------------------------- URL policy


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.1.2/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://100.100.100.200/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./",
        "http://2852039166/",  # 169.254.169.254 as one decimal number
    ],
)
def test_metadata_addresses_refused_before_connecting(make: Make, url: str) -> None:
    with pytest.raises(InputError, match="metadata"):
        make(http=NoNetwork()).fetch_bytes(url)


def test_hostname_resolving_to_metadata_refused(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "innocent.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00:ec2::254", port, 0, 0)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(InputError, match="resolves to fd00:ec2::254"):
        make(http=NoNetwork()).fetch_bytes("http://innocent.example/a.png")


def test_unresolvable_host(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(InputError, match=r"cannot resolve host 'nowhere\.invalid'"):
        make(http=NoNetwork()).fetch_bytes("http://nowhere.invalid/a.png")


def test_connection_goes_to_the_checked_address_not_to_a_second_dns_answer(
    make: Make, fake_ls: FakeLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the host answers 127.0.0.1 to the check, then the metadata address; we use the first."""
    real = socket.getaddrinfo
    port = int(fake_ls.other_url.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1"] + ["169.254.169.254"] * 10)
    asked: list[str] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host != "rebind.example":
            return real(host, *args, **kwargs)
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = _serve(fake_ls, RED_PNG).replace("localhost", "rebind.example")
    assert make().fetch_bytes(url) == RED_PNG
    assert asked == ["rebind.example"]  # looked up once, by the check; the connection reused its answer


def test_a_dns_lookup_that_never_answers_times_out(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    started = time.monotonic()
    try:
        with pytest.raises(InputError, match=r"DNS lookup of 'slow\.example' timed out after 0\.3 s"):
            make(http=NoNetwork(), download_timeout_s=0.3).fetch_bytes("http://slow.example/a.png")
        assert time.monotonic() - started < 2.0
    finally:
        release.set()


def test_allow_list(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.png"] = RED_PNG
    fake_ls.bucket["a.png"] = RED_PNG
    resolver = make(allowed_hosts=("images.example", "*.cdn.example"))
    with pytest.raises(InputError, match="'localhost' is not in ALLOWED_HOSTS"):
        resolver.fetch_bytes(f"{fake_ls.other_url}/bucket/a.png")
    assert fake_ls.requests_to("/bucket/") == []
    assert (
        resolver.fetch_bytes("/data/upload/1/a.png") == RED_PNG
    )  # Label Studio's own host is always allowed
    assert make(allowed_hosts=("LOCALHOST",)).fetch_bytes(f"{fake_ls.other_url}/bucket/a.png") == RED_PNG
    assert _host_matches("a.cdn.example", ("*.cdn.example",))
    assert not _host_matches("cdn.example.evil", ("*.cdn.example",))
    assert not _host_matches("evilcdn.example", ("*.cdn.example",))


def test_private_addresses_refused_when_disallowed(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.png"] = RED_PNG
    resolver = make(allow_private_urls=False)
    with pytest.raises(InputError, match=r"private address 127\.0\.0\.1"):
        resolver.fetch_bytes(f"{fake_ls.other_url}/bucket/a.png")
    with pytest.raises(InputError, match=r"private address 10\.0\.0\.1"):
        resolver.fetch_bytes("http://10.0.0.1/a.png")
    assert resolver.fetch_bytes("/data/upload/1/a.png") == RED_PNG  # LS usually lives on a private address


def test_safe_url_masks_secrets() -> None:
    url = "https://user:pw@b.s3.amazonaws.com/k.png?X-Amz-Signature=abc&X-Amz-Credential=AK&v=1"
    masked = safe_url(url)
    assert "pw" not in masked and "abc" not in masked and "AK" not in masked
    assert masked == "https://b.s3.amazonaws.com/k.png?X-Amz-Signature=***&X-Amz-Credential=***&v=1"
    assert safe_url("data:image/png;base64," + "A" * 1000).startswith("data:image/png;base64,…(")


# ---------------------------------------------------------------------------------- images


def _serve(fake_ls: FakeLS, body: bytes, content_type: str = "image/png") -> str:
    fake_ls.routes["/img"] = lambda h: h.send(200, body, content_type)
    return f"{fake_ls.other_url}/img"


def test_html_instead_of_image(make: Make, fake_ls: FakeLS) -> None:
    url = _serve(fake_ls, b"<!DOCTYPE html><html><body>Oops</body></html>", "text/html")
    with pytest.raises(InputError, match="returned an HTML page, not an image"):
        make().load_image(url)


def test_svg_and_garbage_not_images(make: Make, fake_ls: FakeLS) -> None:
    with pytest.raises(InputError, match="SVG"):
        make().load_image(_serve(fake_ls, b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "image/svg+xml"))
    with pytest.raises(InputError, match=r"\(Content-Type application/octet-stream\) is not an image"):
        make().load_image(_serve(fake_ls, b"\x00\x01garbage" * 10, "application/octet-stream"))
    with pytest.raises(InputError, match="empty"):
        make().load_image(_serve(fake_ls, b""))


def test_truncated_jpeg(make: Make, fake_ls: FakeLS) -> None:
    rng = np.random.default_rng(0)
    jpeg = png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(InputError, match="truncated or corrupt"):
        make().load_image(_serve(fake_ls, jpeg[: len(jpeg) // 2], "image/jpeg"))


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_png(make: Make, fake_ls: FakeLS) -> None:
    url = _serve(fake_ls, _png_header_only(20000, 20000))  # 400 Mpx declared in a 100-byte file
    started = time.monotonic()
    with pytest.raises(InputError, match="too large"):
        make().load_image(url)
    assert time.monotonic() - started < 1.0  # refused from the header, nothing decoded
    # Between 1x and 2x the limit Pillow only warns: the warning is an error too.
    with pytest.raises(InputError, match=r"\(1600 pixels\).*MAX_IMAGE_PIXELS=1000"):
        make(max_image_pixels=1000).load_image(_serve(fake_ls, png_bytes(Image.new("RGB", (40, 40)))))
    resolver = make(max_image_pixels=1000)
    with warnings.catch_warnings():  # even where someone silenced Pillow's warning, the limit holds
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match=r"40x40 = 1600 pixels, over MAX_IMAGE_PIXELS=1000"):
            resolver.load_image(_serve(fake_ls, png_bytes(Image.new("RGB", (40, 40)))))
    assert make(max_image_pixels=1600).load_image(
        _serve(fake_ls, png_bytes(Image.new("RGB", (40, 40))))
    ).size == (
        40,
        40,
    )


def test_one_pixel_image(make: Make, fake_ls: FakeLS) -> None:
    assert make().load_image(_serve(fake_ls, png_bytes(Image.new("L", (1, 1), 7)))).getpixel((0, 0)) == (
        7,
        7,
        7,
    )


def _pixels(im: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in p) for p in np.asarray(im).reshape(-1, 3)]


def test_cmyk_to_rgb(make: Make, fake_ls: FakeLS) -> None:
    cmyk = Image.new("CMYK", (4, 2), (0, 255, 255, 0))  # pure red in ink
    im = make().load_image(_serve(fake_ls, png_bytes(cmyk, "TIFF")))
    assert im.mode == "RGB" and set(_pixels(im)) == {(255, 0, 0)}
    im = make().load_image(_serve(fake_ls, png_bytes(cmyk.resize((16, 16)), "JPEG", quality=95)))
    r, g, b = np.asarray(im).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_16_bit_gray_scaled_not_clipped(make: Make, fake_ls: FakeLS) -> None:
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    png = png_bytes(Image.fromarray(arr))
    im = make().load_image(_serve(fake_ls, png))
    assert _pixels(im) == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_float_image_scaled(make: Make, fake_ls: FakeLS) -> None:
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    im = make().load_image(_serve(fake_ls, png_bytes(Image.fromarray(arr, "F"), "TIFF")))
    assert _pixels(im) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_alpha_composited_on_white(make: Make, fake_ls: FakeLS) -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    im = make().load_image(_serve(fake_ls, png_bytes(Image.fromarray(rgba, "RGBA"))))
    assert _pixels(im) == [(255, 0, 0), (255, 255, 255), (127, 127, 127)]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert _pixels(make().load_image(_serve(fake_ls, png_bytes(la)))) == [(255, 255, 255), (0, 0, 0)]


def test_palette_with_and_without_transparency(make: Make, fake_ls: FakeLS) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert _pixels(make().load_image(_serve(fake_ls, png_bytes(pal)))) == [(0, 0, 255), (0, 255, 0)]
    gif = png_bytes(pal, "GIF", transparency=0)
    assert _pixels(make().load_image(_serve(fake_ls, gif, "image/gif"))) == [(255, 255, 255), (0, 255, 0)]


def test_bilevel_image(make: Make, fake_ls: FakeLS) -> None:
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert _pixels(make().load_image(_serve(fake_ls, png_bytes(one)))) == [(0, 0, 0), (255, 255, 255)]


def test_exif_orientation_applied(make: Make, fake_ls: FakeLS) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; left half red
    stored[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    jpeg = png_bytes(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    im = make().load_image(_serve(fake_ls, jpeg, "image/jpeg"))
    assert im.size == (20, 40)  # as Label Studio (the browser) shows it
    top, bottom = np.asarray(im)[5, 10], np.asarray(im)[35, 10]
    assert top[0] > 200 and top[1] < 50 and bottom[0] < 50


def test_jpeg_decodes_smaller_when_the_model_shrinks_it_and_keeps_the_shown_size(
    make: Make, fake_ls: FakeLS
) -> None:
    """shrink(shown size) -> scale: libjpeg scales by 1/2..1/8, never below the asked size; EXIF still applies."""
    stored = np.zeros((1200, 1600, 3), dtype=np.uint8)
    stored[:, :800] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 1200 wide, 1600 high
    url = _serve(
        fake_ls, png_bytes(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=90), "image/jpeg"
    )
    seen: list[tuple[int, int]] = []

    def shrink(size: tuple[int, int]) -> float:
        seen.append(size)
        return 0.2

    im = make().load_image(url, shrink=shrink)
    assert seen == [(1200, 1600)]  # the model is asked about the image as shown
    assert im.size == (300, 400)  # 1/4: the smallest libjpeg scale that is still >= 0.2
    assert im.info[ORIGINAL_SIZE] == (1200, 1600)
    top, bottom = np.asarray(im)[50, 150], np.asarray(im)[350, 150]
    assert top[0] > 200 and bottom[0] < 50  # the stored left (red) half is on top, as shown

    assert make().load_image(url, shrink=lambda size: 0.125).size == (150, 200)  # 1/8
    for scale in (0.6, 1.0, 2.0):  # nothing to gain: decoded in full
        full = make().load_image(url, shrink=lambda size, s=scale: s)
        assert full.size == (1200, 1600) and ORIGINAL_SIZE not in full.info
    assert ORIGINAL_SIZE not in make().load_image(url).info

    def broken(size: tuple[int, int]) -> float:
        raise RuntimeError("model not loaded")

    assert make().load_image(url, shrink=broken).size == (1200, 1600)  # a hint only: full decode


def test_png_is_never_decoded_smaller(make: Make, fake_ls: FakeLS) -> None:
    im = make().load_image(_serve(fake_ls, png_bytes(Image.new("RGB", (800, 600)))), shrink=lambda size: 0.1)
    assert im.size == (800, 600) and ORIGINAL_SIZE not in im.info


# ---------------------------------------------------------------------------------- text


def test_text_inline_and_limits(make: Make) -> None:
    resolver = make(http=NoNetwork(), max_text_chars=30)
    assert resolver.load_text("Hello world") == "Hello world"
    assert resolver.load_text("data: the results show") == "data: the results show"  # prose, not a URI
    assert resolver.load_text("see https://example.com") == "see https://example.com"
    assert resolver.load_text("https://example.com", as_url=False) == "https://example.com"
    assert resolver.load_text("") == ""
    assert resolver.load_text(5) == "5"
    assert resolver.load_text("a\ud800b") == "a?b"  # a lone surrogate from JSON, replaced one for one
    with pytest.raises(InputError, match="31 characters, over MAX_TEXT_CHARS=30"):
        resolver.load_text("x" * 31)
    with pytest.raises(InputError, match="expected text for this task, got NoneType"):
        resolver.load_text(None)
    with pytest.raises(InputError, match="got list"):
        resolver.load_text(["a"])


def test_text_fetched_and_decoded(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.txt"] = "Zürich café".encode()
    resolver = make()
    assert resolver.load_text("/data/upload/1/a.txt") == "Zürich café"
    fake_ls.routes["/latin1"] = lambda h: h.send(
        200, "café".encode("latin-1"), "text/plain; charset=ISO-8859-1"
    )
    assert resolver.load_text(f"{fake_ls.other_url}/latin1") == "café"
    fake_ls.routes["/bom"] = lambda h: h.send(200, "naïve".encode("utf-16"), "text/plain")
    assert resolver.load_text(f"{fake_ls.other_url}/bom") == "naïve"
    text = "Le café de la gare est fermé. Déjà vu, très élégant, à côté du théâtre."
    fake_ls.routes["/cp1252"] = lambda h: h.send(200, text.encode("cp1252"), "text/plain")
    assert resolver.load_text(f"{fake_ls.other_url}/cp1252") == text  # undeclared: detected
    fake_ls.routes["/short"] = lambda h: h.send(200, "café".encode("latin-1"), "text/plain")
    assert resolver.load_text(f"{fake_ls.other_url}/short") == "café"
    russian = "Привет, это тест текста на русском языке."
    fake_ls.routes["/cp1251"] = lambda h: h.send(200, russian.encode("cp1251"), "text/plain")
    assert resolver.load_text(f"{fake_ls.other_url}/cp1251") == russian
    fake_ls.routes["/bin"] = lambda h: h.send(200, b"\x89PNG\x00\x00\xff\xfe\x00", "text/plain")
    with pytest.raises(InputError, match="binary data, not text"):
        resolver.load_text(f"{fake_ls.other_url}/bin")
    fake_ls.routes["/long"] = lambda h: h.send(200, b"y" * 50, "text/plain")
    with pytest.raises(InputError, match="50 characters, over MAX_TEXT_CHARS=40"):
        make(max_text_chars=40).load_text(f"{fake_ls.other_url}/long")


def test_is_reference() -> None:
    assert is_reference(" https://x.example/a.txt ")
    assert is_reference("/data/upload/1/a.txt") and is_reference("s3://b/k") and is_reference("data:,x")
    assert not is_reference("hello") and not is_reference("https://x.example and more")
    assert not is_reference("/etc/passwd")


# ---------------------------------------------------------------------------------- cache


def test_disk_cache_hits_and_evicts(make: Make, fake_ls: FakeLS, tmp_path: Path) -> None:
    for name in "abc":
        fake_ls.bucket[name] = name.encode() * 1000
    resolver = make(cache_max_bytes=2500)
    url = f"{fake_ls.other_url}/bucket/"
    assert resolver.fetch_bytes(url + "a") == b"a" * 1000
    assert resolver.fetch_bytes(url + "a") == b"a" * 1000
    assert len(fake_ls.requests_to("/bucket/a")) == 1  # second read from disk
    cache_dir = tmp_path / "model_dir" / "cache" / "data"
    assert len(list(cache_dir.iterdir())) == 1
    time.sleep(0.02)
    resolver.fetch_bytes(url + "b")
    time.sleep(0.02)
    resolver.fetch_bytes(url + "a")  # touch a: b is now the least recently used
    time.sleep(0.02)
    resolver.fetch_bytes(url + "c")  # over 2500 bytes: evict the oldest until under 90%
    sizes = [p.stat().st_size for p in cache_dir.iterdir()]
    assert sum(sizes) <= 2500 and len(sizes) == 2
    resolver.fetch_bytes(url + "a")
    resolver.fetch_bytes(url + "b")
    assert len(fake_ls.requests_to("/bucket/a")) == 1 and len(fake_ls.requests_to("/bucket/b")) == 2


def test_cache_skips_no_store_and_presigned(make: Make, fake_ls: FakeLS) -> None:
    fake_ls.routes["/nostore"] = lambda h: h.send(200, RED_PNG, "image/png", Cache_Control="no-store")
    fake_ls.bucket["k.png"] = RED_PNG
    resolver = make(cache_max_bytes=10**6)
    for _ in range(2):
        resolver.fetch_bytes(f"{fake_ls.other_url}/nostore")
        resolver.fetch_bytes("s3://k.png", task_id=1)
    assert len(fake_ls.requests_to("/nostore")) == 2
    assert len(fake_ls.requests_to("/tasks/1/presign/")) == 2


def test_secrets_not_in_errors_or_logs(make: Make, fake_ls: FakeLS, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake_ls.files["/data/upload/1/a.png"] = b"<html>nope</html>"
    resolver = make(label_studio_api_key=fake_ls.pat)
    with pytest.raises(InputError) as info:
        resolver.load_image("/data/upload/1/a.png")
    fake_ls.routes["/bucket/x"] = lambda h: h.send(404)
    with pytest.raises(InputError) as info2:
        resolver.load_image("s3://x", task_id=3)
    messages = f"{info.value} {info2.value} {caplog.text}"
    assert "secret123" not in messages and "X-Amz-Signature=***" in str(info2.value)
    for secret in [fake_ls.pat, *fake_ls.issued]:
        assert secret not in messages


def test_encoded_quote_in_presign(make: Make, fake_ls: FakeLS) -> None:
    key = "dir with space/ü.png"
    fake_ls.bucket[quote(key)] = RED_PNG
    assert make().fetch_bytes(f"s3://{key}", task_id=1) == RED_PNG
