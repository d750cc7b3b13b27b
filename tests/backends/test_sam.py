"""Interactive Segment Anything: planning, prompts, masks at the original size, the embedding cache.

Small random SAM 2 / SAM checkpoints are saved with save_pretrained() and loaded through the real
loading code. Where a test asserts geometry, the mask decoder still runs but its output is replaced
by a planted one (a disk around the click, a rectangle inside the box, in the model's input space),
so the expected mask is known and a wrong coordinate transform moves it.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backends import _sam
from backends.sam import MAX_POINTS, SamBackend, SamRequest, image_identity
from model import families as all_families
from serving.contract import Backend, Item, ModelSpec
from serving.errors import InputError
from serving.fetch.lsclient import LabelStudioClient
from serving.fetch.resolver import DataResolver
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.backends._sam_support import INPUT_PX, build_sam1, build_sam2
from tests.support.fakes import FakeDetector, FakeResolver

W, H = 640, 480
IMAGE_URL = f"http://images.example/{W}x{H}.png"
RADIUS_IN = 20.0  # planted disk radius, in pixels of the model's 128 px input


@pytest.fixture(autouse=True)
def _denormals_back() -> Iterator[None]:
    """Undo forward()'s flush-denormal flag when a test ran it on the main thread (it is per thread)."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a saved tiny random SAM 2 checkpoint folder."""
    return build_sam2(tmp_path_factory.mktemp("sam2") / "sam2-tiny-random")


@pytest.fixture(scope="module")
def sam1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return a saved tiny random SAM checkpoint folder."""
    return build_sam1(tmp_path_factory.mktemp("sam1") / "sam-vit-tiny-random")


@pytest.fixture(params=["sam2", "sam1"])
def ckpt(request: pytest.FixtureRequest, sam2_dir: Path, sam1_dir: Path) -> Path:
    """Return each flavour's checkpoint in turn."""
    return sam2_dir if request.param == "sam2" else sam1_dir


def config(path: Path | str, mask: str = "BrushLabels", extra: str = "") -> str:
    """Return a config with smart keypoint and rectangle prompts and one mask tag using the checkpoint."""
    labels = '<Label value="Dog"/><Label value="Cat"/>' if mask.endswith("Labels") else ""
    return f"""<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Cat"/><Label value="Bird"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Cat"/><Label value="Dog"/>
  </RectangleLabels>
  <{mask} name="mask" toName="image" model_path="{path}">{labels}</{mask}>{extra}
</View>"""


def click(
    x: float,
    y: float,
    positive: Any = None,
    label: str = "Cat",
    rid: str = "k1",
    value_positive: Any = None,
    from_name: str = "kp",
    rotation: int = 0,
) -> dict[str, Any]:
    """Return a smart keypoint region as Label Studio sends it in params.context.result."""
    region: dict[str, Any] = {
        "id": rid,
        "from_name": from_name,
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": W,
        "original_height": H,
        "image_rotation": rotation,
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
    }
    if positive is not None:
        region["is_positive"] = positive
    if value_positive is not None:
        region["value"]["positive"] = value_positive
    return region


