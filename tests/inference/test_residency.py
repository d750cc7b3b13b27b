"""The GPU memory budget (issue #29): idle models offloaded least recently used first, never one in use, 503s.

Accounted as on a GPU but run on the CPU: the budget is GPU_MEMORY_BYTES over the models' parameter
bytes, and each model's modules record where they were moved.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from serving.contract import Backend, Item, ModelSpec, Target
from serving.errors import Overloaded
from serving.inference.metrics import Metrics
from serving.inference.residency import Residency, find_modules, module_bytes
from serving.inference.runtime import Runtime
from serving.results import regions
from serving.settings import Settings

UNIT = 64 * 64 * 4  # one "unit": the fp32 weight of a 64x64 linear layer


class Recorded(nn.Linear):
    """A linear layer that records the devices it is moved to instead of moving (no GPU here)."""

    def __init__(self, units: int) -> None:
        super().__init__(64, 64 * units, bias=False)
        self.moves: list[str] = []

    def to(self, *args: Any, **kwargs: Any) -> Recorded:  # type: ignore[override]
        """Record the device."""
        self.moves.append(str(args[0] if args else kwargs.get("device")))
        return self


class Holder:
    """Stands for a family: modules somewhere among its attributes."""

    def __init__(self, units: int) -> None:
        self.net = Recorded(units)
        self.helpers = {"tokenizer": object(), "extra": [self.net]}  # the same module twice: counted once


def _residency(budget_units: float) -> Residency:
    return Residency(Settings(gpu_memory_bytes=int(budget_units * UNIT)), Metrics())


def _resident(res: Residency) -> list[str]:
    return sorted(k for k, v in res.snapshot().items() if v["resident"])


def test_modules_are_found_among_attributes_and_counted_once() -> None:
    holder = Holder(2)
    assert find_modules(holder) == [holder.net]
    assert module_bytes(find_modules(holder)) == 2 * UNIT


def test_the_least_recently_used_idle_model_is_offloaded_for_a_new_one() -> None:
    res = _residency(2.5)
    a, b, c = Holder(1), Holder(1), Holder(1)
    assert res.loaded("a", a, "cuda:0", lambda: False) is None
    assert res.loaded("b", b, "cuda:0", lambda: False) is None
    with res.using("a"):  # a was used after b: b is now the least recently used
        pass
    assert res.loaded("c", c, "cuda:0", lambda: False) is None
    assert _resident(res) == ["a", "c"]
    assert b.net.moves == ["cpu"]
    # b comes back for its next forward, and the LRU of the others (a) makes room
    with res.using("b"):
        assert _resident(res) == ["b", "c"]
    assert b.net.moves == ["cpu", "cuda:0"] and a.net.moves == ["cpu"]
    assert res.metrics.resident_models._value.get() == 2
    assert res.metrics.resident_bytes._value.get() == 2 * UNIT


def test_a_model_in_use_is_never_offloaded_and_a_model_that_cannot_fit_waits_then_is_refused() -> None:
    res = _residency(2)
    a, b, c = Holder(1), Holder(1), Holder(1)
    res.loaded("a", a, "cuda:0", lambda: False)
    res.loaded("b", b, "cuda:0", lambda: False)
    running = threading.Event()
    finish = threading.Event()

    def forward(key: str) -> None:
        with res.using(key):
            running.set()
            finish.wait(10)

    threads = [threading.Thread(target=forward, args=(k,)) for k in ("a", "b")]
    for t in threads:
        running.clear()
        t.start()
        assert running.wait(5)
    # both in use: c is loaded but offloaded itself, and its forward cannot get room
    res.loaded("c", c, "cuda:0", lambda: False)
    assert _resident(res) == ["a", "b"] and c.net.moves == ["cpu"]
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        res.reserve("c", 0.3)
    assert time.monotonic() - started >= 0.3
    assert refused.value.retry_after_s == 2
    assert a.net.moves == [] and b.net.moves == []  # nothing in use was moved
    # once a forward ends, a waiting model gets the room it frees
    got = threading.Event()

    def wait_for_c() -> None:
        res.reserve("c", 10)
        got.set()

    waiter = threading.Thread(target=wait_for_c)
    waiter.start()
    time.sleep(0.2)
    assert not got.is_set()
    finish.set()
    assert got.wait(5)
    for t in (*threads, waiter):
        t.join(5)
    assert "c" in _resident(res) and len(_resident(res)) == 2


def test_a_model_bigger_than_the_whole_budget_is_refused_with_the_reason() -> None:
    res = _residency(1.5)
    big = Holder(2)
    reason = res.loaded("big", big, "cuda:0", lambda: False)
    assert reason is not None and "more than the whole budget" in reason and "GPU_MEMORY" in reason
    assert big.net.moves == ["cpu"]


def test_models_with_queued_work_are_offloaded_after_idle_ones() -> None:
    res = _residency(2)
    a, b, c = Holder(1), Holder(1), Holder(1)
    res.loaded("a", a, "cuda:0", lambda: True)  # items queued for a: evicting it would bring it right back
    res.loaded("b", b, "cuda:0", lambda: False)
    res.loaded("c", c, "cuda:0", lambda: False)
    assert _resident(res) == ["a", "c"]


def test_no_budget_on_a_cpu_device_without_gpu_memory_bytes() -> None:
    res = Residency(Settings(), Metrics())
    assert res.loaded("a", Holder(1000), "cpu", lambda: False) is None
    assert res.snapshot() == {}
    with res.using("a"):
        pass


class SizedModel(Backend):
    """A text model of N units (its model_name is mem-N); its forward can be held open by a test."""

    family = "fake_mem"
    control_tags = ("Labels",)
    object_tags = ("Text",)
    input_kind = "text"
    max_batch_size = 8
    default_model = "mem-1"
    hold = threading.Event()
    holding = threading.Event()
    oom_next = False  # the next load runs out of device memory once

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Accept mem-<units>."""
        return name.startswith("mem-")

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Any) -> str:
        """Return the name."""
        return spec.name

    def load(self, device: str) -> None:
        """Build a layer of the named size."""
        if SizedModel.oom_next:
            SizedModel.oom_next = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.net = nn.Linear(64, 64 * int(self.spec.name.split("-")[1]), bias=False)

    def preprocess(self, item: Item) -> str:
        """Return the text."""
        assert item.text is not None
        return item.text

    def forward(self, batch: list[Any]) -> list[Any]:
        """Tag the first word; a text 'hold' keeps the forward running until the test lets it go."""
        if "hold" in batch:
            SizedModel.holding.set()
            SizedModel.hold.wait(10)
        with torch.no_grad():
            self.net(torch.zeros(1, 64))
        return [len(text.split(" ")[0]) for text in batch]

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """One PER span over the first word."""
        assert item.text is not None
        label = target.label_map("PER")
        return [regions.span_item(target, 0, output, item.text[:output], label, 0.9)] if label else []


