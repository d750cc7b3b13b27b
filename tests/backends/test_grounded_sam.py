"""Grounded-SAM: an open-vocabulary detector's boxes prompt SAM on one image embedding, one mask per box.

Tiny random Grounding DINO / OWLv2 and SAM 2 / SAM checkpoints are saved with save_pretrained() and
loaded through the real loading code. The detector's answers are planted for known phrases and SAM's
decoder output is planted as the box itself (the decoder still runs), so each mask must come back as
its box at the original size, under the label whose phrase found it, with the detector's score.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backends import _open_vocab as ov
from backends.grounded_sam import GroundedSamBackend
from model import families as all_families
from serving.cli import main as cli
from serving.cli import weights
from serving.contract import Backend, ModelSpec
from serving.errors import ModelUnavailable
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.results.schema import ConfigSchema
from serving.results.validation.checks import filter_valid
from serving.settings import Settings
from tests.backends._open_vocab_support import Plant, planted_grounded_family, save_dino, save_owl
from tests.backends._sam_support import build_sam1, build_sam2
from tests.support.fakes import FakeResolver

W, H = 600, 400
PLANTS = [
    Plant("car", (0.1, 0.2, 0.5, 0.6)),
    Plant("hi-vis jacket", (0.6, 0.55, 0.9, 0.95), logit=3.0),
    Plant("truck", (0.0, 0.0, 0.2, 0.2)),  # in no config: never prompted, never segmented
]
SCORE_CAR, SCORE_VEST = 1 / (1 + math.exp(-6.0)), 1 / (1 + math.exp(-3.0))
LABELS = (
    '<Label value="Car"/><Label value="Vest" predicted_values="safety vest,hi-vis jacket"/>'
    '<Label value="Forklift"/>'
)


@pytest.fixture(autouse=True)
def _denormals() -> Iterator[None]:
    """Random weights produce denormal floats that make CPU runs crawl (forward sets it on its thread)."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints: Grounding DINO with real 256-token prompts, OWLv2, SAM 2 and SAM."""
    root = tmp_path_factory.mktemp("gsam")
    return {
        "dino": save_dino(root / "dino", max_text_len=256),
        "owl": save_owl(root / "owl"),
        "sam2": build_sam2(root / "sam2-tiny-random"),
        "sam1": build_sam1(root / "sam-vit-tiny-random"),
    }


def families() -> dict[str, type[Backend]]:
    """Every family of the server, Grounded-SAM planted."""
    out = dict(all_families())
    out["grounded_sam"] = planted_grounded_family(PLANTS)
    return out


def runtime(tmp_path: Path, **settings: Any) -> Runtime:
    """A runtime over every family (Grounded-SAM planted), blank images sized by their URL."""
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0).with_(**settings)
    return Runtime(cfg, families=families(), resolver=FakeResolver())


def mask_config(
    ckpts: dict[str, Path], tag: str = "BrushLabels", sam: str = "sam2", detector: str = "dino"
) -> str:
    """A config whose mask tag names the detector (its folder as model_path) and SAM's folder (model_sam)."""
    name = "grounding_dino" if detector == "dino" else "owlv2"
    return (
        '<View><Image name="image" value="$image"/>'
        f'<{tag} name="mask" toName="image" model_name="{name}" model_path="{ckpts[detector]}" '
        f'model_sam="{ckpts[sam]}">{LABELS}</{tag}></View>'
    )


def predict(rt: Runtime, config: str, urls: list[str]) -> list[dict[str, Any]]:
    """Run /predict's path; return one prediction per task."""
    return rt.predict(config, [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)])


def decoded(item: dict[str, Any]) -> np.ndarray:
    """Decode a brush item's RLE with label_studio_sdk."""
    height, width = item["original_height"], item["original_width"]
    return np.reshape(decode_rle(item["value"]["rle"]), (height, width, 4))[:, :, 3] > 0