def box(
    x: float, y: float, w: float, h: float, label: str = "Cat", rid: str = "b1", rotation: float = 0
) -> dict[str, Any]:
    """Return a smart rectangle region."""
    return {
        "id": rid,
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


class PlantedDecoder:
    """A loaded SAM model whose mask decoder still runs, with its masks replaced by known shapes.

    Each object's low-resolution logits become a disk of RADIUS_IN input pixels around its first
    positive click, or, with a box, the distance to the box's nearest edge (positive inside). The
    predicted IoUs are 0.9, 0.5, 0.3 for the candidates, so the first is chosen.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        out = self.model(**kwargs)
        b, n_obj, n_masks, h, w = out.pred_masks.shape
        size = float(self.model.config.prompt_encoder_config.image_size)
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * size / h
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * size / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points, labels, boxes = (
            kwargs.get("input_points"),
            kwargs.get("input_labels"),
            kwargs.get("input_boxes"),
        )
        logits = torch.zeros((b, n_obj, n_masks, h, w))
        for i in range(b):
            for o in range(n_obj):
                if boxes is not None:
                    x0, y0, x1, y1 = (float(v) for v in boxes[i, o])
                    field = torch.minimum(torch.minimum(xx - x0, x1 - xx), torch.minimum(yy - y0, y1 - yy))
                else:
                    k = int(torch.nonzero(labels[i, o] == 1)[0])
                    px, py = (float(v) for v in points[i, o, k])
                    field = RADIUS_IN - torch.sqrt((xx - px) ** 2 + (yy - py) ** 2)
                logits[i, o] = field
        out.pred_masks = logits.to(out.pred_masks.device)
        out.iou_scores = torch.tensor([0.9, 0.5, 0.3][:n_masks]).expand(b, n_obj, n_masks).clone()
        self.calls.append(
            {
                "batch": b,
                "objects": n_obj,
                "multimask": kwargs.get("multimask_output"),
                "points": None if points is None else points.clone(),
                "labels": None if labels is None else labels.clone(),
                "boxes": None if boxes is None else boxes.clone(),
            }
        )
        return out


class PlantedSam(SamBackend):
    """The real SAM family with its decoder output planted (the model still loads and runs)."""

    instances: list[PlantedSam] = []

    def load(self, device: str) -> None:
        super().load(device)
        assert self.sam is not None
        self.decoder = PlantedDecoder(self.sam.model)
        self.sam.model = self.decoder  # type: ignore[assignment]
        self.forwards = 0
        PlantedSam.instances.append(self)

    def forward(self, batch: list[Any]) -> list[Any]:
        self.forwards += 1
        return super().forward(batch)


def families(sam: type[Backend] = PlantedSam) -> dict[str, type[Backend]]:
    """Return every family of the server with SAM replaced (planning order kept)."""
    out = dict(all_families())
    out["sam"] = sam
    return out


def runtime(
    tmp_path: Path, sam: type[Backend] = PlantedSam, resolver: Any = None, **settings: Any
) -> Runtime:
    """Return a runtime over every family, blank images sized by their URL."""
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0).with_(**settings)
    return Runtime(cfg, families=families(sam), resolver=resolver or FakeResolver())


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    """A runtime with the planted SAM family; closed afterwards."""
    r = runtime(tmp_path)
    yield r
    r.close()


def interactive(
    rt: Runtime, cfg: str, regions: list[dict[str, Any]], task_id: int = 1, url: str = IMAGE_URL
) -> dict[str, Any]:
    """Run one interactive call and return its single prediction."""
    (prediction,) = rt.predict(cfg, [{"id": task_id, "data": {"image": url}}], context={"result": regions})
    return prediction


def planted(rt: Runtime) -> PlantedSam:
    """Return the loaded planted backend of a runtime."""
    backends = [s.backend for s in rt._slots.values() if isinstance(s.backend, PlantedSam)]
    assert len(backends) == 1
    return backends[0]


def decoded(item: Mapping[str, Any]) -> np.ndarray:
    """Decode a brush item's RLE with label_studio_sdk (the decoder Label Studio's tools use)."""
    height, width = item["original_height"], item["original_width"]
    flat = decode_rle(item["value"]["rle"])
    return np.reshape(flat, (height, width, 4))[:, :, 3] > 0


def disk_mask(cx: float, cy: float) -> np.ndarray:
    """Return the ellipse a planted disk becomes at the original size (radius scaled per axis)."""
    scale = W / INPUT_PX, H / INPUT_PX  # SAM 2 stretches both sides to the input size
    yy, xx = np.mgrid[:H, :W] + 0.5
    return ((xx - cx) / (RADIUS_IN * scale[0])) ** 2 + ((yy - cy) / (RADIUS_IN * scale[1])) ** 2 <= 1.0


# ---------------------------------------------------------------- planning


def plan_of(cfg: str) -> dict[str, tuple[str, list[str]]]:
    """Return {control: (family, linked roles)} of a config planned with every family."""
    rt = Runtime(Settings(), families=all_families())
    try:
        plan = rt.plan(cfg)
        return {t.control.name: (t.model.family, sorted(t.linked)) for t in plan.targets}
    finally:
        rt.close()


def test_smart_prompts_put_the_mask_tags_of_their_image_on_sam() -> None:
    """Brush and polygon tags next to smart prompts go to SAM, which also takes the prompt tags."""
    cfg = config(
        "/models/sam",
        extra='\n  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>',
    )
    planned = plan_of(cfg)
    assert planned == {
        "mask": ("sam", ["prompt:box", "prompt:kp"]),
        "poly": ("sam", ["prompt:box", "prompt:kp"]),
    }


def test_without_smart_prompts_the_automatic_families_keep_their_tags() -> None:
    """No smart tag: Mask R-CNN keeps BrushLabels, keypoint R-CNN keeps KeyPointLabels (configs unchanged)."""
    cfg = config("").replace(' smart="true"', "").replace(' model_path=""', "")
    planned = plan_of(cfg)
    assert planned["mask"][0] == "instance_segmentation"
    assert planned["kp"][0] == "keypoints"
    assert planned["box"][0] == "detection"


def test_a_sam_model_name_claims_the_mask_tag_and_another_model_name_keeps_it_away() -> None:
    """model_name picks the family: a SAM id claims even without prompts, maskrcnn stays instance."""
    sam_named = """<View><Image name="image" value="$image"/>
      <BrushLabels name="mask" toName="image" model_name="facebook/sam-vit-base"><Label value="Cat"/></BrushLabels>
    </View>"""
    assert plan_of(sam_named) == {"mask": ("sam", [])}
    rcnn_named = config("").replace(' model_path=""', ' model_name="maskrcnn_resnet50_fpn_v2"')
    planned = plan_of(rcnn_named)
    assert planned["mask"][0] == "instance_segmentation"
    assert planned["kp"][0] == "keypoints"  # the smart prompt tags then serve nobody's clicks


def test_model_name_and_setting_choose_the_checkpoint(tmp_path: Path) -> None:
    """Default SAM 2.1 tiny; SAM_MODEL changes the default; a tag's model_name wins."""
    cfg = config("").replace(' model_path=""', "")
    rt = Runtime(Settings(), families=all_families())
    assert {s.name for s in rt.plan(cfg).specs} == {"facebook/sam2.1-hiera-tiny"}
    rt.close()
    rt = Runtime(Settings(sam_model="facebook/sam2.1-hiera-large"), families=all_families())
    assert {s.name for s in rt.plan(cfg).specs} == {"facebook/sam2.1-hiera-large"}
    named = cfg.replace('name="mask"', 'name="mask" model_name="Zigeng/SlimSAM-uniform-77"')
    assert {s.name for s in rt.plan(named).specs} == {"Zigeng/SlimSAM-uniform-77"}
    rt.close()


