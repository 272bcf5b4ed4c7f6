"""Checks the args classes share in their __post_init__."""

from __future__ import annotations

import math

from lorakit.errors import UserError


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"--{name} {value!r} is not one of {', '.join(map(str, choices))}.")


def check_positive(name: str, value: float | None) -> None:
    """A finite number > 0 (NaN fails every comparison, so it is named explicitly)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"--{name} must be a positive number, got {value}.")
