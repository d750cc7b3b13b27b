"""Session fixtures for the end-to-end tests: one Label Studio and one of our servers per test session."""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.ls_harness import (
    LS_VENV,
    LS_VERSION,
    LabelStudio,
    MLServer,
    chromium_executable,
    ls_executable,
    sigterm_unwinds,
)

log = logging.getLogger(__name__)

NER_CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="Person" background="red"/>
    <Label value="Organization" background="darkorange"/>
    <Label value="Location" background="orange"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""

OCR_CONFIG = """<View>
  <Image name="image" value="$ocr"/>
  <Labels name="label" toName="image">
    <Label value="Text" background="green"/>
    <Label value="Handwriting" background="blue"/>
  </Labels>
  <Rectangle name="bbox" toName="image" strokeWidth="3"/>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" required="true"
            maxSubmissions="1" rows="5" placeholder="Recognized Text" displayMode="region-list"/>
</View>"""

# A config no backend of ours can fill: Label Studio must show our reason.
RATING_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Rating name="rating" toName="text" maxRating="5"/>
</View>"""

# Interactive segmentation: clicks with the smart keypoint tool come back as brush masks. The
# checkpoint is a small random SAM 2 saved by the test (no SAM weights exist offline); {model_path}
# is filled with its folder.
SAM_CONFIG_TEMPLATE = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Cat" background="orange" smart="true"/>
  </KeyPointLabels>
  <BrushLabels name="mask" toName="image" model_path="{model_path}">
    <Label value="Cat" background="orange"/>
    <Label value="Background" background="blue"/>
  </BrushLabels>
</View>"""
SAM_IMAGE_SIZE = (320, 240)
SAM_MODEL_NAME = "facebook/sam2.1-hiera-tiny"

NER_TEXTS = (
    "Barack Obama was born in Hawaii.",
    "Angela Merkel met Emmanuel Macron in Paris.",
    "The weather was nice yesterday.",
)
# Imported after the batch action, so opening it is what makes Label Studio ask for a prediction.
NER_OPEN_TEXT = "Barack Obama visited London."


def _required(what: str, hint: str) -> None:
    """Fail in CI (a missing set-up must not pass silently there); skip on a developer machine."""
    message = f"{what} is missing: {hint}"
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def text_image(text: str, size: tuple[int, int] = (480, 160)) -> bytes:
    """Render black text on white as a PNG (what the OCR project uploads to Label Studio)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=72)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    xy = ((size[0] - (right - left)) // 2 - left, (size[1] - (bottom - top)) // 2 - top)
    draw.text(xy, text, fill="black", font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def text_box_pct(text: str, size: tuple[int, int] = (480, 160), pad_px: int = 12) -> dict[str, float]:
    """Return the percent rectangle around the rendered text, padded, as a user would draw it."""
    from PIL import Image, ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", size))
    font = ImageFont.load_default(size=72)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x0 = (size[0] - (right - left)) // 2 - pad_px
    y0 = (size[1] - (bottom - top)) // 2 - pad_px
    w, h = right - left + 2 * pad_px, bottom - top + 2 * pad_px
    return {
        "x": 100.0 * x0 / size[0],
        "y": 100.0 * y0 / size[1],
        "width": 100.0 * w / size[0],
        "height": 100.0 * h / size[1],
        "rotation": 0,
    }


def drawn_rectangle(
    region_id: str, box_pct: dict[str, float], size: tuple[int, int] = (480, 160)
) -> dict[str, Any]:
    """Return the OCR project's rectangle as the labeling page sends it when an annotator draws one."""
    return {
        "id": region_id,
        "from_name": "bbox",
        "to_name": "image",
        "type": "rectangle",
        "origin": "manual",
        "original_width": size[0],
        "original_height": size[1],
        "image_rotation": 0,
        "value": box_pct,
    }