# ---------------------------------------------------------------- weights, versions, loading


def test_missing_weights_answer_422_with_the_download_command(tmp_path: Path) -> None:
    """/setup for a SAM model that is not on disk names the exact command that fetches it."""
    cfg = config("").replace(' model_path=""', ' model_name="facebook/sam2.1-hiera-large"')
    settings = Settings(model_dir=str(tmp_path / "md"))
    rt = Runtime(settings, families=all_families(), resolver=FakeResolver())
    app = create_app(settings, runtime=rt)
    resp = app.test_client().post("/setup", json={"project": "1.1", "schema": cfg})
    assert resp.status_code == 422, resp.get_json()
    assert "python -m serving weights download --model facebook/sam2.1-hiera-large" in str(resp.get_json())
    rt.close()


def test_model_path_loads_through_the_real_code_and_versions_are_pure(tmp_path: Path, sam2_dir: Path) -> None:
    """A save_pretrained() folder loads; version_of is the same before and after load and follows the weights."""
    spec = ModelSpec("sam", "facebook/sam2.1-hiera-tiny", str(sam2_dir))
    settings = Settings(model_dir=str(tmp_path))
    assert SamBackend.availability(spec, settings) is None
    before = SamBackend.version_of(spec, settings)
    backend = SamBackend(spec, settings)
    backend.load("cpu")
    assert backend.sam is not None and backend.sam.flavor == "sam2" and backend.sam.input_size == INPUT_PX
    assert backend.version() == before
    copy = build_sam2(tmp_path / "other", seed=1)
    other = SamBackend.version_of(ModelSpec("sam", "facebook/sam2.1-hiera-tiny", str(copy)), settings)
    assert other != before and other.startswith("facebook/sam2.1-hiera-tiny@")
    empty = tmp_path / "empty"
    empty.mkdir()
    reason = SamBackend.availability(ModelSpec("sam", "x", str(empty)), settings)
    assert reason is not None and "save_pretrained() folder" in reason


def test_a_name_under_model_dir_is_found(tmp_path: Path) -> None:
    """MODEL_DIR/<repo name> holding a checkpoint serves that model_name offline."""
    build_sam1(tmp_path / "md" / "sam-vit-base")
    settings = Settings(model_dir=str(tmp_path / "md"))
    spec = ModelSpec("sam", "facebook/sam-vit-base")
    assert SamBackend.availability(spec, settings) is None
    backend = SamBackend(spec, settings)
    backend.load("cpu")
    assert backend.sam is not None and backend.sam.flavor == "sam"


