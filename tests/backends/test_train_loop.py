"""The training loop every fine-tuning recipe shares: seeded epochs, resumable, one optimiser step, checkpoints."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from backends._train_loop import Optimization, amp_setup, linear_decay, train_epochs


class RecordingRun:
    """A TrainingRun's loop-facing half: where to start, and what the loop reports and saves."""

    def __init__(self, tmp: Path, start_epoch: int = 1, checkpoint: Path | None = None) -> None:
        self.start_epoch, self.checkpoint, self.tmp = start_epoch, checkpoint, tmp
        self.steps: list[tuple[int, int, float, Any, int, int]] = []
        self.epochs: list[tuple[int, float]] = []
        self.saved: list[int] = []

    def progress(
        self, epoch: int, step: int, loss: float, metrics: Any = None, *, epochs: int, steps: int
    ) -> None:
        self.steps.append((epoch, step, loss, metrics, epochs, steps))

    def end_epoch(self, epoch: int, loss: float) -> None:
        self.epochs.append((epoch, loss))

    def save_checkpoint(self, epoch: int, write: Any) -> None:
        folder = self.tmp / f"epoch-{epoch}"
        folder.mkdir(parents=True)
        write(folder)
        self.saved.append(epoch)


def test_epochs_shuffle_with_their_own_seed_so_a_resumed_epoch_sees_the_same_order(tmp_path: Path) -> None:
    def run_orders(run: RecordingRun) -> list[list[int]]:
        seen: list[list[int]] = []

        def step(chunk: list[int], rng: random.Random) -> tuple[float, None]:
            seen.append(chunk)
            return float(len(chunk)), None

        train_epochs(run, 5, 2, 3, step, lambda folder: None, seed=13)
        return seen

    full = run_orders(RecordingRun(tmp_path / "a"))
    resumed = run_orders(RecordingRun(tmp_path / "b", start_epoch=3))
    assert len(full) == 9 and [len(c) for c in full[:3]] == [2, 2, 1]
    assert sorted(i for c in full[:3] for i in c) == [0, 1, 2, 3, 4]
    assert resumed == full[6:]  # epoch 3 alone, in the order a full run gave it


def test_progress_epoch_means_and_a_checkpoint_per_epoch(tmp_path: Path) -> None:
    run = RecordingRun(tmp_path)
    losses = iter([4.0, 1.0, 2.0, 2.0])

    def step(chunk: list[int], rng: random.Random) -> tuple[float, dict[str, float]]:
        value = next(losses)
        return value, {"part": value / 2}

    train_epochs(run, 3, 2, 2, step, lambda folder: (folder / "x").write_text("ok"), seed=1)
    assert [(s[0], s[1], s[2], s[3], s[4], s[5]) for s in run.steps] == [
        (1, 1, 4.0, {"part": 2.0}, 2, 2),
        (1, 2, 1.0, {"part": 0.5}, 2, 2),
        (2, 1, 2.0, {"part": 1.0}, 2, 2),
        (2, 2, 2.0, {"part": 1.0}, 2, 2),
    ]
    assert run.epochs == [(1, 3.0), (2, 2.0)]  # batch means weighted by batch size: (4*2 + 1*1) / 3
    assert run.saved == [1, 2] and (tmp_path / "epoch-2" / "x").read_text() == "ok"


def test_an_optimisation_checkpoint_resumes_model_optimiser_and_schedule(tmp_path: Path) -> None:
    def fresh() -> tuple[torch.nn.Module, Optimization]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, Optimization(optimizer, linear_decay(optimizer, 10), *amp_setup("cpu"))

    x, y = torch.ones(4, 3), torch.zeros(4, 1)
    model, opt = fresh()
    for _ in range(2):
        opt.step(torch.nn.functional.mse_loss(model(x), y), max_norm=1.0)
    opt.writer(model)(tmp_path)
    copy, copy_opt = fresh()
    copy_opt.resume(RecordingRun(tmp_path, start_epoch=2, checkpoint=tmp_path), copy, "cpu")  # type: ignore[arg-type]
    assert torch.equal(copy.weight, model.weight)
    assert copy_opt.scheduler.last_epoch == 2 and copy_opt.optimizer.param_groups[0]["lr"] == 0.1 * 0.8
    for o in (opt, copy_opt):
        o.step(torch.nn.functional.mse_loss((model if o is opt else copy)(x), y))
    assert torch.equal(copy.weight, model.weight)  # the momentum came back too
