"""Detection and classification training through the job path, with small random models.

The real architectures' heads are replaced and their checkpoints load back through the serving
path (random COCO-shaped weights in a temp TORCH_HOME). Training itself runs on tiny detectors of
the same classes (FasterRCNN, RetinaNet, FCOS over a 3-layer backbone) and a 1-block-per-stage
ResNet, built where the families build their models, so a few CPU steps show the loss going down.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backends import _torchvision as tv
from backends import _vision_train as vt
from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from serving.contract import Item, ModelSpec, ObjectTag
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from serving.util.files import write_json_atomic
from tests.backends._vision_support import coco_categories, save_random_weights

pytestmark = pytest.mark.slow

FAMILIES = {"detection": DetectionBackend, "image_classification": ClassificationBackend}
COLORS = {"Car": (220, 30, 30), "Tree": (30, 30, 220)}


def detection_config(model: str) -> str:
    return f"""<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" model_name="{model}">
    <Label value="Car"/><Label value="Tree"/>
  </RectangleLabels>
</View>"""


CLASSIFICATION_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="kind" toName="image" model_name="resnet50"><Choice value="Red"/><Choice value="Blue"/></Choices>
</View>"""


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def box_tasks(n: int, size: tuple[int, int] = (128, 96), seed: int = 0) -> list[dict[str, Any]]:
    """Return exported tasks: a red Car and a blue Tree rectangle on grey noise, boxes in percent."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        pixels = np.random.default_rng(seed + i).integers(100, 140, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        result = []
        for k, (label, color) in enumerate(COLORS.items()):
            w, h = rng.randint(24, 40), rng.randint(24, 36)
            x = rng.randint(0, size[0] // 2 - w) + (size[0] // 2 if k else 0)
            y = rng.randint(0, size[1] - h)
            image.paste(color, (x, y, x + w, y + h))
            value = {
                "x": 100 * x / size[0],
                "y": 100 * y / size[1],
                "width": 100 * w / size[0],
                "height": 100 * h / size[1],
                "rotation": 0,
                "rectanglelabels": [label],
            }
            result.append(
                {
                    "id": f"r{k}",
                    "from_name": "box",
                    "to_name": "image",
                    "type": "rectanglelabels",
                    "value": value,
                }
            )
        tasks.append(
            {
                "id": i + 1,
                "data": {"image": png_uri(image)},
                "annotations": [{"id": i + 1, "result": result, "created_at": "x"}],
            }
        )
    return tasks


def tiny_detector(kind: str, num_classes: int) -> Any:
    """A FasterRCNN / RetinaNet / FCOS over a 3-layer stride-8 backbone: the real classes, small."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    body = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, 2, 1),
        torch.nn.ReLU(),
    )
    body.out_channels = 32  # type: ignore[assignment]
    sizes = dict(min_size=96, max_size=128)
    if kind.startswith("fasterrcnn"):
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        return FasterRCNN(
            body,
            rpn_anchor_generator=AnchorGenerator(((16, 32, 48),), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            box_head=TwoMLPHead(32 * 7 * 7, 64),
            box_predictor=FastRCNNPredictor(64, num_classes),
            rpn_pre_nms_top_n_train=300,
            rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=100,
            box_batch_size_per_image=64,
            **sizes,
        )
    if kind.startswith("retinanet"):
        return RetinaNet(
            body, num_classes, anchor_generator=AnchorGenerator(((16, 32, 48),), ((0.5, 1.0, 2.0),)), **sizes
        )
    return FCOS(body, num_classes, anchor_generator=AnchorGenerator(((32,),), ((1.0,),)), **sizes)


def tiny_classifier(num_classes: int) -> Any:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


@pytest.fixture
def tiny_models(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Build tiny models wherever the families call tv.build_model; pretrained weights "present"."""

    def build(spec: ModelSpec, settings: Settings, user_kwargs: Any = None, ignore_prefixes: Any = ()) -> Any:
        classifier = spec.family == "image_classification"
        if spec.path:
            path = tv.resolve_model_path(spec.path, settings)
            names = tv.read_class_names(tv.class_list_file(path))  # type: ignore[arg-type]
            vocabulary = names if classifier else tv.with_background(names)
            model = tiny_classifier(len(names)) if classifier else tiny_detector(spec.name, len(vocabulary))
            model.load_state_dict(tv.load_state_dict_file(path))
        else:
            vocabulary = [f"class{i}" for i in range(1000)] if classifier else coco_categories()
            model = tiny_classifier(1000) if classifier else tiny_detector(spec.name, len(vocabulary))
        return model.eval(), vocabulary, {}

    monkeypatch.setattr(tv, "build_model", build)
    folder = tv.checkpoints_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*vt.TRAINABLE_DETECTORS, "resnet50"):
        (folder / tv.model_info(name).file_name).write_bytes(b"present")  # availability() looks for the file
    return isolated_env


def run_training(cfg: Settings, spec: ModelSpec, config: str, tasks: list[Any]) -> Any:
    store = TrainingStore.for_settings(cfg)
    reason = FAMILIES[spec.family].trainable(spec, cfg)
    assert reason is None, reason
    job_id, _ = store.request("5", spec, "cpu", config, {"kind": "inline"}, "START_TRAINING")
    write_json_atomic(store.job_dir(job_id) / "data.json", tasks)
    job = store.claim("cpu")
    assert job is not None
    return run_job(job, store=store, versions=VersionStore.for_settings(cfg), families=FAMILIES, settings=cfg)


# ---------------------------------------------------------------------------------------------- detection


def test_detection_refuses_the_cpu_unless_allowed(tiny_models: Path) -> None:
    spec = ModelSpec("detection", "fasterrcnn_resnet50_fpn_v2")
    reason = DetectionBackend.trainable(spec, Settings(device="cpu"))
    assert reason is not None and "TRAIN_ALLOW_CPU=true" in reason
    assert DetectionBackend.trainable(spec, Settings(device="cpu", train_allow_cpu=True)) is None
    ssd = DetectionBackend.trainable(
        ModelSpec("detection", "ssdlite320_mobilenet_v3_large"), Settings(train_allow_cpu=True)
    )
    assert ssd is not None and "not trained here" in ssd


@pytest.mark.parametrize(
    "name", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]
)
def test_tiny_detectors_learn_through_the_job_path(tiny_models: Path, tmp_path: Path, name: str) -> None:
    cfg = Settings(
        model_dir=str(tmp_path / "model_dir"),
        device="cpu",
        train_allow_cpu=True,
        train_epochs=8,
        train_min_examples=4,
        train_learning_rate=0.05,
    )
    job = run_training(cfg, ModelSpec("detection", name), detection_config(name), box_tasks(6))
    assert job.state == "done", job.error
    losses = [h["loss"] for h in job.progress["history"]]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0] and min(losses[:2]) > min(losses[-2:]), losses
    assert set(job.progress["metrics"]) >= {"loss_classifier", "loss_box_reg"} or set(
        job.progress["metrics"]
    ) >= {
        "classification",
        "bbox_regression",
    }
    assert job.metrics["on"] == "train" and set(job.metrics["per_label"]) == {"Car", "Tree"}
    # the version is a user checkpoint of the same architecture, served by the detection family
    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    (spec,) = service.trained_models("5").values()
    assert Path(spec.path).name == "model.pt"
    assert (Path(spec.path).parent / "model.classes.txt").read_text() == "Car\nTree\n"
    backend = DetectionBackend(spec, cfg)
    backend.load("cpu")
    assert backend.labels() == ["Car", "Tree"]
    tasks = [{"id": 1, "data": {"image": box_tasks(1, seed=99)[0]["data"]["image"]}}]
    (prediction,) = service.predict(tasks, label_config=detection_config(name), project="5.1")
    assert "result" in prediction and prediction["model_version"] == job.model_version
    assert all(r["value"]["rectanglelabels"][0] in COLORS for r in prediction["result"])


@pytest.mark.parametrize(
    "name", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"]
)
def test_real_detector_heads_are_replaced_and_load_back_as_checkpoints(
    isolated_env: Path, tmp_path: Path, name: str
) -> None:
    """The real architectures with random COCO-shaped weights: new head, frozen stem, loadable checkpoint."""
    save_random_weights(name, isolated_env / "torch_home", num_classes=91)
    cfg = Settings(model_dir=str(tmp_path / "model_dir"))
    model, _, _ = tv.build_model(ModelSpec("detection", name), cfg)
    vt.replace_detector_head(model, 3)
    frozen = vt.freeze_early_backbone(vt._detector_body(model))
    assert frozen > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("backbone.body.conv1", "backbone.body.layer1", "backbone.body.0.")) for n in trainable
    )
    out = tmp_path / "out"
    out.mkdir()
    vt.write_model(out, model, ["Car", "Tree"])
    backend = DetectionBackend(ModelSpec("detection", name, str(out / "model.pt")), cfg)
    assert DetectionBackend.availability(backend.spec, cfg) is None
    backend.load("cpu")  # strict state_dict load into the architecture built for 2 classes
    assert backend.labels() == ["Car", "Tree"]
    image = Image.new("RGB", (160, 120), (120, 120, 120))
    with torch.inference_mode():  # as the runtime runs forward()
        (det,) = backend.forward(
            [backend.preprocess(Item({"id": 1}, ObjectTag("image", "Image", "image"), image=image))]
        )
    assert det.boxes_xyxy_px.shape[1] == 4


# ---------------------------------------------------------------------------------------------- classification


def color_tasks(n: int) -> list[dict[str, Any]]:
    tasks = []
    for i in range(n):
        label = "Red" if i % 2 == 0 else "Blue"
        tone = (200 + i, 40, 40) if label == "Red" else (40, 40, 200 + i)
        image = Image.new("RGB", (96 + 8 * i, 80), tone)
        item = {"from_name": "kind", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
        tasks.append(
            {"id": i + 1, "data": {"image": png_uri(image)}, "annotations": [{"id": i, "result": [item]}]}
        )
    return tasks


def test_tiny_classifier_learns_through_the_job_path(tiny_models: Path, tmp_path: Path) -> None:
    cfg = Settings(model_dir=str(tmp_path / "model_dir"), device="cpu", train_epochs=6, train_min_examples=4)
    job = run_training(
        cfg, ModelSpec("image_classification", "resnet50"), CLASSIFICATION_CONFIG, color_tasks(12)
    )
    assert job.state == "done", job.error
    losses = [h["loss"] for h in job.progress["history"]]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert job.metrics == {"on": "train", "accuracy": 1.0, "images": 12}
    service = ModelService(cfg, Runtime(cfg, FAMILIES))
    tasks = [{"id": k, "data": {"image": t["data"]["image"]}} for k, t in enumerate(color_tasks(4))]
    answers = service.predict(tasks, label_config=CLASSIFICATION_CONFIG, project="5.1")
    assert [a["result"][0]["value"]["choices"] for a in answers] == [["Red"], ["Blue"], ["Red"], ["Blue"]]
    assert {a["model_version"] for a in answers} == {job.model_version}


def test_classifier_heads_are_replaced() -> None:
    import torchvision.models as tvm

    for name, attr in (("resnet50", "fc"), ("efficientnet_b0", "classifier"), ("vit_b_16", "heads")):
        model = tvm.get_model(name, weights=None)
        vt.replace_classifier(model, 3)
        assert vt.freeze_classifier_backbone(model) > 0
        x = torch.zeros(1, 3, 224, 224)
        assert model.eval()(x).shape == (1, 3), name
        assert any(p.requires_grad for p in getattr(model, attr).parameters())