def test_weights_status_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`weights list` reports the default; `weights download` fetches configs and safetensors of SAM ids only."""
    settings = Settings(model_dir=str(tmp_path))
    (status,) = SamBackend.weights_status(settings)
    assert (status.model, status.present) == ("facebook/sam2.1-hiera-tiny", False)
    fetched: list[tuple[str, tuple[str, ...]]] = []

    def fake_snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        fetched.append((repo_id, tuple(allow_patterns)))
        return str(build_sam2(tmp_path / "hub" / repo_id.replace("/", "--")))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(_sam, "checkpoint_folder", lambda source, model_dir="": tmp_path)
    paths = SamBackend.download_weights(["facebook/sam2.1-hiera-large", "resnet50"], settings)
    assert fetched == [("facebook/sam2.1-hiera-large", ("*.json", "*.safetensors"))]
    assert len(paths) == 1
    assert SamBackend.download_weights([], settings) and fetched[-1][0] == "facebook/sam2.1-hiera-tiny"


# ---------------------------------------------------------------- prompts


def prompts(cfg: str, regions: list[dict[str, Any]], size: tuple[int, int] = (W, H)) -> list[_sam.Prompt]:
    """Return the prompts SamBackend.preprocess makes of a context (no model needed)."""
    rt = Runtime(Settings(), families=all_families())
    try:
        plan = rt.plan(cfg)
    finally:
        rt.close()
    targets = [t for t in plan.targets if t.model.family == "sam"]
    backend = SamBackend(targets[0].model, Settings())
    item = Item(
        task={"id": 1, "data": {"image": "u"}},
        obj=plan.objects["image"],
        image=Image.new("RGB", size),
        context={"result": regions},
        targets=tuple(targets),
    )
    request = backend.preprocess(item)
    assert isinstance(request, SamRequest)
    return request.prompts


CFG = config("/m")


def test_clicks_are_one_prompt_with_polarity_from_is_positive_or_value_positive() -> None:
    """Positive, Alt+click (is_positive false), value.positive false, and a click with no flag (positive)."""
    regions = [
        click(10, 20, positive=True, rid="a"),
        click(30, 40, positive=False, rid="b"),
        click(50, 60, value_positive=False, rid="c"),
        click(70, 80, rid="d"),
        click(90, 10, positive=True, value_positive=False, rid="e"),  # top-level flag wins
    ]
    (p,) = prompts(CFG, regions)
    assert p.labels == [1, 0, 0, 1, 1]
    assert p.points_px == [(64.0, 96.0), (192.0, 192.0), (320.0, 288.0), (448.0, 384.0), (576.0, 48.0)]
    assert p.box_xyxy_px is None and p.label == "Cat"


def test_a_box_and_clicks_make_one_object() -> None:
    """One rectangle plus clicks: one prompt with the box (pixels) and every click."""
    (p,) = prompts(
        CFG,
        [box(10, 10, 50, 50, label="Dog"), click(20, 20, rid="p"), click(80, 80, positive=False, rid="n")],
    )
    assert p.box_xyxy_px == (64.0, 48.0, 384.0, 288.0)
    assert p.points_px == [(128.0, 96.0), (512.0, 384.0)] and p.labels == [1, 0]
    assert p.label == "Dog"


def test_several_boxes_make_one_object_each_and_clicks_join_the_smallest_box_around_them() -> None:
    """Two boxes, a click in both (goes to the smaller), a negative click outside (dropped)."""
    regions = [
        box(0, 0, 50, 50, rid="big"),
        box(10, 10, 10, 10, label="Dog", rid="small"),
        click(15, 15, rid="in-both"),
        click(90, 90, positive=False, rid="outside"),
    ]
    big, small = prompts(CFG, regions)
    assert big.box_xyxy_px == (0.0, 0.0, 320.0, 240.0) and big.points_px == []
    assert small.box_xyxy_px == (64.0, 48.0, 128.0, 96.0) and small.points_px == [(96.0, 72.0)]
    assert small.label == "Dog"
    # a positive click outside every box becomes its own object
    *_, extra = prompts(CFG, [*regions, click(95, 5, rid="p2")])
    assert extra.box_xyxy_px is None and extra.points_px == [(576.0, 432.0), (608.0, 24.0)]
    assert extra.labels == [0, 1]


def test_a_rotated_box_prompts_with_the_box_around_it_and_image_rotation_changes_nothing() -> None:
    """Label Studio rotates rectangles about their top-left corner; the stage rotation is display only."""
    (p,) = prompts(CFG, [box(50, 50, 10, 10, rotation=90)])
    # 64 x 48 px turned 90 degrees clockwise about (320, 240): 48 px to the left, 64 px down
    assert p.box_xyxy_px == pytest.approx((272.0, 240.0, 320.0, 304.0))
    (q,) = prompts(CFG, [click(25, 75, rotation=90)])
    assert q.points_px == [(160.0, 360.0)]


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ([click(101, 50)], "lies outside the image"),
        ([click(-1, 50)], "lies outside the image"),
        ([box(10, 10, 0, 20)], "zero area"),
        ([box(10, 10, 0.01, 20)], "too small to segment"),
        ([box(120, 10, 10, 10)], "too small to segment"),
        ([click(10, 10, from_name="nope")], "comes from 'nope', which is not a smart prompt tag"),
        ([click(10, 10, rid=str(i)) for i in range(MAX_POINTS + 1)], f"at most {MAX_POINTS}"),
        ([click(10, 10, positive=False)], "only negative clicks"),
        ([{**click(10, 10), "value": {"x": "left", "y": 3}}], "value.x must be a number"),
        ([{**click(10, 10), "value": None}], "no 'value' object"),
        (["not a region"], "not a region object"),
    ],
)
def test_bad_prompts_raise_input_error_with_a_reason(regions: list[Any], message: str) -> None:
    """Each bad prompt is a per-task InputError naming what is wrong (never a 500)."""
    with pytest.raises(InputError, match=message):
        prompts(CFG, regions)


def test_regions_of_other_images_and_companions_are_not_prompts() -> None:
    """A region on another image, a brush result or a labels item sharing an id are ignored."""
    other = {**click(10, 10), "to_name": "other_image", "from_name": "zzz"}
    companion = {"id": "k1", "from_name": "mask", "to_name": "image", "type": "brushlabels", "value": {}}
    (p,) = prompts(CFG, [other, click(50, 50), companion])
    assert p.points_px == [(320.0, 240.0)]
    assert prompts(CFG, [other]) == []


def test_image_identity_hashes_data_uris_and_keys_urls_by_task() -> None:
    """Same data URI content = same identity whatever the task; a URL is keyed with its task id."""
    uri = "data:image/png;base64,AAAA"
    assert image_identity(1, uri) == image_identity(2, uri)
    assert image_identity(1, uri) != image_identity(1, uri + "B")
    assert image_identity(1, "http://a/x.png") != image_identity(2, "http://a/x.png")


# ---------------------------------------------------------------- coordinates and masks vs transformers


def test_coordinates_and_mask_upsampling_match_the_transformers_processors(ckpt: Path) -> None:
    """Our prompt coordinates and masks at the original size equal the processors' own for both flavours."""
    sam = _sam.SamModel.load(ckpt, "cpu")
    image = Image.new("RGB", (W, H))
    pixel_values, input_hw = sam.pixels(image)
    (emb,) = sam.encode([pixel_values], [(W, H)], [input_hw])
    points = np.array([[100.0, 50.0], [600.0, 470.0]])
    box_xyxy = np.array([[10.0, 20.0], [300.0, 400.0]])
    proc = sam.processor
    if sam.flavor == "sam2":
        ref = proc(
            original_sizes=[[H, W]],
            input_points=[[points.tolist()]],
            input_boxes=[[box_xyxy.reshape(4).tolist()]],
            return_tensors="pt",
        )
    else:
        ref = proc(
            images=[image],
            input_points=[[points.tolist()]],
            input_boxes=[[box_xyxy.reshape(4).tolist()]],
            return_tensors="pt",
        )
    assert np.allclose(sam.to_input_space(points, emb), ref["input_points"][0, 0].numpy(), atol=1e-4)
    assert np.allclose(
        sam.to_input_space(box_xyxy, emb).reshape(4), ref["input_boxes"][0, 0].numpy(), atol=1e-4
    )
    low = torch.randn(3, 4 * INPUT_PX // 16, 4 * INPUT_PX // 16)
    ours = sam.upsample(low, emb) > 0
    if sam.flavor == "sam2":
        (theirs,) = proc.post_process_masks([low[None]], [[H, W]])
    else:
        (theirs,) = proc.post_process_masks([low[None]], [[H, W]], ref["reshaped_input_sizes"].tolist())
    assert ours.shape == (3, H, W)
    assert torch.equal(ours, theirs[0])


def test_an_evicted_embedding_is_encoded_again_from_its_image(sam2_dir: Path) -> None:
    """Inputs whose pixels are gone get them from their image; the embedding equals a fresh encode's."""
    sam = _sam.SamModel.load(sam2_dir, "cpu")
    image = Image.new("RGB", (W, H), (200, 30, 90))
    pixel_values, input_hw = sam.pixels(image)
    with torch.inference_mode():
        (fresh,) = sam.encode([pixel_values], [(W, H)], [input_hw])
        evicted = SamRequest(key=("sam", "u1"), size=(W, H), image=image)  # the cache had it at preprocess
        (again,) = sam.encode_inputs([evicted])
    assert evicted.input_hw == input_hw and torch.equal(evicted.pixel_values, pixel_values)
    assert (again.size, again.input_hw) == (fresh.size, fresh.input_hw)
    maps = zip(again.features, fresh.features, strict=True)  # SAM 2: a list of feature maps
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in maps)
    with pytest.raises(RuntimeError, match="evicted"):
        sam.encode_inputs([SamRequest(key=("sam", "u2"), size=(W, H))])


