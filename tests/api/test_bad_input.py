"""Bad input, table-driven: each case gets a clear 4xx or a per-task error entry (retryable); never a 500."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.support.fakes import FAMILIES, FakeBrush, reset_fakes
from tests.support.httpserver import LocalServer, redirect, slow, static

RECT = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels></View>"""
NER = """<View><Text name="text" value="$text"/>
  <Labels name="ner" toName="text"><Label value="PER"/><Label value="ORG"/></Labels></View>"""
BRUSH = """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Blob" predicted_values="blob"/></BrushLabels></View>"""


def image_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    color: Any = {
        "RGB": (200, 10, 10),
        "RGBA": (0, 0, 255, 128),
        "CMYK": (0, 255, 255, 0),
        "I;16": 40000,
        "LA": (90, 100),
        "P": 3,
        "L": 7,
    }[mode]
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (64, 32), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in a few bytes (decompression bomb / 20000x20000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def server():
    jpeg = image_bytes(fmt="JPEG")
    srv = LocalServer(
        {
            "/ok.png": static(image_bytes(), "image/png"),
            "/tiny.png": static(image_bytes((1, 1)), "image/png"),
            "/cmyk.jpg": static(image_bytes(mode="CMYK", fmt="JPEG"), "image/jpeg"),
            "/16bit.png": static(image_bytes(mode="I;16"), "image/png"),
            "/alpha.png": static(image_bytes(mode="RGBA"), "image/png"),
            "/la.png": static(image_bytes(mode="LA"), "image/png"),
            "/palette.gif": static(image_bytes(mode="P", fmt="GIF"), "image/gif"),
            "/exif.jpg": static(exif_rotated_jpeg(), "image/jpeg"),
            "/truncated.jpg": static(jpeg[: len(jpeg) // 2], "image/jpeg"),
            "/corrupt.jpg": static(b"\xff\xd8\xff\xe0" + b"garbage" * 50, "image/jpeg"),
            "/bomb.png": static(png_header_only(20000, 20000), "image/png"),
            "/html.png": static(b"<!doctype html><html><body>Login</body></html>", "text/html"),
            "/loop": redirect("/loop"),
            "/slow.png": slow(5.0),
            "/latin1.txt": static("Zoë met Renée in Málaga".encode("latin-1"), "text/plain"),
            "/big.bin": static(b"\0" * (3 * 1024 * 1024), "image/png"),
            "/data/upload/1/ok.png": static(image_bytes(), "image/png"),
            "/data/upload/1/e500.png": static(b"server error", "text/plain", 500),
            "/data/upload/1/e401.png": static(b'{"detail": "bad token"}', "application/json", 401),
        }
    )
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    (root / "ok.png").write_bytes(image_bytes())
    settings = Settings(
        model_dir=str(tmp_path_factory.mktemp("model_dir")),
        download_timeout_s=0.5,
        max_download_bytes=1024 * 1024,
        max_image_pixels=50_000_000,
        max_text_chars=1_000_000,
        max_tasks_per_request=100,
        local_files_document_root=str(root),
        label_studio_url=server.url,
        max_wait_ms=1.0,
    )
    app = create_app(settings, runtime=Runtime(settings, families=FAMILIES))
    return app.test_client()


@pytest.fixture(autouse=True)
def _reset() -> None:
    reset_fakes()


def image_task(url: str, **extra: Any) -> dict[str, Any]:
    return {"tasks": [{"id": 7, "data": {"image": url}, **extra}], "label_config": RECT}


def text_task(text: Any) -> dict[str, Any]:
    return {"tasks": [{"id": 8, "data": {"text": text}}], "label_config": NER}


Check = Callable[[dict[str, Any]], None]


def failed(results: dict[str, Any]) -> None:
    """One entry, with the reason and no "result": Label Studio stores nothing, so it asks again."""
    (entry,) = results["results"]
    assert "result" not in entry, entry
    assert isinstance(entry["error"], str) and entry["error"], entry
    assert entry["model_version"]


def nothing(results: dict[str, Any]) -> None:
    """One entry with an empty result: the model ran and found nothing (stored, never asked again)."""
    (entry,) = results["results"]
    assert entry["result"] == [] and entry["score"] == 0.0 and "error" not in entry, entry


def regions(n: int | None = None, size: tuple[int, int] | None = None) -> Check:
    def check(results: dict[str, Any]) -> None:
        (prediction,) = results["results"]
        assert prediction["result"], "expected regions"
        if n is not None:
            assert len(prediction["result"]) == n
        if size is not None:
            first = prediction["result"][0]
            assert (first["original_width"], first["original_height"]) == size

    return check


# (case id, body builder(server url) -> dict | bytes, expected status, check on the JSON body)
CASES: list[tuple[str, Callable[[str], Any], int, Check | None]] = [
    ("non-json body", lambda u: b"{not json", 400, None),
    ("non-utf8 body", lambda u: b'{"tasks": "\xff\xfe"}', 400, None),
    ("json list", lambda u: [1, 2, 3], 400, None),
    ("json string", lambda u: "tasks", 400, None),
    ("tasks not a list", lambda u: {"tasks": {"id": 1}, "label_config": RECT}, 400, None),
    ("tasks empty", lambda u: {"tasks": [], "label_config": RECT}, 400, None),
    ("no label_config, no setup", lambda u: {"tasks": [{"data": {"image": "x"}}]}, 400, None),
    ("label_config not a string", lambda u: {"tasks": [{"data": {}}], "label_config": 5}, 400, None),
    ("invalid xml", lambda u: {"tasks": [{"data": {}}], "label_config": "<View><Image"}, 422, None),
    ("empty xml", lambda u: {"tasks": [{"data": {}}], "label_config": ""}, 400, None),
    (
        "huge xml",
        lambda u: {
            "tasks": [{"data": {}}],
            "label_config": "<View>" + "<Text name='t' value='$t'/>" * 40000 + "</View>",
        },
        422,
        None,
    ),
    (
        "unsupported tags only",
        lambda u: {
            "tasks": [{"data": {}}],
            "label_config": '<View><Text name="t" value="$t"/><Rating name="r" toName="t"/></View>',
        },
        422,
        None,
    ),
    ("too many tasks", lambda u: {"tasks": [{"data": {"text": "a"}}] * 101, "label_config": NER}, 413, None),
    ("context not an object", lambda u: {**text_task("Bob"), "params": {"context": "x"}}, 400, None),
    ("task without data", lambda u: {"tasks": [{"id": 1}], "label_config": RECT}, 200, failed),
    ("task is a string", lambda u: {"tasks": ["hello"], "label_config": RECT}, 200, failed),
    ("data is a list", lambda u: {"tasks": [{"data": [1]}], "label_config": RECT}, 200, failed),
    ("$value key absent", lambda u: {"tasks": [{"data": {"img": "x"}}], "label_config": RECT}, 200, failed),
    ("image value is a number", lambda u: image_task(42), 200, failed),  # type: ignore[arg-type]
    ("empty image url", lambda u: image_task(""), 200, failed),
    ("image 404", lambda u: image_task(f"{u}/nope.png"), 200, failed),
    ("image timeout", lambda u: image_task(f"{u}/slow.png"), 200, failed),
    ("redirect loop", lambda u: image_task(f"{u}/loop"), 200, failed),
    ("html instead of image", lambda u: image_task(f"{u}/html.png"), 200, failed),
    ("truncated jpeg", lambda u: image_task(f"{u}/truncated.jpg"), 200, failed),
    ("corrupt jpeg", lambda u: image_task(f"{u}/corrupt.jpg"), 200, failed),
    ("decompression bomb 20000x20000", lambda u: image_task(f"{u}/bomb.png"), 200, failed),
    ("download over size limit", lambda u: image_task(f"{u}/big.bin"), 200, failed),
    ("1x1 image", lambda u: image_task(f"{u}/tiny.png"), 200, regions(size=(1, 1))),
    ("cmyk jpeg", lambda u: image_task(f"{u}/cmyk.jpg"), 200, regions(size=(64, 48))),
    ("16-bit png", lambda u: image_task(f"{u}/16bit.png"), 200, regions(size=(64, 48))),
    ("alpha png", lambda u: image_task(f"{u}/alpha.png"), 200, regions(size=(64, 48))),
    ("grey+alpha png", lambda u: image_task(f"{u}/la.png"), 200, regions(size=(64, 48))),
    ("palette gif", lambda u: image_task(f"{u}/palette.gif"), 200, regions(size=(64, 48))),
    ("exif-rotated jpeg", lambda u: image_task(f"{u}/exif.jpg"), 200, regions(size=(32, 64))),
    ("local-files ok", lambda u: image_task("/data/local-files/?d=ok.png"), 200, regions(size=(64, 48))),
    ("local-files traversal", lambda u: image_task("/data/local-files/?d=../../etc/passwd"), 200, failed),
    (
        "local-files encoded traversal",
        lambda u: image_task("/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd"),
        200,
        failed,
    ),
    (
        "s3 without task id",
        lambda u: {"tasks": [{"data": {"image": "s3://bucket/a.png"}}], "label_config": RECT},
        200,
        failed,
    ),
    (
        "cloud metadata address",
        lambda u: image_task("http://169.254.169.254/latest/meta-data/iam"),
        200,
        failed,
    ),
    ("ipv6 metadata address", lambda u: image_task("http://[fd00:ec2::254]/latest/meta-data"), 200, failed),
    ("file:// scheme", lambda u: image_task("file:///etc/passwd"), 200, failed),
    (
        "data uri image",
        lambda u: image_task(
            "data:image/png;base64," + __import__("base64").b64encode(image_bytes()).decode()
        ),
        200,
        regions(size=(64, 48)),
    ),
    ("data uri garbage", lambda u: image_task("data:image/png;base64,!!!!"), 200, failed),
    ("LS upload ok", lambda u: image_task("/data/upload/1/ok.png"), 200, regions(size=(64, 48))),
    ("LS answers 500 (retried, then error)", lambda u: image_task("/data/upload/1/e500.png"), 200, failed),
    ("LS answers 401", lambda u: image_task("/data/upload/1/e401.png"), 200, failed),
    ("empty text", lambda u: text_task(""), 200, nothing),
    ("text of 10 MB", lambda u: text_task("Bob " * 2_500_000), 200, failed),
    ("text is a list", lambda u: text_task(["Bob"]), 200, failed),
    ("non-utf8 text url", lambda u: text_task(f"{u}/latin1.txt"), 200, regions()),
    ("lone surrogate text", lambda u: text_task("Bob \ud800 Alice"), 200, None),
]


@pytest.mark.parametrize(("body", "status", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(client, server, body, status: int, check: Check | None) -> None:
    payload = body(server.url)
    started = time.perf_counter()
    if isinstance(payload, bytes):
        response = client.post("/predict", data=payload, content_type="application/json")
    else:
        response = client.post("/predict", data=json.dumps(payload), content_type="application/json")
    elapsed = time.perf_counter() - started
    text = response.get_data(as_text=True)
    assert response.status_code == status, text[:500]
    assert "Traceback" not in text
    assert elapsed < 10, "no request may hang past its timeouts"
    if status >= 400:
        assert response.json["message"]
    if check is not None:
        check(response.json)


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40


def test_metadata_address_is_refused_before_any_connection(client, server) -> None:
    before = len(server.hits)
    client.post("/predict", json=image_task("http://169.254.169.254/latest/meta-data/"))
    assert len(server.hits) == before


def test_brush_heavy_config_with_1000_regions(client, server) -> None:
    FakeBrush.regions = 1000
    started = time.perf_counter()
    response = client.post(
        "/predict", json={"tasks": [{"data": {"image": f"{server.url}/ok.png"}}], "label_config": BRUSH}
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    (prediction,) = response.json["results"]
    assert len(prediction["result"]) == 1000
    assert all(
        r["value"]["format"] == "rle" and r["value"]["brushlabels"] == ["Blob"] for r in prediction["result"]
    )
    assert elapsed < 30


def test_label_studio_unreachable_gives_error_entries_quickly(tmp_path: Path) -> None:
    settings = Settings(
        model_dir=str(tmp_path), label_studio_url="http://127.0.0.1:9", download_timeout_s=1.0
    )
    client = create_app(settings, runtime=Runtime(settings, families=FAMILIES)).test_client()
    started = time.perf_counter()
    response = client.post("/predict", json=image_task("/data/upload/1/a.png"))
    assert response.status_code == 200
    failed(response.json)
    assert time.perf_counter() - started < 5


def test_label_studio_500_is_retried_with_backoff(client, server) -> None:
    before = sum(1 for path, _ in server.hits if path.startswith("/data/upload/1/e500.png"))
    client.post("/predict", json=image_task("/data/upload/1/e500.png?again"))
    after = sum(1 for path, _ in server.hits if path.startswith("/data/upload/1/e500.png"))
    # retried with backoff while the 0.5 s download deadline allows (0.2 s, then 0.5 s would overrun it)
    assert after - before == 2


def test_request_body_over_the_limit_is_413(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path), max_request_bytes=1000)
    client = create_app(settings, runtime=Runtime(settings, families=FAMILIES)).test_client()
    response = client.post("/predict", json={"tasks": [{"data": {"text": "x" * 2000}}], "label_config": NER})
    assert response.status_code == 413
    assert "MAX_REQUEST_BYTES" in response.json["message"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("get", "/nope", None, 404),
        ("get", "/predict", None, 405),
        ("post", "/setup", {"project": "1"}, 400),
        ("post", "/setup", {"schema": 5}, 400),
        ("post", "/webhook", {"no": "action"}, 400),
        ("post", "/webhook", b"[]", 400),
    ],
)
def test_other_routes_reject_bad_input_cleanly(
    client, method: str, path: str, body: Any, status: int
) -> None:
    if isinstance(body, bytes):
        response = getattr(client, method)(path, data=body, content_type="application/json")
    else:
        response = getattr(client, method)(path, json=body)
    assert response.status_code == status
    assert response.json["message"]
