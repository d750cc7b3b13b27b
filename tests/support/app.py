"""Build a test app over fake backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Flask

from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.support.fakes import FAMILIES, FakeResolver

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_request(name: str) -> dict[str, Any]:
    """Return one captured Label Studio request (method, path, headers, body)."""
    return json.loads((FIXTURES / "ls_requests" / f"{name}.json").read_text())


def fake_app(tmp_path: Path, **settings: Any) -> Flask:
    """Return an app whose runtime uses the fake backends and resolver."""
    base = Settings(model_dir=str(tmp_path / "model_dir"), max_wait_ms=2.0)
    cfg = base.with_(**settings)
    runtime = Runtime(cfg, families=FAMILIES, resolver=FakeResolver())
    return create_app(cfg, runtime=runtime)
