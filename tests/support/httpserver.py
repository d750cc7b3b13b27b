"""A tiny threaded HTTP server on 127.0.0.1 with scripted routes, for tests that fetch URLs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = Callable[[BaseHTTPRequestHandler], None]


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Write one complete response."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass


def static(body: bytes, content_type: str = "application/octet-stream", status: int = 200) -> Route:
    """Return a route that answers a fixed body."""
    return lambda h: send(h, status, body, content_type)


def redirect(location: str, status: int = 302) -> Route:
    """Return a route that redirects."""
    return lambda h: send(h, status, b"", "text/plain", {"Location": location})


def slow(seconds: float) -> Route:
    """Return a route that sleeps before answering (a hung server)."""

    def route(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        send(h, 200, b"late", "text/plain")

    return route


class LocalServer:
    """Serve `routes` (path -> handler) on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.hits: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append((self.path, dict(self.headers)))
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    send(self, 404, b"not found", "text/plain")
                else:
                    route(self)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()
