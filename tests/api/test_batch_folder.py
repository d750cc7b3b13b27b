"""POST /batch over a server-side image folder: a job reads file:// images under BATCH_INPUT_ROOT only."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.support.fakes import FAMILIES

RECT = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/></RectangleLabels></View>"""


def test_image_folder_job_predicts_every_image_with_its_size(tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    folder = root / "shots"
    folder.mkdir(parents=True)
    sizes = {"a.png": (64, 48), "b.jpg": (30, 90), "c.png": (200, 100)}
    for name, size in sizes.items():
        Image.new("RGB", size, "white").save(folder / name)
    settings = Settings(model_dir=str(tmp_path / "md"), batch_input_root=str(root), max_wait_ms=1.0)
    client = create_app(settings, runtime=Runtime(settings, families=FAMILIES)).test_client()

    response = client.post("/batch", json={"label_config": RECT, "input": str(folder)})
    assert response.status_code == 202, response.json
    job_id = response.json.get("job_id") or response.json["id"]
    deadline = time.time() + 30
    while client.get(f"/jobs/{job_id}").json["state"] not in {"done", "failed"} and time.time() < deadline:
        time.sleep(0.05)
    status = client.get(f"/jobs/{job_id}").json
    assert status["state"] == "done", status
    tasks = json.loads(client.get(f"/jobs/{job_id}/result").get_data(as_text=True))
    assert len(tasks) == 3
    seen = {}
    for task in tasks:
        (prediction,) = task["predictions"]
        (region,) = prediction["result"]
        name = Path(str(task["data"]["image"])).name
        seen[name] = (region["original_width"], region["original_height"])
        assert region["value"]["rectanglelabels"] == ["Car"]
    assert seen == sizes


def test_input_outside_the_root_is_refused(tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path / "md"), batch_input_root=str(tmp_path / "inputs"))
    (tmp_path / "inputs").mkdir()
    client = create_app(settings, runtime=Runtime(settings, families=FAMILIES)).test_client()
    response = client.post("/batch", json={"label_config": RECT, "input": "/etc"})
    assert 400 <= response.status_code < 500
    assert response.json["message"]
