"""Models load one at a time in a process (transformers' from_pretrained patches torch globally)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from serving.contract import Backend, Item, Target
from serving.inference.runtime import Runtime
from serving.settings import Settings


class _Loads:
    """Counts loads running at the same time."""

    lock = threading.Lock()
    running = 0
    most = 0


class _SlowLoad(Backend):
    object_tags = ("Text",)
    input_kind = "text"
    default_model = "slow"
    loaded: ClassVar[list[str]] = []

    def load(self, device: str) -> None:
        with _Loads.lock:
            _Loads.running += 1
            _Loads.most = max(_Loads.most, _Loads.running)
        time.sleep(0.2)
        with _Loads.lock:
            _Loads.running -= 1
        self.loaded.append(self.family)

    def forward(self, batch: list[Any]) -> list[Any]:
        return [None for _ in batch]

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        return []


class _LabelsFamily(_SlowLoad):
    family = "slow_labels"
    control_tags = ("Labels",)


class _ChoicesFamily(_SlowLoad):
    family = "slow_choices"
    control_tags = ("Choices",)


def test_two_models_of_one_config_load_one_after_the_other(tmp_path: Path) -> None:
    config = (
        '<View><Text name="text" value="$text"/><Labels name="l" toName="text"><Label value="A"/></Labels>'
        '<Choices name="c" toName="text"><Choice value="X"/></Choices></View>'
    )
    runtime = Runtime(
        Settings(model_dir=str(tmp_path)),
        families={"slow_labels": _LabelsFamily, "slow_choices": _ChoicesFamily},
    )
    try:
        plan = runtime.plan(config)
        runtime.check(plan)  # starts both loads, each in its own thread
        for spec in plan.specs:
            assert runtime.slot(spec).ready.wait(5)
        assert sorted(_SlowLoad.loaded) == ["slow_choices", "slow_labels"]
        assert _Loads.most == 1
    finally:
        runtime.close()
