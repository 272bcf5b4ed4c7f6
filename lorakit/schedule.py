"""Learning-rate schedules as pure functions of the step: linear warm-up, then cosine/linear/constant."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, *, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Warm-up length in optimizer steps: --warmup_steps wins over --warmup_ratio."""
    if warmup_steps > 0:
        return min(warmup_steps, total_steps)
    return min(math.ceil(warmup_ratio * total_steps), total_steps)


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up rises linearly from 1/(warmup+1) to 1 so the first step already moves; after it,
    cosine falls to 0 at `total_steps`, linear falls to 0, constant stays at 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")