def box_mask(box: tuple[float, float, float, float], size: tuple[int, int] = (W, H)) -> np.ndarray:
    """Return the pixels (centres) inside a normalised box at the given size."""
    width, height = size
    yy, xx = np.mgrid[:height, :width] + 0.5
    x0, y0, x1, y1 = box
    return (xx >= x0 * width) & (xx <= x1 * width) & (yy >= y0 * height) & (yy <= y1 * height)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two boolean masks."""
    return float((a & b).sum() / max(1, (a | b).sum()))


def assert_valid(config: str, prediction: dict[str, Any]) -> None:
    """The SDK's validator and the server's own accept every region."""
    result = [r for r in prediction["result"] if r["type"] != "labels"]
    assert (
        LabelInterface(config).validate_prediction(
            {"result": result, "score": prediction["score"]}, return_errors=True
        )
        == []
    )
    kept, problems = filter_valid(ConfigSchema.from_config(config), prediction["result"], {"image": "x"}, 0)
    assert problems == [] and len(kept) == len(prediction["result"])


def grounded(rt: Runtime) -> Any:
    """Return the loaded Grounded-SAM backend of a runtime."""
    (backend,) = [s.backend for s in rt._slots.values() if s.spec.family == "grounded_sam"]
    return backend


# ---- planning ----


def test_mask_tags_naming_an_open_vocabulary_model_are_grounded_sam(ckpts: dict[str, Path]) -> None:
    def planned(mask: str, **settings: Any) -> tuple[str, str]:
        xml = f'<View><Image name="image" value="$image"/>{mask}</View>'
        (target,) = build_plan(xml, Settings(**settings), all_families()).targets
        return target.model.family, target.model.name

    brush = '<BrushLabels name="m" toName="image"{}><Label value="Car"/></BrushLabels>'
    poly = '<PolygonLabels name="m" toName="image"{}><Label value="Car"/></PolygonLabels>'
    tiny = "facebook/sam2.1-hiera-tiny"
    assert planned(brush.format(' model_name="grounded_sam"')) == ("grounded_sam", f"grounding_dino+{tiny}")
    assert planned(poly.format(' model_name="owlv2"')) == ("grounded_sam", f"owlv2+{tiny}")
    assert planned(brush.format(' model_name="owlv2" model_sam="facebook/sam2.1-hiera-large"')) == (
        "grounded_sam",
        "owlv2+facebook/sam2.1-hiera-large",
    )
    assert planned(
        brush.format(' model_name="grounded_sam"'), detector="owlv2", sam_model="facebook/sam-vit-base"
    ) == (
        "grounded_sam",
        "owlv2+facebook/sam-vit-base",
    )
    assert planned(brush.format(f' model_path="{ckpts["dino"]}"')) == (
        "grounded_sam",
        f"grounding-dino+{tiny}",
    )
    # no model named: Mask R-CNN keeps the tag, DETECTOR (rectangles) changes nothing
    assert planned(brush.format(""), detector="grounding_dino")[0] == "instance_segmentation"
    assert planned(brush.format(' model_name="maskrcnn_resnet50_fpn_v2"'))[0] == "instance_segmentation"


def test_grounded_sam_and_interactive_sam_share_a_config() -> None:
    xml = (
        '<View><Image name="image" value="$image"/>'
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>'
        '<BrushLabels name="auto" toName="image" model_name="grounded_sam"><Label value="Car"/></BrushLabels>'
        '<BrushLabels name="mask" toName="image"><Label value="Car"/></BrushLabels>'
        '<Brush name="plain" toName="image" model_name="owlv2"/>'
        '<Labels name="kinds" toName="image"><Label value="Pallet"/></Labels></View>'
    )
    plan = build_plan(xml, Settings(), all_families())
    by_control = {t.control.name: t for t in plan.targets}
    assert by_control["auto"].model.family == "grounded_sam"
    assert by_control["mask"].model.family == "sam"
    assert by_control["plain"].model.family == "grounded_sam"
    assert by_control["plain"].linked["labels"].name == "kinds"


def test_accepts_model_for_the_weights_command() -> None:
    assert GroundedSamBackend.accepts_model("grounded_sam")
    for name in ("owlv2", "facebook/sam2.1-hiera-tiny", "maskrcnn_resnet50_fpn_v2"):
        assert not GroundedSamBackend.accepts_model(name), name


# ---- masks through the runtime ----


@pytest.mark.parametrize("sam", ["sam2", "sam1"])
def test_each_box_becomes_one_brush_mask_of_that_box_with_the_detectors_label_and_score(
    ckpts: dict[str, Path], tmp_path: Path, sam: str
) -> None:
    config = mask_config(ckpts, sam=sam)
    rt = runtime(tmp_path)
    try:
        (prediction,) = predict(rt, config, [f"http://x/{W}x{H}.png"])
        assert_valid(config, prediction)
        regions = {r["value"]["brushlabels"][0]: r for r in prediction["result"]}
        assert set(regions) == {"Car", "Vest"}  # Forklift found nothing; truck was never asked for
        assert regions["Car"]["score"] == pytest.approx(SCORE_CAR, abs=1e-5)
        assert regions["Vest"]["score"] == pytest.approx(SCORE_VEST, abs=1e-5)
        for label, plant in (("Car", PLANTS[0]), ("Vest", PLANTS[1])):
            region = regions[label]
            assert (region["original_width"], region["original_height"]) == (W, H)
            mask = decoded(region)
            assert iou(mask, box_mask(plant.box)) > 0.97, label
        call = grounded(rt).decoder.calls[-1]
        assert call["batch"] == 1 and call["objects"] == 2, "both boxes in one decoder call"
        assert rt.embeddings.stats.misses == 1
    finally:
        rt.close()


def test_polygons_follow_the_masks(ckpts: dict[str, Path], tmp_path: Path) -> None:
    import cv2

    config = mask_config(ckpts, tag="PolygonLabels", detector="owl")
    rt = runtime(tmp_path)
    try:
        (prediction,) = predict(rt, config, [f"http://x/{W}x{H}.png"])
        assert_valid(config, prediction)
        polygons = {r["value"]["polygonlabels"][0]: r for r in prediction["result"]}
        assert set(polygons) == {"Car", "Vest"}
        # OWLv2's boxes are relative to the padded square (side W): the box in pixels, then in the image
        car = box_mask((0.1, 0.2 * W / H, 0.5, min(1.0, 0.6 * W / H)))
        pts = np.array([[x / 100 * W, y / 100 * H] for x, y in polygons["Car"]["value"]["points"]])
        raster = np.zeros((H, W), dtype=np.uint8)
        cv2.fillPoly(raster, [np.round(pts - 0.5).astype(np.int32)], 1)
        assert iou(raster.astype(bool), car) > 0.95
    finally:
        rt.close()


def test_one_embedding_per_image_reused_by_the_next_request(ckpts: dict[str, Path], tmp_path: Path) -> None:
    config = mask_config(ckpts)
    rt = runtime(tmp_path)
    try:
        urls = [f"http://x/{W}x{H}.png", "http://x/300x500.png"]
        first = predict(rt, config, urls)
        assert rt.embeddings.stats.misses == 2 and len(rt.embeddings) == 2
        again = predict(rt, config, urls)
        assert rt.embeddings.stats.misses == 2, "the second request encodes nothing"
        for a, b in zip(first, again, strict=True):
            assert [r["value"]["rle"] for r in a["result"]] == [r["value"]["rle"] for r in b["result"]]
        assert {(r["original_width"], r["original_height"]) for r in first[1]["result"]} == {(300, 500)}
    finally:
        rt.close()


def test_an_image_without_detections_is_not_encoded(ckpts: dict[str, Path], tmp_path: Path) -> None:
    config = mask_config(ckpts).replace(LABELS, '<Label value="Forklift"/>')
    rt = runtime(tmp_path)
    try:
        (prediction,) = predict(rt, config, [f"http://x/{W}x{H}.png"])
        assert prediction["result"] == []
        assert rt.embeddings.stats.misses == 0 and grounded(rt).decoder.calls == []
    finally:
        rt.close()


def test_the_embedding_is_shared_with_interactive_sam(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Pre-annotation encodes the image once; the annotator's first click reuses that embedding."""
    config = (
        '<View><Image name="image" value="$image"/>'
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>'
        f'<BrushLabels name="auto" toName="image" model_name="grounded_sam" model_path="{ckpts["dino"]}">'
        f"{LABELS}</BrushLabels>"
        '<BrushLabels name="mask" toName="image"><Label value="Car"/></BrushLabels></View>'
    )
    rt = runtime(tmp_path, sam_model=str(ckpts["sam2"]))
    try:
        task = {"id": 7, "data": {"image": f"http://x/{W}x{H}.png"}}
        (prediction,) = rt.predict(config, [task])
        assert {r["from_name"] for r in prediction["result"]} == {"auto"}
        assert len(prediction["result"]) == 2
        click = {
            "id": "k1",
            "from_name": "kp",
            "to_name": "image",
            "type": "keypointlabels",
            "value": {"x": 30.0, "y": 40.0, "width": 0.5, "keypointlabels": ["Car"]},
        }
        rt.predict(config, [task], context={"result": [click]})
        stats = rt.embeddings.stats
        assert stats.misses == 1, "SAM's click found the embedding Grounded-SAM computed"
        assert stats.hits >= 1
    finally:
        rt.close()