def test_a_click_gives_a_brush_mask_at_the_original_size_that_decodes_back(
    ckpt: Path, tmp_path: Path
) -> None:
    """The brush RLE decodes (SDK) to the planted mask the processors would give, around the click."""
    rt = runtime(tmp_path)
    try:
        prediction = interactive(rt, config(ckpt), [click(25, 75)])
        assert "error" not in prediction, prediction
        (item,) = prediction["result"]
        assert (item["type"], item["from_name"], item["value"]["brushlabels"]) == (
            "brushlabels",
            "mask",
            ["Cat"],
        )
        assert (item["original_width"], item["original_height"]) == (W, H)
        assert item["score"] == pytest.approx(0.9)
        mask = decoded(item)
        # the reference: the planted logits through the transformers processor's own post-processing
        backend = planted(rt)
        call = backend.decoder.calls[-1]
        assert call["multimask"] is True and call["objects"] == 1  # one click: best of three candidates
        sam = backend.sam
        assert sam is not None
        px, py = (float(v) for v in call["points"][0, 0, 0])
        n = 4 * INPUT_PX // 16
        centers = (torch.arange(n, dtype=torch.float32) + 0.5) * INPUT_PX / n
        yy, xx = torch.meshgrid(centers, centers, indexing="ij")
        field = (RADIUS_IN - torch.sqrt((xx - px) ** 2 + (yy - py) ** 2))[None, None]
        if sam.flavor == "sam2":
            (ref,) = sam.processor.post_process_masks([field], [[H, W]])
        else:
            _, hw = sam.pixels(Image.new("RGB", (W, H)))
            (ref,) = sam.processor.post_process_masks([field], [[H, W]], [list(hw)])
        assert np.array_equal(mask, ref[0, 0].numpy())
        # and it is where the user clicked: centroid at (25 %, 75 %) of the original image
        ys, xs = np.nonzero(mask)
        assert xs.mean() == pytest.approx(0.25 * W, abs=2.0) and ys.mean() == pytest.approx(0.75 * H, abs=2.0)
    finally:
        rt.close()


def test_sam2_disk_has_the_expected_shape(tmp_path: Path, sam2_dir: Path) -> None:
    """SAM 2 stretches the image to a square: the planted disk is an ellipse of known radii at 640x480."""
    rt = runtime(tmp_path)
    try:
        (item,) = interactive(rt, config(sam2_dir), [click(50, 50)])["result"]
        mask = decoded(item)
        expected = disk_mask(320.0, 240.0)
        iou = (mask & expected).sum() / (mask | expected).sum()
        assert iou > 0.97, iou
    finally:
        rt.close()