@dataclass
class Project:
    """A Label Studio project connected to our server, with its task ids."""

    id: int
    ml_id: int
    config: str
    task_ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the session's scratch dir (Label Studio data, logs, caches)."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return where screenshots and logs are kept: E2E_ARTIFACTS, else a pytest temp dir."""
    configured = os.environ.get("E2E_ARTIFACTS")
    path = Path(configured) if configured else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def label_studio(e2e_root: Path, artifacts_dir: Path) -> Iterator[LabelStudio]:
    """Start Label Studio once per session; stop it (and its process group) at the end."""
    if ls_executable() is None:
        _required(f"label-studio {LS_VERSION} in {LS_VENV}", "run scripts/setup_e2e.sh (or make e2e-setup)")
    ls = LabelStudio(e2e_root / "label-studio")
    ls.root.mkdir(parents=True, exist_ok=True)
    with sigterm_unwinds():
        try:
            ls.start()
            yield ls
        finally:
            ls.stop()
            if ls.proc is not None:
                shutil.copyfile(ls.proc.log_path, artifacts_dir / "label-studio.log")


def start_ml_server(root: Path, ls: LabelStudio, api_key: str, warmup: str = "ner,ocr") -> MLServer:
    """Start our server pointed at Label Studio with an API key; the caller stops it."""
    server = MLServer(root, {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": api_key, "WARMUP": warmup})
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def ml_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Start our server under gunicorn once per session, with the legacy token of Label Studio's user."""
    server = start_ml_server(e2e_root / "ml-server", label_studio, label_studio.token)
    try:
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-server.log")


def connect(ls: LabelStudio, server: MLServer, project: int) -> int:
    """Connect our server to a project and return the ML backend id (asserting it is Connected)."""
    ml = ls.connect_ml(project, server.url)
    state = ls.ml_backend(int(ml["id"]))
    assert state["state"] == "CO", f"backend not connected: {state}"
    return int(ml["id"])


@pytest.fixture(scope="session")
def ner_project(label_studio: LabelStudio, ml_server: MLServer) -> Project:
    """Return an NER project with our server connected and NER_TEXTS imported."""
    project = label_studio.create_project("e2e NER", NER_CONFIG)
    ml_id = connect(label_studio, ml_server, int(project["id"]))
    ids = label_studio.import_json(int(project["id"]), [{"data": {"text": t}} for t in NER_TEXTS])
    assert len(ids) == len(NER_TEXTS)
    return Project(int(project["id"]), ml_id, NER_CONFIG, ids)


@pytest.fixture(scope="session")
def ocr_project(label_studio: LabelStudio, ml_server: MLServer) -> Project:
    """Return an OCR project with our server connected and a "HELLO" image uploaded to Label Studio."""
    project = label_studio.create_project("e2e OCR", OCR_CONFIG)
    ml_id = connect(label_studio, ml_server, int(project["id"]))
    ids = label_studio.import_file(int(project["id"]), "hello.png", text_image("HELLO"), "image/png")
    assert len(ids) == 1
    return Project(int(project["id"]), ml_id, OCR_CONFIG, ids)


def sam_image(size: tuple[int, int] = SAM_IMAGE_SIZE) -> bytes:
    """Return a PNG of an orange disk on a grey-blue background (what the SAM project uploads)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (70, 90, 120))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.3, h * 0.25, w * 0.7, h * 0.8), fill=(235, 140, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SamSetup:
    """Our server serving a small random SAM 2 from a folder, and a project using it."""

    server: MLServer
    project: Project
    model_path: Path


@pytest.fixture(scope="session")
def sam_setup(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[SamSetup]:
    """Start a server of ours with a small random SAM 2 (model_path), and a project with an uploaded image."""
    from tests.backends._sam_support import build_sam2

    model_path = build_sam2(e2e_root / "sam2-tiny-random")
    server = start_ml_server(
        e2e_root / "ml-server-sam",
        label_studio,
        label_studio.token,
        warmup=f"sam:{SAM_MODEL_NAME}@{model_path}",
    )
    try:
        config = SAM_CONFIG_TEMPLATE.format(model_path=model_path)
        created = label_studio.create_project("e2e SAM", config)
        ml_id = connect(label_studio, server, int(created["id"]))
        ids = label_studio.import_file(int(created["id"]), "disk.png", sam_image(), "image/png")
        assert len(ids) == 1
        yield SamSetup(server, Project(int(created["id"]), ml_id, config, ids), model_path)
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-server-sam.log")


@pytest.fixture(scope="session")
def browser_ready() -> str:
    """Return the chromium binary, or fail in CI / skip locally when it or websocket-client is missing."""
    exe = chromium_executable()
    if exe is None:
        _required("chromium", "run scripts/setup_e2e.sh (installs Debian's chromium as root)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        _required("the websocket-client package", "pip install -r requirements-dev.txt")
    assert exe is not None
    return exe
