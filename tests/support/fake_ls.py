"""A fake Label Studio on 127.0.0.1 for the data-resolution tests (no tests here, only the server)."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def b64url(data: bytes) -> str:
    """Encode base64url without padding, as JWTs do."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(payload: dict[str, Any]) -> str:
    """Build an unsigned-looking JWT (the client never verifies signatures)."""
    header = {"alg": "HS256", "typ": "JWT"}
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(b"signature")]
    )


def jwt_payload(token: str) -> dict[str, Any]:
    """Decode a JWT payload."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


@dataclass
class Seen:
    """One request the fake server received."""

    method: str
    path: str
    headers: dict[str, str]


Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    """Dispatch to FakeLS: token refresh, uploads, local-files, presign, a bucket, and per-test routes."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send(
        self, status: int, body: bytes = b"", content_type: str = "application/octet-stream", **headers: str
    ) -> None:
        """Send a complete response."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        fake = self.server.fake
        split = urlsplit(self.path)
        fake.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
        try:
            route = fake.routes.get(split.path)
            if route is not None:
                route(self)
            elif split.path == "/api/token/refresh/" and self.command == "POST":
                fake.refresh(self)
            elif split.path.startswith("/bucket/"):
                body = fake.bucket.get(split.path[len("/bucket/") :])
                self.send(200, body) if body is not None else self.send(404, b"no such key")
            elif split.path.startswith(("/data/", "/tasks/", "/storage-data/")):
                if not fake.authorized(self.headers.get("Authorization", "")):
                    if fake.login_redirect:
                        self.send(302, b"", Location=f"/user/login/?next={split.path}")
                    else:
                        self.send(401, b'{"detail":"Authentication credentials were not provided."}')
                    return
                fake.serve_ls(self, split.path, parse_qs(split.query))
            elif split.path == "/user/login/":
                self.send(200, b"<!DOCTYPE html><html><body>Log in</body></html>", "text/html; charset=utf-8")
            else:
                self.send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeLS

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakeLS:
    """A Label Studio stand-in: legacy token, PATs exchanged for short-lived access JWTs, presign redirects."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.routes: dict[str, Route] = {}
        self.files: dict[str, bytes] = {}  # "/data/upload/1/a.png" -> bytes
        self.local_files: dict[str, bytes] = {}  # ?d= value -> bytes
        self.bucket: dict[str, bytes] = {}  # key -> bytes, served on the *other* origin
        self.pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600, "jti": uuid.uuid4().hex})
        self.access_lifetime_s = 300.0
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.login_redirect = False
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.fake = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Return Label Studio's origin."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def other_url(self) -> str:
        """Return the same server under another origin (a third-party host, e.g. a bucket)."""
        return f"http://localhost:{self.port}"

    def __enter__(self) -> FakeLS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests_to(self, prefix: str) -> list[Seen]:
        """Return the requests whose path starts with prefix."""
        return [s for s in self.seen if s.path.startswith(prefix)]

    def refresh(self, handler: Handler) -> None:
        """Serve POST /api/token/refresh/."""
        length = int(handler.headers.get("Content-Length", "0"))
        try:
            refresh = json.loads(handler.rfile.read(length)).get("refresh")
        except ValueError:
            refresh = None
        if refresh != self.pat:
            handler.send(
                401, b'{"detail":"Token is invalid or expired","code":"token_not_valid"}', "application/json"
            )
            return
        access = make_jwt(
            {"token_type": "access", "exp": time.time() + self.access_lifetime_s, "jti": uuid.uuid4().hex}
        )
        with self._lock:
            self.issued.append(access)
        handler.send(200, json.dumps({"access": access}).encode(), "application/json")

    def authorized(self, header: str) -> bool:
        """Check an Authorization header the way Label Studio does."""
        kind, _, token = header.partition(" ")
        if kind == "Token":
            return token == LEGACY_TOKEN
        if kind == "Bearer":
            if token not in self.issued or token in self.revoked:
                return False
            return jwt_payload(token)["exp"] > time.time()
        return False

    def serve_ls(self, handler: Handler, path: str, query: dict[str, list[str]]) -> None:
        """Serve authenticated Label Studio paths."""
        if path.startswith("/tasks/") and path.endswith("/presign/"):
            fileuri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
            key = fileuri.split("://", 1)[1]
            location = f"{self.other_url}/bucket/{quote(key)}?X-Amz-Credential=AKIA&X-Amz-Signature=secret123"
            handler.send(303, b"", Location=location)
            return
        if path.rstrip("/") == "/data/local-files":
            body = self.local_files.get(query.get("d", [""])[-1])
        else:
            body = self.files.get(path)
        if body is None:
            handler.send(404, b"not found")
        else:
            handler.send(200, body, "image/png")