def test_a_box_gives_the_mask_inside_it_and_several_boxes_one_mask_each(
    tmp_path: Path, sam2_dir: Path
) -> None:
    """Two boxes: two brush regions, each filling its own box, labels carried from each rectangle."""
    rt = runtime(tmp_path)
    try:
        prediction = interactive(
            rt, config(sam2_dir), [box(10, 10, 30, 40, rid="a"), box(60, 50, 30, 30, label="Dog", rid="b")]
        )
        first, second = prediction["result"]
        assert first["value"]["brushlabels"] == ["Cat"] and second["value"]["brushlabels"] == ["Dog"]
        for item, (x, y, w, h) in ((first, (10, 10, 30, 40)), (second, (60, 50, 30, 30))):
            mask = decoded(item)
            ys, xs = np.nonzero(mask)
            x0, x1 = x / 100 * W, (x + w) / 100 * W
            y0, y1 = y / 100 * H, (y + h) / 100 * H
            assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
            assert mask.sum() > 0.8 * (x1 - x0) * (y1 - y0)
        call = planted(rt).decoder.calls[-1]
        assert call["objects"] == 2 and call["multimask"] is False and call["points"] is None
    finally:
        rt.close()


def test_polygons_are_valid_for_the_config_and_follow_the_mask(tmp_path: Path, sam2_dir: Path) -> None:
    """PolygonLabels: the contour of the planted ellipse, valid for the SDK, label carried over."""
    cfg = config(sam2_dir, mask="PolygonLabels")
    rt = runtime(tmp_path)
    try:
        prediction = interactive(rt, cfg, [click(50, 50)])
        (item,) = prediction["result"]
        assert item["type"] == "polygonlabels" and item["value"]["polygonlabels"] == ["Cat"]
        assert LabelInterface(cfg).validate_prediction(
            {"result": prediction["result"], "score": prediction["score"]}
        )
        import cv2

        pts = np.array([[x / 100 * W, y / 100 * H] for x, y in item["value"]["points"]], dtype=np.float64)
        raster = np.zeros((H, W), dtype=np.uint8)
        cv2.fillPoly(raster, [np.round(pts - 0.5).astype(np.int32)], 1)
        expected = disk_mask(320.0, 240.0)
        iou = (raster.astype(bool) & expected).sum() / (raster.astype(bool) | expected).sum()
        assert iou > 0.95, iou
    finally:
        rt.close()


def test_labels_carried_else_first_label_else_none_for_plain_tags(tmp_path: Path, sam2_dir: Path) -> None:
    """Cat (in the mask tag) is carried; Bird (not in it) falls back to the first label; plain Brush has none."""
    rt = runtime(tmp_path)
    try:
        cfg = config(sam2_dir)
        assert interactive(rt, cfg, [click(50, 50, label="Cat")])["result"][0]["value"]["brushlabels"] == [
            "Cat"
        ]
        assert interactive(rt, cfg, [click(50, 50, label="Bird")])["result"][0]["value"]["brushlabels"] == [
            "Dog"
        ]
        plain = config(sam2_dir, mask="Brush")
        prediction = interactive(rt, plain, [click(50, 50, label="Cat")])
        (item,) = prediction["result"]
        assert item["type"] == "brush" and set(item["value"]) == {"format", "rle"}
        assert LabelInterface(plain).validate_prediction(
            {"result": prediction["result"], "score": prediction["score"]}
        )
    finally:
        rt.close()


def test_brush_predictions_are_valid_for_the_config(tmp_path: Path, ckpt: Path) -> None:
    """Click, then click + negative click: every answer validates with the SDK's LabelInterface."""
    cfg = config(ckpt)
    rt = runtime(tmp_path)
    try:
        for regions in ([click(40, 40)], [click(40, 40), click(45, 45, positive=False, rid="k2")]):
            prediction = interactive(rt, cfg, regions)
            assert prediction["result"], prediction
            assert LabelInterface(cfg).validate_prediction(
                {"result": prediction["result"], "score": prediction["score"]}
            )
        call = planted(rt).decoder.calls[-1]
        assert call["labels"].tolist() == [[[1, 0]]] and call["multimask"] is False
    finally:
        rt.close()


def test_bad_prompt_answers_an_empty_result_with_the_reason(tmp_path: Path, sam2_dir: Path) -> None:
    """An interactive call with a click outside the image: result [], error says why (and no model run)."""
    rt = runtime(tmp_path)
    try:
        prediction = interactive(rt, config(sam2_dir), [click(150, 50)])
        assert prediction["result"] == [] and "outside the image" in prediction["error"]
    finally:
        rt.close()


def test_exif_rotated_jpeg_clicks_land_where_label_studio_shows_them(tmp_path: Path, sam2_dir: Path) -> None:
    """Percentages are of the image as shown (EXIF applied): the mask is around the shown point."""
    stored = Image.new("RGB", (W, H), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 480 x 640
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes())
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    settings = Settings(model_dir=str(tmp_path / "md"))
    resolver = DataResolver(settings, LabelStudioClient(settings))
    rt = runtime(tmp_path, resolver=resolver)
    try:
        (item,) = interactive(rt, config(sam2_dir), [click(25, 75)], url=uri)["result"]
        assert (item["original_width"], item["original_height"]) == (H, W)
        ys, xs = np.nonzero(decoded(item))
        assert xs.mean() == pytest.approx(0.25 * H, abs=2.0) and ys.mean() == pytest.approx(0.75 * W, abs=2.0)
    finally:
        rt.close()


