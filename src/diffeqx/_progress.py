"""Progress meters for long solves.

A meter is told the fraction of `[t0, t1]` done after each step. Reports are made
from inside the compiled loop by host callbacks, and only when due, so that a meter
costs little; `NoProgressMeter` costs nothing. Under `jax.vmap` one report is made for
the whole batch, showing its slowest member.

Each open meter lives in a host-side registry from `init` to `close`. Reports for a
meter that is not open are dropped: this is what keeps the backward pass of
`jax.grad` (which recomputes the solve's steps) from reporting again.
"""

import abc
import threading
from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback


class AbstractProgressMeter(eqx.Module):
    """Base class for progress meters. Subclasses implement `init() -> state`,
    `step(state, progress) -> state` (with `progress` the fraction of `[t0, t1]`
    done, in `[0, 1]`; called after every step) and `close(state)`."""

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


class _Registry:
    """The meters open on the host, by id."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next_id = 0
        self._open: dict[int, Any] = {}

    def open(self, make: Callable[[], Any]) -> np.ndarray:
        with self._lock:
            self._next_id += 1
            self._open[self._next_id] = make()
            return np.asarray(self._next_id, dtype=np.int32)

    def get(self, meter_id) -> Any:
        with self._lock:
            return self._open.get(int(np.max(meter_id)))

    def pop(self, meter_id) -> Any:
        with self._lock:
            return self._open.pop(int(np.max(meter_id)), None)


_METERS = _Registry()


def _open_meter(make: Callable[[], Any]):
    """Opens a meter on the host (from inside the program); returns its id. Later
    callbacks take the id as an argument, so they cannot run before this one."""
    meter_id = io_callback(
        lambda: _METERS.open(make), jax.ShapeDtypeStruct((), jnp.int32)
    )
    return meter_id


def _report(show: Callable[[Any, float], None], meter_id, progress) -> None:
    """Shows `progress` on the meter, if it is still open. Under `vmap`: once, with
    the slowest member's progress."""

    def callback(i, p):
        handle = _METERS.get(i)
        if handle is not None:
            show(handle, float(np.min(p)))

    # The progress is shown, never differentiated (a loop differentiating the step
    # may carry tangents to it).
    progress = lax.stop_gradient(progress)
    jax.debug.callback(callback, eqxi.unvmap_max(meter_id), -eqxi.unvmap_max(-progress))


def _close(finish: Callable[[Any], None], meter_id, after) -> None:
    """Closes the meter. `after` is a value the loop computed last: taking it as an
    argument keeps this callback from running before the loop's reports (the id
    alone is loop-invariant, so the compiler may hoist it out of the loop)."""

    def callback(i, _):
        handle = _METERS.pop(i)
        if handle is not None:
            finish(handle)

    after = lax.stop_gradient(jnp.asarray(after))
    jax.debug.callback(callback, eqxi.unvmap_max(meter_id), eqxi.unvmap_max(after))


class _TextState(eqx.Module):
    meter_id: Any
    progress: Any  # per batch member: the progress when last reported


class _Printed:
    """Host side of a text meter: the last progress printed."""

    def __init__(self):
        print("0.00%", flush=True)
        self.progress = 0.0

    def show(self, progress: float) -> None:
        self.progress = progress
        print(f"{100 * progress:.2f}%", flush=True)

    def finish(self) -> None:
        if self.progress != 1:
            print("100.00%", flush=True)


@final
class TextProgressMeter(AbstractProgressMeter):
    """Prints the percentage of `[t0, t1]` done: `0.00%` at the start, a line each
    time progress has grown by more than `minimum_increase` (a fraction; default
    `0.02`) and `100.00%` at the end, as Diffrax's does. Under `jax.vmap` a line is
    printed when every member has progressed by that much, showing the slowest.

    **Example:**

    ```python
    diffeqx.diffeqsolve(..., progress_meter=diffeqx.TextProgressMeter())
    ```
    """

    minimum_increase: Any = 0.02

    def init(self):
        return _TextState(meter_id=_open_meter(_Printed), progress=jnp.asarray(0.0))

    def step(self, state, progress):
        progress = jnp.asarray(progress)
        last = state.progress.astype(progress.dtype)
        increase = jnp.asarray(self.minimum_increase, dtype=progress.dtype)
        due = eqxi.unvmap_all((progress - last > increase) | (progress == 1))

        def report():
            _report(_Printed.show, state.meter_id, progress)

        lax.cond(due, report, lambda: None)
        new_progress = jnp.where(
            due, progress.astype(state.progress.dtype), state.progress
        )
        return _TextState(meter_id=state.meter_id, progress=new_progress)

    def close(self, state):
        _close(_Printed.finish, state.meter_id, state.progress)


class _TqdmState(eqx.Module):
    meter_id: Any
    step: Any  # steps taken so far


class _MissingTqdmError(ImportError, ValueError):
    """`tqdm` is not installed. (Also a `ValueError`, which is what Diffrax raises.)"""


_BAR_FORMAT = "{percentage:.2f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _new_bar():
    import tqdm

    return tqdm.tqdm(total=100, unit="%", bar_format=_BAR_FORMAT)


def _show_bar(bar, progress: float) -> None:
    bar.n = round(100 * progress, 2)
    bar.refresh()


def _finish_bar(bar) -> None:
    bar.n = 100.0
    bar.close()  # which draws the bar a last time


@final
class TqdmProgressMeter(AbstractProgressMeter):
    """A `tqdm` progress bar over `[t0, t1]`, updated every `refresh_steps` steps
    (default 20; an update is a host callback, so fewer cost less) and completed at
    the end. Under `jax.vmap` it shows the slowest member. Needs the optional `tqdm`
    package.
    """

    refresh_steps: int = eqx.field(static=True, default=20)

    def __check_init__(self):
        try:
            import tqdm  # noqa: F401
        except ImportError as e:
            raise _MissingTqdmError(
                "`TqdmProgressMeter` needs the `tqdm` package: `pip install tqdm`, or "
                "use `TextProgressMeter()`."
            ) from e
        if not isinstance(self.refresh_steps, int) or self.refresh_steps < 1:
            raise ValueError(
                "`TqdmProgressMeter(refresh_steps=...)` must be a positive int, got "
                f"{self.refresh_steps!r}."
            )

    def init(self):
        return _TqdmState(meter_id=_open_meter(_new_bar), step=jnp.asarray(0))

    def step(self, state, progress):
        progress = jnp.asarray(progress)
        due = eqxi.unvmap_max(state.step) % self.refresh_steps == 0

        def report():
            _report(_show_bar, state.meter_id, progress)

        lax.cond(due, report, lambda: None)
        return _TqdmState(meter_id=state.meter_id, step=state.step + 1)

    def close(self, state):
        _close(_finish_bar, state.meter_id, state.step)
