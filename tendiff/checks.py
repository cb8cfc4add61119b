"""Parameter checks with messages meant for the person who typed the value."""
from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= int(f) <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {int(f)}")
    return int(f)


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if isinstance(value, bool) or not lo <= f <= hi:  # also refuses NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return f