# ---- weights, versions, availability ----


def test_missing_parts_are_named_with_their_fetch_commands(ckpts: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path))
    both_missing = GroundedSamBackend.availability(
        ModelSpec("grounded_sam", "grounding_dino+facebook/sam2.1-hiera-tiny"), settings
    )
    assert both_missing is not None
    assert "weights download --model grounding_dino" in both_missing
    assert "weights download --model facebook/sam2.1-hiera-tiny" in both_missing
    spec = ModelSpec("grounded_sam", f"grounding_dino+{ckpts['sam2']}", str(ckpts["dino"]))
    assert GroundedSamBackend.availability(spec, settings) is None
    rt = runtime(tmp_path)
    try:
        config = (
            '<View><Image name="image" value="$image"/><BrushLabels name="m" toName="image" '
            'model_name="grounded_sam"><Label value="Car"/></BrushLabels></View>'
        )
        with pytest.raises(ModelUnavailable, match=re.escape("--model facebook/sam2.1-hiera-tiny")):
            rt.check(rt.plan(config))
    finally:
        rt.close()


def test_version_names_both_models_and_follows_their_weights(ckpts: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path))
    sam_dir = tmp_path / "sam"
    shutil.copytree(ckpts["sam2"], sam_dir)
    spec = ModelSpec("grounded_sam", f"grounding_dino+{sam_dir}", str(ckpts["dino"]))
    before = GroundedSamBackend.version_of(spec, settings)
    assert before.startswith("grounding_dino@") and f"+{sam_dir}@" in before and "missing" not in before
    backend = GroundedSamBackend(spec, settings)
    backend.load("cpu")
    assert backend.version() == before
    build_sam2(sam_dir, seed=3)
    assert GroundedSamBackend.version_of(spec, settings) != before


