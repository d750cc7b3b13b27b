"""The loop the fine-tuning recipes share: seeded shuffled epochs, one optimiser step under mixed precision, checkpoints.

Every recipe (torchvision detection and classification, transformers NER, spaCy NER) trains the same
way: each epoch shuffles the examples with a seed of its own (a resumed epoch sees the same order),
runs batches in that order, reports each step and the epoch's mean loss to the run (which raises
TrainCancelled to stop), and saves a checkpoint a killed trainer resumes from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.contract import TrainingRun

# One batch: the example indices it trains on and the epoch's random source (augmentations draw from
# it after the shuffle) -> (the batch's mean loss, its named parts for the progress report, or None).
Step = Callable[[list[int], random.Random], tuple[float, Mapping[str, float] | None]]


def train_epochs(
    run: TrainingRun,
    n_items: int,
    batch_size: int,
    epochs: int,
    step: Step,
    save: Callable[[Path], None],
    *,
    seed: int,
    begin_epoch: Callable[[], None] | None = None,
) -> None:
    """Run epochs run.start_epoch..epochs over n_items in batches; report progress and checkpoint each epoch."""
    steps = (n_items + batch_size - 1) // batch_size
    for epoch in range(run.start_epoch, epochs + 1):
        if begin_epoch is not None:
            begin_epoch()
        rng = random.Random(seed + epoch)
        order = list(range(n_items))
        rng.shuffle(order)
        total, count = 0.0, 0
        for k, first in enumerate(range(0, n_items, batch_size), start=1):
            chunk = order[first : first + batch_size]
            value, parts = step(chunk, rng)
            total, count = total + value * len(chunk), count + len(chunk)
            run.progress(epoch, k, value, parts, epochs=epochs, steps=steps)
        run.end_epoch(epoch, total / max(1, count))
        run.save_checkpoint(epoch, save)


def linear_decay(optimizer: Any, total_steps: int) -> Any:
    """Return a scheduler that decays the learning rate linearly to zero over total_steps."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total_steps)))


def amp_setup(device: str, prefer_bf16: bool = False) -> tuple[bool, Any, Any]:
    """Return (autocast on, its dtype, a GradScaler): mixed precision on CUDA, plain fp32 elsewhere.

    fp16 by default; bf16 where asked and supported (no loss scaling needed: the scaler is off).
    """
    import torch

    amp = device.startswith("cuda")
    dtype = torch.bfloat16 if prefer_bf16 and amp and torch.cuda.is_bf16_supported() else torch.float16
    return amp, dtype, torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)


def save_state(model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> Callable[[Path], None]:
    """Return a checkpoint writer of everything a resumed epoch needs (state.pt)."""
    import torch

    def write(folder: Path) -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
            },
            folder / "state.pt",
        )

    return write


def load_state(folder: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, device: str) -> None:
    """Restore a checkpoint written by save_state()."""
    import torch

    state = torch.load(folder / "state.pt", map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])


@dataclass
class Optimization:
    """An optimiser with its schedule and mixed-precision set-up: one step, its autocast, its checkpoint."""

    optimizer: Any
    scheduler: Any
    amp: bool
    amp_dtype: Any
    scaler: Any

    def autocast(self) -> Any:
        """Return the forward pass's autocast context (off on CPU)."""
        import torch

        return torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp)

    def step(self, loss: Any, max_norm: float | None = None) -> None:
        """Back-propagate a loss and step the optimiser and schedule (gradients clipped to max_norm if given)."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if max_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def resume(self, run: TrainingRun, model: Any, device: str) -> None:
        """Restore the model and this optimisation from the run's checkpoint, when it has one."""
        if run.checkpoint is not None:
            load_state(run.checkpoint, model, self.optimizer, self.scheduler, self.scaler, device)

    def writer(self, model: Any) -> Callable[[Path], None]:
        """Return the checkpoint writer of the model and this optimisation."""
        return save_state(model, self.optimizer, self.scheduler, self.scaler)
