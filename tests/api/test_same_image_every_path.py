"""One image decoder: the same odd or broken bytes get the same verdict on every path that reads images.

/predict (a data: URI through the network resolver), a batch job over a server-side folder, the
command line, the trainer's image loading and a Ray actor's predictor (built in this process: the
same class Ray runs) all decode through serving/fetch/decode.py's ImageDecoder.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.cli import main as cli
from serving.contract import Backend, Example, Item, Target
from serving.errors import InputError
from serving.fetch.local import build_resolver
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.jobs.engines.ray import RayPredictor, RuntimeFactory
from serving.jobs.output import iter_output
from serving.jobs.store import JobStore
from serving.results import regions
from serving.settings import Settings
from serving.training.run import Run
from serving.training.store import TrainingJob, TrainingStore

CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image"><Label value="Thing"/></RectangleLabels></View>'
)


class Probe(Backend):
    """One full-image box per image; its score fingerprints the decoded pixels (their mean)."""

    family = "probe"
    control_tags = ("RectangleLabels",)
    default_model = "probe"

    def load(self, device: str) -> None:
        """Nothing to load."""

    def preprocess(self, item: Item) -> tuple[tuple[int, int], float]:
        """Return the size as shown and the pixels' fingerprint."""
        assert item.image is not None
        return item.size, fingerprint(item.image)

    def forward(self, batch: list[Any]) -> list[Any]:
        """Pass the sizes and fingerprints through."""
        return batch

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit one box over the whole image with the fingerprint as its score."""
        (w, h), score = output
        return regions.rectangle_items(target, (0, 0, w, h), (w, h), score, "Thing")


FAMILIES = {"probe": Probe}


def fingerprint(image: Image.Image) -> float:
    """Return the mean of the RGB pixels in [0, 1], rounded (equal for equal pixels)."""
    return round(float(np.asarray(image.convert("RGB"), dtype=np.float64).mean()) / 255.0, 6)


# ---------------------------------------------------------------------------------------------- the images


def _jpeg(image: Image.Image, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def broken_exif() -> bytes:
    """A JPEG whose EXIF says "rotate" but holds an XResolution as text, which Pillow cannot rewrite.

    ImageOps.exif_transpose raises on it (TypeError in Exif.tobytes); /predict always ignored that.
    """
    text = b"Camera\x00"
    entries = [
        (0x011A, 2, len(text), struct.pack(">I", 8 + 2 + 2 * 12 + 4)),
        (0x0112, 3, 1, b"\x00\x06\x00\x00"),
    ]
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        tiff += struct.pack(">HHI", tag, kind, count) + value
    tiff += struct.pack(">I", 0) + text
    gradient = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (32, 1, 3))
    return _jpeg(Image.fromarray(gradient), exif=b"Exif\x00\x00" + tiff)


def png16() -> bytes:
    """A 16-bit grayscale PNG (mode I;16), which a plain convert("RGB") would clip to white."""
    values = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")  # uint16: mode I;16
    return buf.getvalue()


def cmyk() -> bytes:
    """A CMYK JPEG (print workflows export these)."""
    return _jpeg(Image.new("CMYK", (24, 18), (10, 200, 30, 5)))


def animated_gif() -> bytes:
    """A two-frame GIF: the first frame is what Label Studio shows."""
    frames = [Image.new("P", (20, 10), 1), Image.new("P", (20, 10), 2)]
    frames[0].putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def eps() -> bytes:
    """An EPS file (Pillow would run Ghostscript on it): not in the decoder's format allow-list."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


IMAGES = {
    "broken_exif.jpg": broken_exif(),
    "empty.png": b"",
    "unsupported.tif": eps(),
    "sixteen_bit.png": png16(),
    "cmyk.jpg": cmyk(),
    "animated.gif": animated_gif(),
}
MIME = {".jpg": "image/jpeg", ".png": "image/png", ".tif": "image/tiff", ".gif": "image/gif"}

Verdict = tuple[Any, ...]


def reason_kind(message: str) -> str:
    """Return what a failure says, without the name the path gives the image (URL, file name)."""
    for kind in ("empty (0 bytes)", "not an image this server can read", "truncated or corrupt"):
        if kind in message:
            return kind
    return message


