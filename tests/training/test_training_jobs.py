"""The training framework with a fake trainable family: coalescing, the job state machine, versions.

Jobs run in-process through the same `run_job` the trainer process runs (the process itself is
covered by test_training_process.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serving.contract import ModelSpec
from serving.inference.runtime import Runtime
from serving.service.model import ModelService
from serving.settings import Settings
from serving.training.job import run_job
from serving.training.names import project_key
from serving.training.store import MAX_ATTEMPTS, TrainingStore
from serving.training.versions import VersionStore
from serving.util.files import write_json_atomic
from tests.support.fakes import FakeResolver
from tests.support.training_fakes import CONFIG, MemoNER, export_tasks, families

SPEC = ModelSpec("memo_ner", "memo")


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base = Settings(
        model_dir=str(tmp_path / "model_dir"),
        max_wait_ms=1.0,
        train_min_examples=3,
        label_studio_url="http://ls.invalid",
        label_studio_api_key="legacy-token",
    )
    return base.with_(**kw)


def inline_job(
    store: TrainingStore, tasks: list[Any], project: str = "7", event: str = "START_TRAINING"
) -> str:
    job_id, _ = store.request(project, SPEC, "cpu", CONFIG, {"kind": "inline"}, event)
    write_json_atomic(store.job_dir(job_id) / "data.json", tasks)
    return job_id


def run_next(cfg: Settings, **kw: Any) -> Any:
    store = TrainingStore.for_settings(cfg)
    job = store.claim("cpu")
    assert job is not None
    return run_job(
        job,
        store=store,
        versions=VersionStore.for_settings(cfg),
        families=families(),
        settings=cfg,
        resolver=FakeResolver(),
        **kw,
    )


# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("3.1795429160", "3"),
        (3, "3"),
        ({"id": 12, "title": "x"}, "12"),
        ("offline", "offline"),
        ("../etc", None),
        ("a/b", None),
        ("", None),
        (None, None),
        (True, None),
    ],
)
def test_project_key_names_the_project_and_never_a_path(raw: Any, key: str | None) -> None:
    assert project_key(raw) == key


# ---------------------------------------------------------------------------------------------- coalescing


def test_requests_coalesce_while_queued_and_make_one_follow_up_while_running(tmp_path: Path) -> None:
    store = TrainingStore(tmp_path)
    ids = {
        store.request("7", SPEC, "cpu", CONFIG, {"kind": "label_studio"}, "ANNOTATION_CREATED")[0]
        for _ in range(5)
    }
    assert len(ids) == 1
    (first,) = ids
    job = store.get(first)
    assert job is not None and job.requests == 5 and job.events == {"ANNOTATION_CREATED": 5}
    assert store.claim("cpu").id == first  # type: ignore[union-attr]
    # a burst while it runs becomes ONE follow-up job
    follow = {
        store.request("7", SPEC, "cpu", CONFIG, {"kind": "label_studio"}, "START_TRAINING")[0]
        for _ in range(4)
    }
    assert len(follow) == 1 and first not in follow
    # another project, or another model, is its own job
    other_project, joined = store.request(
        "8", SPEC, "cpu", CONFIG, {"kind": "label_studio"}, "START_TRAINING"
    )
    other_model, _ = store.request("7", ModelSpec("memo_ner", "other"), "cpu", CONFIG, {}, "START_TRAINING")
    assert not joined and len({first, *follow, other_project, other_model}) == 4
    states = sorted(j.state for j in store.jobs())
    assert states == ["queued", "queued", "queued", "running"]


def test_a_queued_job_waits_for_its_burst_to_end_but_not_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serving.training.store as training

    clock = [1000.0]
    monkeypatch.setattr(training, "_now", lambda: clock[0])
    store = TrainingStore(tmp_path)

    def save() -> str:
        return store.request(
            "7", SPEC, "cpu", CONFIG, {}, "START_TRAINING", debounce_s=5.0, max_delay_s=20.0
        )[0]

    job_id = save()
    assert store.claim("cpu") is None  # saves keep coming: not yet
    for _ in range(3):
        clock[0] += 4.0  # a save every 4 s pushes the start
        assert save() == job_id
        assert store.claim("cpu") is None
    clock[0] += 5.0  # 5 s quiet
    assert store.claim("cpu").id == job_id  # type: ignore[union-attr]
    follow = save()
    for _ in range(10):  # saves forever: it still starts 20 s after it was created
        clock[0] += 3.0
        assert save() == follow
        if clock[0] >= 1017.0 + 20.0:
            break
    assert store.get(follow).not_before == pytest.approx(1017.0 + 20.0)  # type: ignore[union-attr]
    store.finish(job_id, "done")
    assert store.claim("cpu").id == follow  # type: ignore[union-attr]


def test_concurrent_requests_from_many_threads_make_one_job(tmp_path: Path) -> None:
    store = TrainingStore(tmp_path)
    found: list[str] = []
    lock = threading.Lock()

    def burst() -> None:
        for _ in range(10):
            job_id, _ = store.request(
                "7", SPEC, "cpu", CONFIG, {"kind": "label_studio"}, "ANNOTATION_UPDATED"
            )
            with lock:
                found.append(job_id)

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1
    job = store.get(found[0])
    assert job is not None and job.requests == 80


# ---------------------------------------------------------------------------------------------- state machine


def test_a_job_trains_publishes_a_version_and_moves_the_pointer(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = TrainingStore.for_settings(cfg)
    job_id = inline_job(store, export_tasks(6))
    job = run_next(cfg)
    assert job.id == job_id and job.state == "done", job.error
    assert job.version is not None and job.version.startswith("v1-")
    assert job.model_version is not None and job.model_version.startswith("memo_ner-trained-")
    assert (
        job.snapshot is not None
        and job.snapshot["examples"] == 6
        and job.snapshot["task_ids"] == list(range(1, 7))
    )
    assert [h["epoch"] for h in job.progress["history"]] == [1, 2, 3]
    versions = VersionStore.for_settings(cfg)
    (spec,) = versions.current("7").values()
    assert spec.trained == job.version
    table = json.loads(Path(spec.path).read_text())["table"]
    assert table == {"Alice": "Person", "Bruno": "Person", "Chen": "Person", "Dana": "Person"} | {
        "Zolvarex": "Drug",
        "Metraquin": "Drug",
        "Bravocel": "Drug",
    }
    manifest = json.loads((Path(spec.path).parent.parent / "version.json").read_text())
    assert manifest["job_id"] == job_id and manifest["model_version"] == job.model_version
    assert not (store.job_dir(job_id) / "checkpoints").exists()  # no longer needed once published
    assert "done" in (store.job_dir(job_id) / "train.log").read_text()


def test_too_few_examples_finish_skipped_without_a_version(tmp_path: Path) -> None:
    cfg = settings(tmp_path, train_min_examples=10)
    store = TrainingStore.for_settings(cfg)
    tasks = export_tasks(4)
    tasks[0]["annotations"][0]["was_cancelled"] = True  # a skipped task does not count
    inline_job(store, tasks)
    job = run_next(cfg)
    assert job.state == "skipped"
    assert (
        job.reason is not None and "3 annotated task(s)" in job.reason and "TRAIN_MIN_EXAMPLES" in job.reason
    )
    assert VersionStore.for_settings(cfg).current("7") == {}


def test_a_failing_job_and_a_cancelled_job_never_touch_the_pointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = settings(tmp_path)
    store = TrainingStore.for_settings(cfg)
    versions = VersionStore.for_settings(cfg)
    inline_job(store, export_tasks(5))
    good = run_next(cfg)
    before = versions.pointer_path("7").read_bytes()

    monkeypatch.setattr(MemoNER, "fail_train", "GPU on fire")
    inline_job(store, export_tasks(5))
    failed = run_next(cfg)
    assert failed.state == "failed" and "GPU on fire" in (failed.error or "")
    assert versions.pointer_path("7").read_bytes() == before
    monkeypatch.setattr(MemoNER, "fail_train", "")

    # cancelled while running: the next progress report stops it
    job_id = inline_job(store, export_tasks(5))
    job = store.claim("cpu")
    assert job is not None and job.id == job_id
    assert store.cancel(job_id).state == "running"  # a running job stops at its next progress report
    done = run_job(
        job,
        store=store,
        versions=versions,
        families=families(),
        settings=cfg,
        resolver=FakeResolver(),
    )
    assert done.state == "cancelled"
    assert versions.pointer_path("7").read_bytes() == before
    assert [m["version"] for m in versions.manifests("7")] == [good.version]

    # a queued job is cancelled at once
    queued = inline_job(store, export_tasks(5), project="9")
    assert store.cancel(queued).state == "cancelled"
    assert store.claim("cpu") is None


def test_a_stopping_trainer_puts_its_job_back_and_it_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    cfg = settings(tmp_path, train_epochs=3)
    store = TrainingStore.for_settings(cfg)
    job_id = inline_job(store, export_tasks(4))
    stop = threading.Event()
    original = store.update

    def update(jid: str, **values: Any) -> None:
        original(jid, **values)
        if values.get("progress", {}).get("checkpoint_epoch") == 1:
            stop.set()  # SIGTERM arrives right after epoch 1's checkpoint

    store.update = update  # type: ignore[method-assign]
    job = store.claim("cpu")
    assert job is not None
    out = run_job(
        job, store=store, versions=VersionStore.for_settings(cfg), families=families(), settings=cfg,
        resolver=FakeResolver(), stop=stop,
    )  # fmt: skip
    assert out.state == "queued" and out.progress["checkpoint_epoch"] == 1
    store.update = original  # type: ignore[method-assign]
    resumed = run_next(cfg)
    assert resumed.id == job_id and resumed.state == "done" and resumed.attempts == 2
    spec = next(iter(VersionStore.for_settings(cfg).current("7").values()))
    ran = [epoch for epoch, _ in json.loads(Path(spec.path).read_text())["ran"]]
    assert ran == [1, 2, 3]  # epoch 1 came from the checkpoint, not run twice


def test_a_job_that_keeps_killing_its_trainer_fails(tmp_path: Path) -> None:
    store = TrainingStore(tmp_path)
    job_id, _ = store.request("7", SPEC, "cpu", CONFIG, {"kind": "inline"}, "START_TRAINING")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job = store.claim("cpu")  # the trainer "dies" each time: the job stays running
        assert job is not None and job.id == job_id and job.attempts == attempt
    assert store.claim("cpu") is None
    job = store.get(job_id)
    assert job is not None and job.state == "failed" and "died 3 times" in (job.error or "")


# ---------------------------------------------------------------------------------------------- versions


def test_versions_keep_the_last_k_and_activate_rolls_back(tmp_path: Path) -> None:
    cfg = settings(tmp_path, train_keep_versions=2)
    store = TrainingStore.for_settings(cfg)
    versions = VersionStore.for_settings(cfg)
    made = []
    for people in (("A1",), ("B1",), ("C1",)):  # different data: different weights, different versions
        inline_job(store, export_tasks(4, people=people))
        made.append(run_next(cfg).version)
    assert [m["version"] for m in versions.manifests("7")] == made[:0:-1]  # v1 pruned
    assert made[0].startswith("v1-") and made[2].startswith("v3-")
    key = SPEC.key
    versions.activate("7", key, made[1])
    assert versions.current("7")[key].trained == made[1]
    # a fourth version prunes beyond K but never the active one
    inline_job(store, export_tasks(4, people=("D1",)))
    newest = run_next(cfg).version
    assert {m["version"] for m in versions.manifests("7")} == {made[2], newest}
    versions.activate("7", key, None)
    assert versions.current("7") == {}


def test_the_pointer_is_replaced_atomically_under_concurrent_readers(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = TrainingStore.for_settings(cfg)
    versions = VersionStore.for_settings(cfg)
    made = []
    for people in (("A1",), ("B1",)):
        inline_job(store, export_tasks(4, people=people))
        made.append(run_next(cfg).version)
    seen: set[str] = set()
    bad: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            raw = versions.pointer_path("7").read_text()
            try:
                version = json.loads(raw)["models"][SPEC.key]["version"]
            except Exception as exc:
                bad.append(f"{exc}: {raw[:80]!r}")
                continue
            seen.add(version)
            spec = versions.current("7").get(SPEC.key)
            if spec is not None and not Path(spec.path).is_file():
                bad.append(f"pointer names a missing model {spec.path}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(150):
        versions.activate("7", SPEC.key, made[i % 2])
    done.set()
    for t in threads:
        t.join()
    assert bad == [] and seen == set(made)


# ---------------------------------------------------------------------------------------------- workers


def service(cfg: Settings) -> ModelService:
    runtime = Runtime(cfg, families(), resolver=FakeResolver())
    return ModelService(cfg, runtime)


def test_two_workers_see_one_version_and_swap_only_when_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = settings(tmp_path)
    a, b = service(cfg), service(cfg)
    base = a.setup("7.1795", CONFIG)
    assert b.setup("7.1795", CONFIG) == base
    task = {"id": 1, "data": {"text": "Alice takes Zolvarex daily."}}
    (before,) = a.predict([task], label_config=CONFIG, project="7.1795")
    assert before["result"] == [] and before["model_version"] == base

    store = TrainingStore.for_settings(cfg)
    inline_job(store, export_tasks(6))
    job = run_next(cfg)
    assert job.model_version != base

    # worker a notices the pointer on its next call and loads the new model in the background:
    # until it is loaded, a keeps answering with the old weights and the old version
    monkeypatch.setattr(MemoNER, "load_delay_s", 0.6)
    assert a.setup("7.1795", CONFIG) == base
    (still_old,) = a.predict([task], label_config=CONFIG, project="7.1795")
    assert still_old["model_version"] == base and still_old["result"] == []
    deadline = time.monotonic() + 10
    while a.setup("7.1795", CONFIG) == base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.setup("7.1795", CONFIG) == job.model_version
    (after,) = a.predict([task], label_config=CONFIG, project="7.1795")
    assert after["model_version"] == job.model_version
    assert {(r["value"]["text"], r["value"]["labels"][0]) for r in after["result"]} == {
        ("Alice", "Person"),
        ("Zolvarex", "Drug"),
    }
    # worker b swaps the same way and lands on the same version
    while b.setup("7.1795", CONFIG) == base and time.monotonic() < deadline:
        time.sleep(0.05)
    (b_after,) = b.predict([task], label_config=CONFIG, project="7.1795")
    assert b_after["model_version"] == job.model_version == b.setup("7.1795", CONFIG)
    assert [r["value"] for r in b_after["result"]] == [r["value"] for r in after["result"]]
    # a worker that never served the project (a restart) serves the trained version at once
    monkeypatch.setattr(MemoNER, "load_delay_s", 0.0)
    fresh = service(cfg)
    assert fresh.setup("7.1795", CONFIG) == job.model_version
    # other projects are unchanged
    assert a.setup("8.1795", CONFIG) == base
    (other,) = a.predict([task], label_config=CONFIG, project="8.1795")
    assert other["model_version"] == base and other["result"] == []


def test_requests_in_flight_finish_on_the_old_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = settings(tmp_path)
    store = TrainingStore.for_settings(cfg)
    inline_job(store, export_tasks(4))
    first = run_next(cfg)
    worker = service(cfg)
    assert worker.setup("7.1", CONFIG) == first.model_version
    worker.predict([{"data": {"text": "Alice"}}], label_config=CONFIG, project="7.1")  # loaded
    monkeypatch.setattr(MemoNER, "forward_delay_s", 0.5)
    results: list[Any] = []
    slow = threading.Thread(
        target=lambda: results.extend(
            worker.predict([{"data": {"text": "Alice takes Zolvarex."}}], label_config=CONFIG, project="7.1")
        )
    )
    slow.start()
    time.sleep(0.1)
    inline_job(store, export_tasks(6, people=("Alice", "Erin")))
    second = run_next(cfg)
    assert second.model_version != first.model_version
    deadline = time.monotonic() + 10
    while worker.setup("7.1", CONFIG) != second.model_version and time.monotonic() < deadline:
        time.sleep(0.05)
    slow.join()
    assert results[0]["model_version"] == first.model_version
    assert {r["value"]["text"] for r in results[0]["result"]} == {"Alice", "Zolvarex"}


def test_a_trained_model_that_cannot_load_falls_back_to_the_pretrained_one(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = TrainingStore.for_settings(cfg)
    inline_job(store, export_tasks(4))
    job = run_next(cfg)
    spec = next(iter(VersionStore.for_settings(cfg).current("7").values()))
    Path(spec.path).unlink()  # the version's weights vanished
    worker = service(cfg)
    version = worker.setup("7.1", CONFIG)
    assert version != job.model_version and version.startswith("memo_ner-")
    (answer,) = worker.predict([{"data": {"text": "Alice"}}], label_config=CONFIG, project="7.1")
    assert "result" in answer and answer["model_version"] == version