def _config(model: str) -> str:
    return (
        f'<View><Text name="text" value="$text"/><Labels name="ner" toName="text" model_name="{model}">'
        '<Label value="PER"/></Labels></View>'
    )


def _runtime(tmp_path: Any, budget_units: float) -> Runtime:
    settings = Settings(
        model_dir=str(tmp_path), device="cpu", gpu_memory_bytes=int(budget_units * UNIT), memory_wait_s=0.3
    )
    return Runtime(settings, families={"fake_mem": SizedModel})


def _predict(runtime: Runtime, model: str, text: str = "Alice met Bob") -> dict[str, Any]:
    (answer,) = runtime.predict(_config(model), [{"id": 1, "data": {"text": text}}])
    return answer


def test_the_runtime_keeps_models_under_the_budget_and_answers_503_when_the_models_in_use_hold_it(
    tmp_path: Any,
) -> None:
    runtime = _runtime(tmp_path, 3)
    try:
        assert _predict(runtime, "mem-1")["result"][0]["value"]["text"] == "Alice"
        assert _predict(runtime, "mem-2")["result"]
        assert _predict(runtime, "mem-1", "Carol met Dan")["result"][0]["value"]["text"] == "Carol"
        snap = runtime.residency.snapshot()  # 1 + 2 units: both fit
        assert {k: v["resident"] for k, v in snap.items()} == {"fake_mem:mem-1": True, "fake_mem:mem-2": True}
        SizedModel.hold.clear()
        SizedModel.holding.clear()
        worker = threading.Thread(target=_predict, args=(runtime, "mem-2", "hold"))
        worker.start()
        assert SizedModel.holding.wait(10)
        # mem-2 runs (2 units) and mem-1 is idle (1 unit): a 3-unit model cannot fit until mem-2 ends
        started = time.monotonic()
        with pytest.raises(Overloaded):
            _predict(runtime, "mem-3")
        assert time.monotonic() - started < 5
        assert runtime.metrics.admission_rejected.labels("fake_mem:mem-3")._value.get() == 1
        SizedModel.hold.set()
        worker.join(10)
        assert _predict(runtime, "mem-3")["result"]  # both others offloaded for it
        snap = runtime.residency.snapshot()
        assert [k for k, v in snap.items() if v["resident"]] == ["fake_mem:mem-3"]
        assert runtime.metrics.evictions.labels("fake_mem:mem-2")._value.get() >= 1
        metrics = runtime.metrics.render().decode()
        assert "lsml_resident_models 1.0" in metrics and f"lsml_resident_bytes {3 * UNIT}.0" in metrics
    finally:
        SizedModel.hold.set()
        runtime.close()


