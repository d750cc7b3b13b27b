"""POST /predict through the Flask app with the real DataResolver against a fake Label Studio."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.support.fake_ls import LEGACY_TOKEN, FakeLS
from tests.support.fakes import FAMILIES, reset_fakes

CONFIG = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels></View>"""


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture
def fake_ls() -> Iterator[FakeLS]:
    reset_fakes()
    with FakeLS() as fake:
        yield fake


def _client(tmp_path: Path, **settings: Any) -> Any:
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0, download_timeout_s=2.0).with_(
        **settings
    )
    runtime = Runtime(cfg, families=FAMILIES)  # no resolver given: the real DataResolver is built
    assert runtime.resolver is runtime.resolver  # built once before the prep threads race for it
    return create_app(cfg, runtime=runtime).test_client()


def _sizes(prediction: dict[str, Any]) -> set[tuple[int, int]]:
    return {(r["original_width"], r["original_height"]) for r in prediction["result"]}


def test_predict_resolves_every_url_kind(tmp_path: Path, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/rotated.jpg"] = _jpeg(40, 20, orientation=6)
    fake_ls.bucket["bucket/b.jpg"] = _jpeg(30, 10)
    root = tmp_path / "root"
    root.mkdir()
    (root / "c.jpg").write_bytes(_jpeg(12, 34))
    (tmp_path / "secret.jpg").write_bytes(_jpeg(5, 5))
    data_uri = "data:image/jpeg;base64," + base64.b64encode(_jpeg(8, 6)).decode()
    client = _client(
        tmp_path,
        label_studio_url=fake_ls.url,
        label_studio_api_key=fake_ls.pat,
        local_files_document_root=str(root),
    )
    images = [
        "/data/upload/1/rotated.jpg",  # PAT exchanged; EXIF orientation 6: shown 20x40
        "s3://bucket/b.jpg",  # presigned by Label Studio for task 2
        "/data/local-files/?d=c.jpg",
        data_uri,
        f"{fake_ls.url}/data/upload/1/missing.jpg",  # 404
        "http://169.254.169.254/latest/meta-data/",  # refused
        "/data/local-files/?d=../secret.jpg",  # traversal refused
    ]
    tasks = [{"id": i + 1, "data": {"image": image}} for i, image in enumerate(images)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(tasks)
    assert [_sizes(p) for p in results[:4]] == [{(20, 40)}, {(30, 10)}, {(12, 34)}, {(8, 6)}]
    for prediction in results[:4]:
        assert {r["value"]["rectanglelabels"][0] for r in prediction["result"]} == {"Car"}
        assert prediction["score"] > 0
    for prediction in results[4:]:
        assert "result" not in prediction and prediction["error"]
    assert len(fake_ls.issued) == 1  # one exchange for the whole request
    assert "Authorization" not in fake_ls.requests_to("/bucket/")[0].headers
    assert fake_ls.requests_to("/data/local-files") == []


def test_setup_fallback_credentials_used_for_uploads(tmp_path: Path, fake_ls: FakeLS) -> None:
    fake_ls.files["/data/upload/1/a.jpg"] = _jpeg(16, 8)
    client = _client(tmp_path)  # no LABEL_STUDIO_URL / API key configured
    task = {"id": 1, "data": {"image": "/data/upload/1/a.jpg"}}
    before = client.post("/predict", json={"tasks": [task], "label_config": CONFIG}).json["results"]
    assert "result" not in before[0]  # Label Studio's URL unknown yet: an error entry, retried later
    setup = {"project": "1.1", "schema": CONFIG, "hostname": fake_ls.url, "access_token": LEGACY_TOKEN}
    assert client.post("/setup", json=setup).status_code == 200
    after = client.post("/predict", json={"tasks": [task], "label_config": CONFIG}).json["results"]
    assert _sizes(after[0]) == {(16, 8)}
    assert fake_ls.requests_to("/data/upload/")[-1].headers["Authorization"] == f"Token {LEGACY_TOKEN}"
