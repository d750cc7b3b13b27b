"""A trainable fake family for the training framework's tests (importable by the spawned trainer).

`MemoNER` learns a word -> label table from annotated spans: the pretrained model (no path) knows
nothing; a trained one (path = its memo.json) tags the words it saw. Each epoch sleeps
`settings.extra["epoch_s"]` seconds (so a test can kill the trainer mid-job) and records which
process ran it, so a resumed job shows exactly which epochs ran where.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from serving.contract import (
    Backend,
    Item,
    ModelSpec,
    Target,
    TrainingRun,
    TrainResult,
    weights_fingerprint,
)
from serving.results import regions
from serving.settings import Settings


class MemoNER(Backend):
    """Tags the words it was trained on; trains in a few quick epochs."""

    family = "memo_ner"
    control_tags = ("Labels",)
    object_tags = ("Text",)
    input_kind = "text"
    max_batch_size = 16
    default_model = "memo"
    default_threshold = 0.0
    load_delay_s: ClassVar[float] = 0.0
    forward_delay_s: ClassVar[float] = 0.0
    fail_train: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the table loads in load()."""
        super().__init__(spec, settings)
        self.table: dict[str, str] = {}

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Any) -> str:
        """Return the name and, for a trained table, its content fingerprint."""
        return f"{spec.name}@{weights_fingerprint(spec.path)}" if spec.path else f"{spec.name}:base"

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Any) -> str | None:
        """A trained table must exist."""
        if spec.path and not Path(spec.path).is_file():
            return f"no table at {spec.path}"
        return None

    def load(self, device: str) -> None:
        """Read the table (a trained model) or start empty (the pretrained one)."""
        time.sleep(self.load_delay_s)
        if self.spec.path:
            self.table = json.loads(Path(self.spec.path).read_text())["table"]

    def preprocess(self, item: Item) -> str:
        """Return the text."""
        return item.text or ""

    def forward(self, batch: list[Any]) -> list[Any]:
        """Return (start, end, label) of every known word."""
        if self.forward_delay_s:
            time.sleep(self.forward_delay_s)
        out = []
        for text in batch:
            spans, pos = [], 0
            for word in str(text).split(" "):
                clean = word.strip(".,")
                if clean in self.table:
                    spans.append((pos, pos + len(clean), self.table[clean]))
                pos += len(word) + 1
            out.append(spans)
        return out

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Emit spans whose label is in the config."""
        text = item.text or ""
        items = []
        for start, end, label in output:
            mapped = target.label_map(label)
            if mapped is not None:
                items.append(regions.span_item(target, start, end, text[start:end], mapped, 1.0))
        return items

    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Any) -> str | None:
        """Always trainable."""
        return None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Learn the table epoch by epoch, checkpointing each; sleep extra["epoch_s"] per epoch."""
        if cls.fail_train:
            raise RuntimeError(cls.fail_train)
        epochs = run.epochs_or(3)
        epoch_s = float(run.settings.extra.get("epoch_s", 0.0))
        state: dict[str, Any] = {"table": {}, "ran": []}
        if run.checkpoint is not None:
            state = json.loads((run.checkpoint / "state.json").read_text())
        for epoch in range(run.start_epoch, epochs + 1):
            for step, example in enumerate(run.examples):
                assert example.text is not None
                for start, end, label in example.spans:
                    state["table"][example.text[start:end]] = label
                run.progress(epoch, step + 1, 1.0 / epoch, epochs=epochs, steps=len(run.examples))
                time.sleep(epoch_s / max(1, len(run.examples)))
            state["ran"].append([epoch, os.getpid()])
            run.end_epoch(epoch, 1.0 / epoch, {"words": len(state["table"])})
            snapshot = json.dumps(state)
            run.save_checkpoint(epoch, lambda folder, s=snapshot: (folder / "state.json").write_text(s))
        (run.output_dir / "memo.json").write_text(json.dumps(state))
        return TrainResult("memo.json", {"words": len(state["table"]), "labels": list(run.labels)})


def families() -> dict[str, type[Backend]]:
    """Return the family registry the spawned trainer imports ("tests.support.training_fakes:families")."""
    return {"memo_ner": MemoNER}


REF = "tests.support.training_fakes:families"
CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="Drug"/>
    <Label value="Person"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""


def export_tasks(
    n: int, start_id: int = 1, people: tuple[str, ...] = ("Alice", "Bruno", "Chen", "Dana")
) -> list[dict[str, Any]]:
    """Return n exported tasks: "<Person> takes <Drug> daily." with both spans annotated."""
    drugs = ["Zolvarex", "Metraquin", "Bravocel"]
    tasks = []
    for i in range(n):
        person, drug = people[i % len(people)], drugs[i % len(drugs)]
        text = f"{person} takes {drug} daily."
        d0 = text.index(drug)
        result = [
            {
                "id": f"p{i}",
                "from_name": "label",
                "to_name": "text",
                "type": "labels",
                "value": {"start": 0, "end": len(person), "text": person, "labels": ["Person"]},
            },
            {
                "id": f"d{i}",
                "from_name": "label",
                "to_name": "text",
                "type": "labels",
                "value": {"start": d0, "end": d0 + len(drug), "text": drug, "labels": ["Drug"]},
            },
        ]
        tasks.append(
            {
                "id": start_id + i,
                "data": {"text": text},
                "annotations": [
                    {
                        "id": 100 + i,
                        "result": result,
                        "was_cancelled": False,
                        "created_at": "2026-11-29T10:00:00Z",
                        "updated_at": "2026-11-29T10:00:00Z",
                    }
                ],
            }
        )
    return tasks