def test_a_model_over_the_whole_budget_is_unavailable_with_the_reason(tmp_path: Any) -> None:
    runtime = _runtime(tmp_path, 2)
    try:
        answer = _predict(runtime, "mem-3")
        assert "result" not in answer
        assert "more than the whole budget" in answer["error"]
        slot = runtime.slot(ModelSpec("fake_mem", "mem-3"))
        assert slot.failed
    finally:
        runtime.close()


def test_a_load_out_of_device_memory_offloads_the_idle_models_and_loads_again(tmp_path: Any) -> None:
    runtime = _runtime(tmp_path, 8)
    try:
        assert _predict(runtime, "mem-1")["result"]
        SizedModel.oom_next = True
        assert _predict(runtime, "mem-2")["result"]
        snap = runtime.residency.snapshot()
        assert {k: v["resident"] for k, v in snap.items()} == {
            "fake_mem:mem-1": False,
            "fake_mem:mem-2": True,
        }
    finally:
        SizedModel.oom_next = False
        runtime.close()


class RealHolder:
    """A model of real layers (moved for real on a GPU)."""

    def __init__(self, mib: int) -> None:
        self.net = nn.Linear(1024, 256 * mib, bias=False)


@pytest.mark.gpu
def test_on_cuda_an_offloaded_model_frees_its_device_memory_and_comes_back() -> None:
    a, b = RealHolder(64), RealHolder(64)  # 64 MiB of fp32 weights each
    a.net.to("cuda")
    b.net.to("cuda")
    res = Residency(Settings(gpu_memory_bytes=100 * 2**20), Metrics())
    before = torch.cuda.memory_allocated()
    res.loaded("a", a, "cuda", lambda: False)
    res.loaded("b", b, "cuda", lambda: False)  # 128 MiB > 100: a goes to the CPU
    assert before - torch.cuda.memory_allocated() >= 64 * 2**20
    assert a.net.weight.device.type == "cpu" and b.net.weight.device.type == "cuda"
    with res.using("a"):
        assert a.net.weight.device.type == "cuda" and b.net.weight.device.type == "cpu"
        assert a.net(torch.ones(1, 1024, device="cuda")).shape == (1, 256 * 64)