def test_weights_download_fetches_the_detector_and_sam(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[str] = []

    def fake_snapshot_download(repo: str, allow_patterns: list[str]) -> str:
        calls.append(repo)
        folder = tmp_path / repo.replace("/", "--")
        folder.mkdir(exist_ok=True)
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            (folder / name).write_text("{}")
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    settings = Settings(model_dir=str(tmp_path))
    assert weights.download(settings, all_families(), ["grounded_sam"]) == 0
    # (the fake folder is not in the HF cache, so SAM also asks for a .bin: only the order of repos matters)
    assert list(dict.fromkeys(calls)) == [ov.KNOWN["grounding_dino"].repo, "facebook/sam2.1-hiera-tiny"]
    calls.clear()
    assert (
        weights.download(
            settings.with_(detector="owlv2", sam_model="facebook/sam-vit-base"),
            all_families(),
            ["grounded_sam"],
        )
        == 0
    )
    assert list(dict.fromkeys(calls)) == [ov.KNOWN["owlv2"].repo, "facebook/sam-vit-base"]


# ---- the command line ----


def test_command_line_predict_writes_brush_masks(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "md"))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (W, H), (30, 60, 90)).save(images / "a.png")
    Image.new("RGB", (200, 300), (90, 60, 30)).save(images / "b.png")
    config = mask_config(ckpts)
    (tmp_path / "labeling.xml").write_text(config)
    out = tmp_path / "out.json"
    argv = [
        "predict",
        "--config",
        str(tmp_path / "labeling.xml"),
        "--input",
        str(images),
        "--output",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv, families=families) == 0
    tasks = json.loads(out.read_text())
    assert len(tasks) == 2
    for task in tasks:
        (prediction,) = task["predictions"]
        assert_valid(config, prediction)
        regions = {r["value"]["brushlabels"][0]: r for r in prediction["result"]}
        assert set(regions) == {"Car", "Vest"}
        car = regions["Car"]
        size = (car["original_width"], car["original_height"])
        assert iou(decoded(car), box_mask(PLANTS[0].box, size)) > 0.95
