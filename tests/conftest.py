"""Shared fixtures: an isolated environment (no real home, no hub) for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test module imports torch/transformers/easyocr, so nothing writes to the real
# home or tries the network; each test still gets its own dirs through `isolated_env`.
_BASE = Path(os.environ.get("PYTEST_CACHE_BASE", "/tmp/lsml-test-home"))
for _name in ("HOME", "TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME", "EASYOCR_MODULE_PATH"):
    (_BASE / _name.lower()).mkdir(parents=True, exist_ok=True)
    os.environ[_name] = str(_BASE / _name.lower())
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Ultralytics (the yolo family): no hub or GitHub asset look-ups, its settings file under the test home.
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = str(_BASE / "yolo_config")
(_BASE / "yolo_config").mkdir(parents=True, exist_ok=True)


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every cache at a fresh temp dir for one test."""
    for name in ("HOME", "TORCH_HOME", "HF_HOME", "XDG_CACHE_HOME", "EASYOCR_MODULE_PATH"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    return tmp_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests where CUDA is missing."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