# ---------------------------------------------------------------- the cache through the runtime


def test_a_warm_click_neither_fetches_the_image_nor_encodes(tmp_path: Path, sam2_dir: Path) -> None:
    """First click: one fetch, one encode (miss). Later clicks: no fetch, a hit each."""
    resolver = FakeResolver()
    rt = runtime(tmp_path, resolver=resolver)
    try:
        cfg = config(sam2_dir)
        interactive(rt, cfg, [click(30, 30)])
        assert len(resolver.calls) == 1
        assert (rt.embeddings.stats.misses, rt.embeddings.stats.hits) == (1, 0)
        second = interactive(rt, cfg, [click(30, 30), click(60, 60, positive=False, rid="k2")])
        third = interactive(rt, cfg, [click(70, 70)])
        assert second["result"] and third["result"]
        assert len(resolver.calls) == 1
        assert (rt.embeddings.stats.misses, rt.embeddings.stats.hits) == (1, 2)
        # another task with the same URL is another image identity
        interactive(rt, cfg, [click(30, 30)], task_id=2)
        assert rt.embeddings.stats.misses == 2
    finally:
        rt.close()


def test_concurrent_first_clicks_on_one_image_encode_once(tmp_path: Path, sam2_dir: Path) -> None:
    """Six annotators click on a fresh image at the same moment: one encode, every answer a mask."""
    rt = runtime(tmp_path)
    cfg = config(sam2_dir)
    try:
        interactive(rt, cfg, [click(10, 10)], task_id=99)  # load the model first (another image)
        start = threading.Barrier(6)
        answers: list[dict[str, Any]] = []

        def annotate(k: int) -> None:
            start.wait()
            answers.append(interactive(rt, cfg, [click(10 + 10 * k, 50, rid=f"k{k}")]))

        threads = [threading.Thread(target=annotate, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(answers) == 6 and all(a["result"] for a in answers)
        assert rt.embeddings.stats.misses == 2  # task 99, then the shared image once
        assert rt.embeddings.stats.hits == 5
    finally:
        rt.close()


def test_clicks_of_several_annotators_decode_in_one_batch(tmp_path: Path, sam2_dir: Path) -> None:
    """Three warm images, one click each, in one forward: one decoder call for all, same masks as alone."""
    settings = Settings(model_dir=str(tmp_path))
    backend = PlantedSam(ModelSpec("sam", "facebook/sam2.1-hiera-tiny", str(sam2_dir)), settings)
    backend.load("cpu")
    rt = Runtime(settings, families=families())
    plan = rt.plan(config(sam2_dir))
    rt.close()
    targets = tuple(t for t in plan.targets if t.model.family == "sam")

    def request(task_id: int, x: float) -> SamRequest:
        item = Item(
            task={"id": task_id, "data": {"image": f"u{task_id}"}},
            obj=plan.objects["image"],
            image=Image.new("RGB", (W, H)),
            context={"result": [click(x, 50)]},
            targets=targets,
        )
        return backend.preprocess(item)

    with torch.inference_mode():
        backend.forward([request(k, 20) for k in range(3)])  # encode the three images
        alone = [backend.forward([request(k, 20 + 20 * k)])[0] for k in range(3)]
        calls = len(backend.decoder.calls)
        together = backend.forward([request(k, 20 + 20 * k) for k in range(3)])
    assert len(backend.decoder.calls) == calls + 1 and backend.decoder.calls[-1]["batch"] == 3
    for a, b in zip(alone, together, strict=True):
        (ma,), (mb,) = a.masks, b.masks
        assert ma.offset == mb.offset and np.array_equal(ma.crop, mb.crop)


def test_evictions_keep_the_cache_within_its_bytes(tmp_path: Path, sam2_dir: Path) -> None:
    """A bound that holds one embedding: alternating images re-encode, evictions counted, bytes bounded."""
    bound = 40_000  # one tiny SAM 2 embedding is 32 KiB
    rt = runtime(tmp_path, embedding_cache_bytes=bound)
    try:
        cfg = config(sam2_dir)
        for task_id in (1, 2, 1):
            assert interactive(rt, cfg, [click(50, 50)], task_id=task_id)["result"]
        stats = rt.embeddings.stats
        assert (stats.misses, stats.evictions, stats.entries) == (3, 2, 1)
        assert 0 < stats.bytes <= bound
    finally:
        rt.close()


# ---------------------------------------------------------------- plain /predict


def wait_for(check: Any, timeout: float = 20.0) -> None:
    """Poll until check() holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_plain_predict_answers_without_result_and_warms_a_single_opened_task(
    tmp_path: Path, sam2_dir: Path
) -> None:
    """Data Manager pages get no prediction (and no encode); opening one task encodes it for the first click."""
    resolver = FakeResolver()
    rt = runtime(tmp_path, resolver=resolver)
    cfg = config(sam2_dir)
    try:
        tasks = [{"id": i, "data": {"image": IMAGE_URL}} for i in range(1, 4)]
        started = time.perf_counter()
        answers = rt.predict(cfg, tasks)
        assert time.perf_counter() - started < 1.0
        assert all(set(a) == {"model_version", "error"} for a in answers)
        assert all(a["error"].startswith("interactive model: click or draw a box") for a in answers)
        time.sleep(0.5)
        assert resolver.calls == [] and len(rt.embeddings) == 0  # several tasks: nothing encoded
        (opened,) = rt.predict(cfg, [{"id": 7, "data": {"image": IMAGE_URL}}])
        assert "result" not in opened
        wait_for(lambda: len(rt.embeddings) == 1)
        assert rt.embeddings.stats.misses == 1 and len(resolver.calls) == 1
        assert interactive(rt, cfg, [click(50, 50)], task_id=7)["result"]
        assert (rt.embeddings.stats.misses, rt.embeddings.stats.hits) == (1, 1)
        assert len(resolver.calls) == 1  # the click fetched nothing
    finally:
        rt.close()


def test_mixed_configs_keep_the_other_familys_predictions(tmp_path: Path, sam2_dir: Path) -> None:
    """SAM masks next to a detector's rectangles: /predict gives rectangles, a click gives only masks."""
    extra = '\n  <RectangleLabels name="cars" toName="image"><Label value="car"/></RectangleLabels>'
    cfg = config(sam2_dir, extra=extra)
    fams = {"sam": PlantedSam, "fake_detection": FakeDetector}
    rt = Runtime(Settings(model_dir=str(tmp_path), max_wait_ms=2.0), families=fams, resolver=FakeResolver())
    try:
        (plain,) = rt.predict(cfg, [{"id": 1, "data": {"image": IMAGE_URL}}])
        assert "error" not in plain and {r["from_name"] for r in plain["result"]} == {"cars"}
        clicked = interactive(rt, cfg, [click(50, 50)])
        assert {r["from_name"] for r in clicked["result"]} == {"mask"}
    finally:
        rt.close()


def test_metrics_show_the_cache(tmp_path: Path, sam2_dir: Path) -> None:
    """/metrics exports hits, misses, evictions and bytes of the embedding cache."""
    settings = Settings(model_dir=str(tmp_path), max_wait_ms=2.0)
    rt = Runtime(settings, families=families(), resolver=FakeResolver())
    app = create_app(settings, runtime=rt)
    cfg = config(sam2_dir)
    client = app.test_client()
    try:
        for _ in range(2):
            body = {
                "tasks": [{"id": 1, "data": {"image": IMAGE_URL}}],
                "label_config": cfg,
                "params": {"context": {"result": [click(50, 50)]}},
            }
            resp = client.post("/predict", json=body)
            assert resp.status_code == 200 and resp.get_json()["results"][0]["result"]
        text = client.get("/metrics").get_data(as_text=True)
        key = f"sam:facebook/sam2.1-hiera-tiny@{sam2_dir}"
        assert f'lsml_embedding_cache_misses_total{{backend="{key}"}} 1.0' in text
        assert f'lsml_embedding_cache_hits_total{{backend="{key}"}} 1.0' in text
        assert "lsml_embedding_cache_bytes 32768.0" in text
    finally:
        rt.close()


def test_plain_predict_on_a_model_that_cannot_load_says_why(tmp_path: Path) -> None:
    """A SAM config whose checkpoint is missing: each task's error is the reason, not the click hint."""
    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    rt = runtime(tmp_path)
    try:
        (answer,) = rt.predict(config(empty), [{"id": 1, "data": {"image": IMAGE_URL}}])
        assert "result" not in answer and "save_pretrained() folder" in answer["error"]
    finally:
        rt.close()


class SlowSam(PlantedSam):
    """Encodes take at least half a second (a large model on a busy GPU)."""

    def forward(self, batch: list[Any]) -> list[Any]:
        time.sleep(0.5)
        return super().forward(batch)


def test_warm_ups_of_opened_tasks_are_bounded(tmp_path: Path, sam2_dir: Path) -> None:
    """Paging through six tasks quickly warms at most two: encodes never pile up ahead of clicks."""
    rt = runtime(tmp_path, sam=SlowSam)
    cfg = config(sam2_dir)
    try:
        for task_id in range(1, 7):
            (answer,) = rt.predict(cfg, [{"id": task_id, "data": {"image": IMAGE_URL}}])
            assert "result" not in answer
        wait_for(lambda: rt._prefetching == 0)
        assert rt.embeddings.stats.misses == 2
    finally:
        rt.close()


@pytest.mark.gpu
def test_cuda_fp16_clicks_keep_the_embedding_on_the_gpu_and_give_the_cpu_mask(
    tmp_path: Path, sam2_dir: Path
) -> None:
    """On CUDA (fp16 autocast): the cached embedding stays on the GPU and a click gives the CPU run's mask."""
    masks = {}
    for device in ("cpu", "cuda"):
        rt = runtime(tmp_path / device, device=device)
        try:
            (item,) = interactive(rt, config(sam2_dir), [click(25, 75)])["result"]
            masks[device] = decoded(item)
            assert interactive(rt, config(sam2_dir), [click(30, 70)])["result"]
            assert rt.embeddings.stats.hits == 1
            if device == "cuda":
                (embedding,) = [value for value, _ in rt.embeddings._entries.values()]
                assert all(f.device.type == "cuda" for f in embedding.features)
        finally:
            rt.close()
    assert np.array_equal(masks["cpu"], masks["cuda"])
