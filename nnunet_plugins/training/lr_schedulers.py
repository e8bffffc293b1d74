"""Learning-rate schedules beyond nnU-Net's ``PolyLRScheduler``.

:class:`WarmupPolyLRScheduler`: TransDoDNet's schedule (official ``TransDoD/train.py``
``adjust_learning_rate``): linear warm-up from ``start_factor`` x the learning rate, then poly 0.9 of
the absolute step; stepped once per epoch like nnU-Net's poly schedule. :func:`warmup_epochs_for`
scales the official 10 warm-up epochs down for shortened runs.

:class:`IterationStepLRScheduler`: the step schedule of the MC-Net / LeFeD code bases (``lr x 0.1`` every
2500 iterations), stepped once per epoch like nnU-Net's schedules.
"""
from __future__ import annotations

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

__all__ = ["IterationStepLRScheduler", "OFFICIAL_WARMUP_EPOCHS", "OFFICIAL_WARMUP_START_FACTOR", "warmup_epochs_for", "WarmupPolyLRScheduler"]

OFFICIAL_WARMUP_EPOCHS = 10
OFFICIAL_WARMUP_START_FACTOR = 0.01


def warmup_epochs_for(num_epochs: int, official: int = OFFICIAL_WARMUP_EPOCHS) -> int:
    """Warm-up epochs of a run of ``num_epochs``: the official 10, at most a tenth of the run."""
    return int(min(official, max(0, int(num_epochs)) // 10))


class WarmupPolyLRScheduler(PolyLRScheduler):
    """TransDoDNet's schedule (official ``adjust_learning_rate``), stepped per epoch like nnU-Net's poly:

    ``lr(e) = initial_lr * (start_factor + (1 - start_factor) * e / warmup_steps)`` for ``e < warmup_steps``,
    ``lr(e) = initial_lr * (1 - e / max_steps) ** exponent`` afterwards (poly of the absolute step, as the
    official code: the warm-up does not shift the poly curve).
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9,
                 start_factor: float = OFFICIAL_WARMUP_START_FACTOR, current_step: int | None = None):
        if warmup_steps < 0 or (warmup_steps > 0 and warmup_steps >= max_steps):
            raise ValueError(f"warm-up of {warmup_steps} steps does not fit a schedule of {max_steps} steps")
        self.warmup_steps, self.start_factor = int(warmup_steps), float(start_factor)
        super().__init__(optimizer, initial_lr, max_steps, exponent, current_step)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps)
        return self.initial_lr * (1 - step / self.max_steps) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class IterationStepLRScheduler(PolyLRScheduler):
    """``lr = initial_lr * gamma ** floor(iteration / decay_every)`` where ``iteration = epoch *
    iterations_per_epoch`` (the iteration at the start of the epoch; nnU-Net steps its scheduler once per
    epoch). LeFeD's official schedule: ``initial_lr=0.01, decay_every=2500, gamma=0.1``."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, iterations_per_epoch: int,
                 decay_every: int = 2500, gamma: float = 0.1, current_step: int | None = None):
        if iterations_per_epoch < 1 or decay_every < 1:
            raise ValueError(f"iterations_per_epoch and decay_every must be positive, got {iterations_per_epoch}, "
                             f"{decay_every}")
        self.iterations_per_epoch, self.decay_every, self.gamma = int(iterations_per_epoch), int(decay_every), gamma
        super().__init__(optimizer, initial_lr, max_steps, 0.9, current_step)

    def lr_at(self, step: int) -> float:
        return self.initial_lr * self.gamma ** ((int(step) * self.iterations_per_epoch) // self.decay_every)

    step = WarmupPolyLRScheduler.step
