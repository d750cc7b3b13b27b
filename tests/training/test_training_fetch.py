"""A job reads the project's annotations from Label Studio's export API with a PAT (exchanged, refreshed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from serving.settings import Settings
from serving.training.job import TrainingFailed, fetch_export, run_job
from serving.training.store import TrainingStore
from serving.training.versions import VersionStore
from tests.support.fake_ls import LEGACY_TOKEN, FakeLS
from tests.support.fakes import FakeResolver
from tests.support.training_fakes import CONFIG, export_tasks, families
from tests.training.test_training_jobs import SPEC

EXPORT = export_tasks(12)


@pytest.fixture
def fake_ls() -> Iterator[FakeLS]:
    with FakeLS() as fake:

        def export(handler: Any) -> None:
            if not fake.authorized(handler.headers.get("Authorization", "")):
                handler.send(
                    401, b'{"detail":"Authentication credentials were not provided."}', "application/json"
                )
                return
            assert "exportType=JSON" in handler.path and "download_all_tasks=false" in handler.path
            handler.send(200, json.dumps(EXPORT).encode(), "application/json")

        fake.routes["/api/projects/3/export"] = export
        yield fake


def test_personal_access_token_is_exchanged_and_refreshed_after_a_401(fake_ls: FakeLS) -> None:
    cfg = Settings(label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.pat)
    assert fetch_export(cfg, 3) == EXPORT
    assert len(fake_ls.requests_to("/api/token/refresh/")) == 1
    fake_ls.revoked.update(fake_ls.issued)  # the access token expired (they live 5 minutes)
    assert fetch_export(cfg, 3) == EXPORT
    assert fake_ls.requests_to("/api/projects/3/export")[-1].headers["Authorization"].startswith("Bearer ")
    assert len(fake_ls.requests_to("/api/token/refresh/")) == 2


def test_legacy_token_and_bad_keys(fake_ls: FakeLS) -> None:
    assert (
        fetch_export(Settings(label_studio_url=fake_ls.url, label_studio_api_key=LEGACY_TOKEN), 3) == EXPORT
    )
    with pytest.raises(TrainingFailed, match=r"answered 401 .* LABEL_STUDIO_API_KEY"):
        fetch_export(Settings(label_studio_url=fake_ls.url, label_studio_api_key="wrong"), 3)
    with pytest.raises(TrainingFailed, match="set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        fetch_export(Settings(), 3)
    with pytest.raises(TrainingFailed, match="answered 404"):
        fetch_export(Settings(label_studio_url=fake_ls.url, label_studio_api_key=LEGACY_TOKEN), 4)


def test_a_job_snapshots_the_export_and_trains_on_it(fake_ls: FakeLS, tmp_path: Any) -> None:
    cfg = Settings(
        model_dir=str(tmp_path),
        label_studio_url=fake_ls.url,
        label_studio_api_key=fake_ls.pat,
        train_min_examples=5,
    )
    store = TrainingStore.for_settings(cfg)
    job_id, _ = store.request(
        "3", SPEC, "cpu", CONFIG, {"kind": "label_studio", "project_id": "3"}, "START_TRAINING"
    )
    job = store.claim("cpu")
    assert job is not None
    done = run_job(
        job,
        store=store,
        versions=VersionStore.for_settings(cfg),
        families=families(),
        settings=cfg,
        resolver=FakeResolver(),
    )
    assert done.state == "done", done.error
    assert json.loads((store.job_dir(job_id) / "data.json").read_text()) == EXPORT  # what it trained on, kept
    assert done.snapshot is not None and done.snapshot["task_ids"] == [t["id"] for t in EXPORT]
    assert len(done.snapshot["sha1"]) == 40 and done.snapshot["examples"] == 12
    assert fake_ls.pat not in (store.job_dir(job_id) / "train.log").read_text()
