"""Torchvision weights: the static table, availability messages, user checkpoints, the weights CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from backends import _torchvision as tv
from backends.classification import ClassificationBackend
from backends.detection import DetectionBackend
from backends.keypoints import KeypointsBackend
from backends.segmentation import InstanceSegmentationBackend, SemanticSegmentationBackend
from serving.cli import weights as weights_cli
from serving.contract import ModelSpec
from tests.backends._vision_support import settings

FAMILIES = {
    "detection": DetectionBackend,
    "instance_segmentation": InstanceSegmentationBackend,
    "semantic_segmentation": SemanticSegmentationBackend,
    "keypoints": KeypointsBackend,
    "image_classification": ClassificationBackend,
}


@pytest.mark.parametrize("name", sorted(tv.MODELS))
def test_static_table_matches_torchvision_enums(name: str) -> None:
    """Every model's enum member, URL and file name are exactly what torchvision's builder loads."""
    import torchvision.models as tvm

    info = tv.MODELS[name]
    enum = tvm.get_model_weights(name)
    assert enum.__name__ == info.weights_enum
    member = enum[info.member]
    assert member is enum.DEFAULT
    assert member.url == info.url
    assert Path(member.url).name == info.file_name


def test_every_family_model_is_in_the_table() -> None:
    """The families serve exactly the issue's models, all described statically."""
    served = {m for cls in FAMILIES.values() for m in cls.model_names()}
    assert served == set(tv.MODELS)
    assert DetectionBackend.default_model == "fasterrcnn_resnet50_fpn_v2"
    assert set(DetectionBackend.model_names()) == {
        "fasterrcnn_resnet50_fpn_v2",
        "retinanet_resnet50_fpn_v2",
        "fcos_resnet50_fpn",
        "ssdlite320_mobilenet_v3_large",
        "fasterrcnn_mobilenet_v3_large_fpn",
    }


def test_availability_reports_missing_weights_with_the_fix(isolated_env: Path, tmp_path: Path) -> None:
    """Missing weights: the message names the expected file and the download command; present: None."""
    spec = ModelSpec("detection", "fasterrcnn_resnet50_fpn_v2")
    reason = DetectionBackend.availability(spec, settings(tmp_path))
    assert reason is not None
    expected = (
        isolated_env / "torch_home" / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"
    )
    assert reason.startswith("weights missing (")
    assert str(expected) in reason
    assert "python -m serving weights download --model fasterrcnn_resnet50_fpn_v2" in reason
    assert "make weights" in reason
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"x")
    assert DetectionBackend.availability(spec, settings(tmp_path)) is None
    # Version = model name + fingerprint of that file.
    backend = DetectionBackend(spec, settings(tmp_path))
    assert backend.version().startswith("fasterrcnn_resnet50_fpn_v2:")
    assert not backend.version().endswith("missing")


def test_availability_rejects_unknown_model_names(isolated_env: Path, tmp_path: Path) -> None:
    """A model_name the family does not serve is reported with the valid names."""
    reason = SemanticSegmentationBackend.availability(
        ModelSpec("semantic_segmentation", "unet"), settings(tmp_path)
    )
    assert reason is not None and "deeplabv3_resnet50" in reason and "unet" in reason


def test_user_checkpoint_needs_its_class_list(isolated_env: Path, tmp_path: Path) -> None:
    """model_path: missing file, then missing class list, then OK; relative paths live under MODEL_DIR."""
    s = settings(tmp_path)
    spec = ModelSpec("detection", "ssdlite320_mobilenet_v3_large", "ships/ships.pt")
    reason = DetectionBackend.availability(spec, s)
    assert reason is not None and "does not exist" in reason
    ckpt = Path(s.model_dir) / "ships" / "ships.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, ckpt)
    reason = DetectionBackend.availability(spec, s)
    assert reason is not None and "ships.classes.txt" in reason
    (ckpt.parent / "ships.classes.txt").write_text("# my classes\nship\n\nbuoy\n")
    assert DetectionBackend.availability(spec, s) is None
    assert tv.read_class_names(ckpt.parent / "ships.classes.txt") == ["ship", "buoy"]
    assert tv.with_background(["ship", "buoy"]) == ["__background__", "ship", "buoy"]
    assert tv.with_background(["__background__", "ship"]) == ["__background__", "ship"]


def test_state_dict_file_unwraps_training_checkpoints(tmp_path: Path) -> None:
    """{"model": sd} checkpoints and DataParallel "module." prefixes load as a plain state_dict."""
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module.a": torch.ones(2)}, "epoch": 3}, path)
    state = tv.load_state_dict_file(path)
    assert list(state) == ["a"]
    assert torch.equal(state["a"], torch.ones(2))


def test_weights_cli_lists_and_downloads_without_network(
    isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`download --model X` fetches X's enum URL with its hash prefix into the hub cache; `list` reports it."""
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    families = weights_cli.families_with_weights(FAMILIES)
    assert set(families) == set(FAMILIES)
    failures = weights_cli.download(settings(tmp_path), families, ["efficientnet_b0"])
    assert failures == 0
    assert calls == [
        (
            "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
            str(
                isolated_env / "torch_home" / "hub" / "checkpoints" / "efficientnet_b0_rwightman-7f5810bc.pth"
            ),
            "7f5810bc",
        )
    ]
    with caplog.at_level(logging.INFO, logger="serving.weights"):
        missing = weights_cli.list_weights(settings(tmp_path), families)
    assert missing == len(tv.MODELS) - 1
    assert any("efficientnet_b0" in r.message and "present" in r.message for r in caplog.records)
    # Present files are not fetched again; unknown names fail.
    assert weights_cli.download(settings(tmp_path), families, ["efficientnet_b0", "yolo"]) == 1
    assert len(calls) == 1


def test_checkpoint_dir_without_importing_torch(tmp_path: Path) -> None:
    """Before torch is imported (fast /setup), the folder follows torch.hub.get_dir()'s rule exactly."""
    import subprocess
    import sys

    code = (
        "import sys; from backends import _torchvision as tv; a = tv.checkpoints_dir(); "
        "assert 'torch' not in sys.modules; import torch.hub; "
        "b = tv.checkpoints_dir(); c = torch.hub.get_dir() + '/checkpoints'; "
        "assert str(a) == str(b) == c, (a, b, c); print(a)"
    )
    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}):
        base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
        out = subprocess.run(
            [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().startswith(str(tmp_path))


def test_a_model_id_is_downloaded_by_its_own_family_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NER accepts any name, yet a SAM id is fetched by the SAM family alone (the Docker build fetched it twice)."""
    import model

    calls: list[tuple[str, tuple[str, ...]]] = []
    families = weights_cli.families_with_weights(model.families())
    for family, cls in families.items():
        monkeypatch.setattr(
            cls,
            "download_weights",
            classmethod(lambda c, names, s, f=family: calls.append((f, tuple(names))) or []),
        )
    sam_id, ner_id = "facebook/sam2.1-hiera-tiny", "dslim/bert-base-NER"
    assert weights_cli.download(settings(tmp_path), families, [sam_id, ner_id, "resnet50"]) == 0
    assert sorted(calls) == [("image_classification", ("resnet50",)), ("ner", (ner_id,)), ("sam", (sam_id,))]
