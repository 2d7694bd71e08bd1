"""Progress meters for long solves."""

from typing import final

import equinox as eqx


class AbstractProgressMeter(eqx.Module):
    """Base class for progress meters, which report the fraction of `[t0, t1]` done."""


@final
class NoProgressMeter(AbstractProgressMeter):
    """Reports nothing (the default); costs nothing."""