def verdict_of(prediction: dict[str, Any] | None, error: str | None) -> Verdict:
    """Return ("ok", width, height, fingerprint) or ("failed", what the reason says)."""
    if prediction is not None and prediction.get("result"):
        (region,) = prediction["result"]
        return ("ok", region["original_width"], region["original_height"], region["score"])
    return ("failed", reason_kind(str(error or (prediction or {}).get("error"))))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Write the images into an input folder (under the server's BATCH_INPUT_ROOT)."""
    root = tmp_path / "inputs" / "odd"
    root.mkdir(parents=True)
    for name, body in IMAGES.items():
        (root / name).write_bytes(body)
    return root


def expected() -> dict[str, Verdict]:
    """Return the decoder's own verdicts, read straight from the bytes (what every path must agree with)."""
    resolver = build_resolver(Settings())
    out: dict[str, Verdict] = {}
    for name, body in IMAGES.items():
        uri = f"data:{MIME[name[-4:]]};base64," + base64.b64encode(body).decode()
        try:
            image = resolver.load_image(uri)
        except InputError as exc:
            out[name] = ("failed", reason_kind(str(exc)))
        else:
            out[name] = ("ok", image.width, image.height, fingerprint(image))
    return out


# ---------------------------------------------------------------------------------------------- the paths


def via_predict(tmp_path: Path) -> dict[str, Verdict]:
    settings = Settings(model_dir=str(tmp_path / "md-predict"), max_wait_ms=1.0)
    app = create_app(settings, runtime=Runtime(settings, FAMILIES))
    names = list(IMAGES)
    tasks = [
        {"id": i, "data": {"image": f"data:{MIME[n[-4:]]};base64," + base64.b64encode(IMAGES[n]).decode()}}
        for i, n in enumerate(names)
    ]
    try:
        response = app.test_client().post("/predict", json={"tasks": tasks, "label_config": CONFIG})
        assert response.status_code == 200, response.json
        return {n: verdict_of(p, None) for n, p in zip(names, response.json["results"], strict=True)}
    finally:
        app.extensions["lsml_jobs"].close()


def via_batch_job(tmp_path: Path, folder: Path) -> dict[str, Verdict]:
    settings = Settings(
        model_dir=str(tmp_path / "md-batch"), batch_input_root=str(folder.parent), max_wait_ms=1.0
    )
    app = create_app(settings, runtime=Runtime(settings, FAMILIES))
    client = app.test_client()
    try:
        response = client.post("/batch", json={"label_config": CONFIG, "input": folder.name})
        assert response.status_code == 202, response.json
        status = app.extensions["lsml_jobs"].wait(response.json["job_id"], 60)
        assert status["state"] == "done", status
        tasks = json.loads(client.get(f"/jobs/{status['job_id']}/result").data)
        reasons = {f["index"]: f["reason"] for f in status["failures"]}
        out = {}
        for i, task in enumerate(tasks):
            name = Path(task["data"]["image"]).name
            out[name] = verdict_of((task.get("predictions") or [None])[0], reasons.get(i))
        return out
    finally:
        app.extensions["lsml_jobs"].close()


def via_cli(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Verdict]:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "md-cli"))
    config = tmp_path / "config.xml"
    config.write_text(CONFIG)
    output = tmp_path / "out.json"
    argv = ["predict", "--config", str(config), "--input", str(folder), "--output", str(output)]
    assert cli.main([*argv, "--keep-state", "--quiet"], families=lambda: FAMILIES) == cli.EXIT_OK
    store = JobStore(Path(str(output) + ".state"))
    try:
        return {Path(t["data"]["image"]).name: verdict_of(p, e) for _, t, p, e in iter_output(store)}
    finally:
        store.close()


def via_trainer(tmp_path: Path, folder: Path) -> dict[str, Verdict]:
    settings = Settings(model_dir=str(tmp_path / "md-train"))
    job = TrainingJob("0123456789ab", "1", "probe:probe", "probe", "probe", "", "cpu", "running", CONFIG, {})
    # the resolver `python -m serving train` gives the run: file:// under the export's folder
    run = Run(
        job=job,
        store=TrainingStore(tmp_path / "training"),
        settings=settings,
        targets=(),
        examples=(),
        output_dir=tmp_path / "train-out",
        device="cpu",
        resolver=build_resolver(settings, roots=[folder]),
    )
    out: dict[str, Verdict] = {}
    for path in sorted(folder.iterdir()):
        try:
            image, _, _ = run.load_image(Example(task_id=1, control="box", obj="image", image=path.as_uri()))
        except InputError as exc:
            out[path.name] = ("failed", reason_kind(str(exc)))
        else:
            out[path.name] = ("ok", image.width, image.height, fingerprint(image))
    return out


def via_ray_actor(tmp_path: Path, folder: Path) -> dict[str, Verdict]:
    settings = Settings(model_dir=str(tmp_path / "md-ray"), batch_input_root=str(folder), max_wait_ms=1.0)
    predictor = RayPredictor(RuntimeFactory(settings, FAMILIES, (str(folder),)), CONFIG, ready_timeout_s=30)
    try:
        paths = sorted(folder.iterdir())
        batch = {
            "idx": list(range(len(paths))),
            "task_json": [json.dumps({"data": {"image": p.as_uri()}}) for p in paths],
        }
        rows = predictor(batch)
        return {
            p.name: verdict_of(json.loads(pred) if pred else None, err or None)
            for p, pred, err in zip(paths, rows["prediction"], rows["error"], strict=True)
        }
    finally:
        predictor.runtime.close()


def test_the_decoder_itself_accepts_the_odd_images_and_refuses_the_bad_ones() -> None:
    verdicts = expected()
    assert verdicts["empty.png"] == ("failed", "empty (0 bytes)")
    assert verdicts["unsupported.tif"] == ("failed", "not an image this server can read")
    # the broken EXIF block is ignored: the image is served as the browser shows it (rotated by its tag)
    assert verdicts["broken_exif.jpg"][:3] == ("ok", 32, 48)
    assert verdicts["sixteen_bit.png"][:3] == ("ok", 30, 20)
    assert 0.05 < verdicts["sixteen_bit.png"][3] < 0.95  # scaled to 8 bits, not clipped to white
    assert verdicts["cmyk.jpg"][:3] == ("ok", 24, 18)
    assert verdicts["animated.gif"][:3] == ("ok", 20, 10)


def test_every_path_gives_the_same_bytes_the_same_verdict(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = expected()
    paths = {
        "/predict": via_predict(tmp_path),
        "batch job over a folder": via_batch_job(tmp_path, folder),
        "command line": via_cli(tmp_path, folder, monkeypatch),
        "trainer's image loading": via_trainer(tmp_path, folder),
        "Ray actor": via_ray_actor(tmp_path, folder),
    }
    for path, verdicts in paths.items():
        assert verdicts == want, path
