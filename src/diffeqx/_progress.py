"""Progress meters for long solves.

A meter is told the fraction of `[t0, t1]` done after each step. Reports are made
from inside the compiled loop by host callbacks, and only when the fraction has grown
by a set amount, so that a meter costs little; `NoProgressMeter` costs nothing. Under
`jax.vmap` the slowest member of the batch is reported.
"""

import abc
import itertools
import sys
from typing import Any, final

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp


class AbstractProgressMeter(eqx.Module):
    """Base class for progress meters. Subclasses implement `init() -> state`,
    `step(state, progress) -> state` (with `progress` the fraction of `[t0, t1]`
    done, in `[0, 1]`) and `close(state)`."""

    @abc.abstractmethod
    def init(self) -> Any:
        """The meter's initial state."""

    @abc.abstractmethod
    def step(self, state, progress) -> Any:
        """Reports `progress` (a scalar in `[0, 1]`) if it is time to."""

    @abc.abstractmethod
    def close(self, state) -> None:
        """Finishes the report."""


@final
class NoProgressMeter(AbstractProgressMeter):
    """Reports nothing (the default); costs nothing."""

    def init(self):
        return None

    def step(self, state, progress):
        return state

    def close(self, state):
        return None


def _slowest(progress):
    # The least progress over any vmap batch, as an unbatched scalar.
    return -eqxi.unvmap_max(-jnp.asarray(progress))


class _ThresholdMeter(AbstractProgressMeter):
    """Reports through a host callback whenever progress has grown by
    `minimum_increase` since the last report."""

    minimum_increase: eqx.AbstractVar[float]

    def _open(self, meter_id) -> None:
        pass

    def _report(self, meter_id, progress) -> None:
        raise NotImplementedError

    def _finish(self, meter_id) -> None:
        pass

    def init(self):
        meter_id = next(_METER_IDS)
        jax.debug.callback(lambda: self._open(meter_id))
        return (jnp.asarray(meter_id), jnp.asarray(-jnp.inf, jnp.float32))

    def step(self, state, progress):
        meter_id, last = state
        # Inside a vmapped loop every carried value becomes batched, although these
        # are the same for every member: reduce them so that the `cond` below stays a
        # real branch and the callback runs once per report.
        meter_id = eqxi.unvmap_max(meter_id)
        last = eqxi.unvmap_max(last)
        progress = _slowest(progress).astype(jnp.float32)
        due = progress >= last + self.minimum_increase

        def report():
            jax.debug.callback(
                lambda i, p: self._report(int(i), float(p)), meter_id, progress
            )
            return progress

        last = lax.cond(due, report, lambda: last)
        return meter_id, last

    def close(self, state):
        meter_id, last = state
        # `last` comes out of the loop, so this callback cannot run before the loop's
        # own reports have been made.
        jax.debug.callback(
            lambda i, _: self._finish(int(i)),
            eqxi.unvmap_max(meter_id),
            eqxi.unvmap_max(last),
        )


_METER_IDS = itertools.count()


@final
class TextProgressMeter(_ThresholdMeter):
    """Prints the percentage of `[t0, t1]` done, each time it has grown by at least
    `minimum_increase` (a fraction; default 2%), and 100.00% at the end.

    **Example:**

    ```python
    diffeqx.diffeqsolve(..., progress_meter=diffeqx.TextProgressMeter())
    ```
    """

    minimum_increase: float = eqx.field(static=True, default=0.02)

    def _report(self, meter_id, progress):
        print(f"{100 * progress:.2f}%", file=sys.stdout, flush=True)

    def _finish(self, meter_id):
        print("100.00%", file=sys.stdout, flush=True)


_BARS: dict[int, Any] = {}


@final
class TqdmProgressMeter(_ThresholdMeter):
    """A `tqdm` progress bar over `[t0, t1]`, refreshed each time progress has grown
    by at least `minimum_increase` (default 1%). Needs the optional `tqdm`
    package."""

    minimum_increase: float = eqx.field(static=True, default=0.01)

    def __check_init__(self):
        try:
            import tqdm  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "`TqdmProgressMeter` needs the `tqdm` package: `pip install tqdm`, or "
                "use `TextProgressMeter()`."
            ) from e

    def _open(self, meter_id):
        import tqdm

        _BARS[meter_id] = tqdm.tqdm(total=100, unit="%", bar_format=_BAR_FORMAT)

    def _report(self, meter_id, progress):
        bar = _BARS.get(meter_id)
        if bar is not None:
            bar.n = round(100 * progress, 2)
            bar.refresh()

    def _finish(self, meter_id):
        bar = _BARS.pop(meter_id, None)
        if bar is not None:
            bar.n = 100
            bar.close()


_BAR_FORMAT = "{percentage:.2f}%|{bar}| [{elapsed}<{remaining}]"
