"""The allowed ranges of the numeric options of training and evaluation, checked where they enter.

The option dataclasses (``TokenizerTrainConfig``, ``GeneratorTrainConfig``, ``EvalConfig``) and
``train_classifier`` check their values on construction, so the command line and library callers
are refused alike, with an ``InputError`` naming the option, before any file is written: a
``--steps -3`` used to save an untrained model with exit code 0, and ``--steps 0`` a default-length run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imagefolder.errors import InputError


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; every number must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False  # None is allowed (the option is unset)
    length: int | None = None  # the value is a tuple of this many numbers, each in the range

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            low, high = "(" if self.low_open else "[", ")" if self.high_open else "]"
            kind = f"{kind.replace('finite ', '')} in {low}{_number(self.low)}, {_number(self.high)}{high}"
        elif self.low is not None:
            kind = f"{kind} {'>' if self.low_open else '≥'} {_number(self.low)}"
        return kind if self.length is None else f"{self.length} numbers, each {kind}"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        value = float(value)
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def check(self, name: str, value: Any) -> None:
        """Raise ``InputError`` naming ``name`` unless ``value`` lies in the range."""
        if value is None and self.optional:
            return
        if self.length is None:
            ok = self.contains(value)
        else:
            ok = isinstance(value, tuple | list) and len(value) == self.length and all(map(self.contains, value))
        if not ok:
            raise InputError(f"{name} must be {self.describe()}, got {value!r}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


COUNT = Range(low=1, integer=True)  # steps, batch sizes, image counts, logging and saving intervals
STEPS_OR_NONE = Range(low=1, integer=True, optional=True)  # --stop-at
START_STEP = Range(low=0, integer=True)  # warm-up lengths, the step a loss starts at
POSITIVE = Range(low=0, low_open=True)  # learning rates, gradient clipping
WEIGHT = Range(low=0)  # loss weights, weight decay, guidance
DECAY = Range(low=0, high=1, high_open=True)  # EMA decay
BETAS = Range(low=0, high=1, high_open=True, length=2)  # Adam's (β1, β2)
FRACTION = Range(low=0, high=1)  # the final fraction of the learning rate
NUCLEUS = Range(low=0, high=1, low_open=True)  # top-p
SEED = Range(low=0, high=2**32, high_open=True, integer=True)  # numpy seeds are 32-bit


def check_options(values: Mapping[str, Any], ranges: Mapping[str, Range]) -> None:
    """Check each named value against its range (``vars(options)`` of a dataclass, or a dict of arguments).

    Raises:
        InputError: the first value out of its range, naming the option.
    """
    for name, allowed in ranges.items():
        allowed.check(name, values[name])
