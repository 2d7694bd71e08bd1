"""Events give the same answer as Diffrax: the same call through both libraries gives
the same `ts`, `ys`, `stats`, `result`, `t0`/`t1` and `event_mask`.

Covered: boolean and real-valued conditions, PyTrees of conditions with a direction
each, conditions already true (or zero) at `t0`, `steady_state_event` (also started at
equilibrium), terminating saves (`SaveAt` `t0`, `ts`, `steps`, `t1`, `subs`),
backwards time, float32/float64, `vmap` and `max_steps=None`. The first
`DEFAULT_CASES` run by default, the rest carry the `slow` marker.

Not compared: a condition that reads `t` in a backwards solve (Diffrax passes it `-t`;
a deliberate difference, listed on the migration page). With x64 enabled Diffrax
cannot root-find a float32 condition, so float32 cases have no root finder.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

diffrax = pytest.importorskip("diffrax")

import diffeqx  # noqa: E402

from ._harness import diff_outputs, observed  # noqa: E402

DEFAULT_CASES = 1


@dataclasses.dataclass(frozen=True)
class EventCase:
    cond: str = "real"  # a key of `_conditions`
    direction: Any = None
    root_finder: bool = True
    saveat: str = "t1"  # t1 | mixed | ts | steps | subs
    controller: str = "const"  # const | pid
    backwards: bool = False
    dtype: str = "float64"
    vmap: bool = False
    max_steps: int | None = 256
    y0: float = 1.0  # first component of y0 (steady: the start value)

    def __str__(self):
        fields = dataclasses.asdict(self)
        return "-".join(f"{k}={v}" for k, v in fields.items() if v != _DEFAULT[k])


_DEFAULT = dataclasses.asdict(EventCase())


def _conditions(lib, name, controller):
    """Conditions on the oscillator x = x0 cos t, v = -x0 sin t (none reads `t`)."""
    if name == "real":  # zero at pi/2 (down), 3 pi/2 (up)
        return lambda t, y, args, **kw: y[0]
    if name == "bool":  # becomes true after pi/3
        return lambda t, y, args, **kw: y[0] < 0.5
    if name == "pair":  # x falls through 0 at pi/2, x - 0.5 through 0 at pi/3
        return (
            lambda t, y, args, **kw: y[0],
            lambda t, y, args, **kw: y[0] - 0.5,
        )
    if name == "mixed":  # a boolean and a real-valued condition in a dict
        return {
            "late": lambda t, y, args, **kw: y[0] < -0.9,
            "half": lambda t, y, args, **kw: y[0] + 0.5,
        }
    if name == "bool_at_t0":
        return lambda t, y, args, **kw: y[0] > 0.5
    if name == "zero_at_t0":  # v = -sin t: zero at t0, then negative
        return lambda t, y, args, **kw: y[1]
    if name == "same_step":  # both cross inside the first step; the second earlier
        return (
            lambda t, y, args, **kw: y[0] - 0.9999,
            lambda t, y, args, **kw: y[0] - 0.99999,
        )
    if name == "steady":
        if controller == "pid":  # the controller's tolerances
            return lib.steady_state_event()
        return lib.steady_state_event(rtol=1e-6, atol=1e-8, norm=optx.rms_norm)
    raise ValueError(name)


def _saveat(lib, name, t0, t1, dtype):
    ts = jnp.asarray([t0 + f * (t1 - t0) for f in (0.0, 0.1, 0.45, 0.9)], dtype)
    if name == "t1":
        return lib.SaveAt(t1=True)
    if name == "mixed":
        return lib.SaveAt(t0=True, ts=ts, steps=True, t1=True)
    if name == "ts":
        return lib.SaveAt(ts=ts)
    if name == "steps":
        return lib.SaveAt(steps=True)
    if name == "subs":
        return lib.SaveAt(
            subs=[lib.SubSaveAt(ts=ts), lib.SubSaveAt(t0=True, steps=True, t1=True)]
        )
    raise ValueError(name)


def run(lib, case: EventCase) -> dict[str, Any]:
    """`case` through `lib` (`diffrax` or `diffeqx`): what a user observes, as NumPy."""
    dtype = jnp.float32 if case.dtype == "float32" else jnp.float64
    t0, t1 = (0.0, -8.0) if case.backwards else (0.0, 8.0)
    if case.cond == "steady":
        term = lib.ODETerm(lambda t, y, args: -4.0 * (y - 2.0))
        y0 = jnp.asarray([case.y0], dtype)
    else:
        term = lib.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]]))
        y0 = jnp.asarray([case.y0, 0.0], dtype)
    if case.controller == "pid":
        controller, dt0 = lib.PIDController(rtol=1e-6, atol=1e-8), 0.125
    else:
        controller, dt0 = lib.ConstantStepSize(), 0.125
    tol = 1e-10 if case.dtype == "float64" else 1e-5
    root_finder = optx.Newton(rtol=tol, atol=tol) if case.root_finder else None
    event = lib.Event(
        _conditions(lib, case.cond, case.controller),
        root_finder=root_finder,
        direction=case.direction,
    )

    def solve(y0):
        sol = lib.diffeqsolve(
            term,
            lib.Tsit5(),
            jnp.asarray(t0, dtype),
            jnp.asarray(t1, dtype),
            None if dt0 is None else jnp.asarray(np.copysign(dt0, t1 - t0), dtype),
            y0,
            saveat=_saveat(lib, case.saveat, t0, t1, dtype),
            stepsize_controller=controller,
            event=event,
            max_steps=case.max_steps,
            throw=False,
        )
        return dict(observed(lib, sol), event_mask=sol.event_mask)

    if case.vmap:
        scales = jnp.asarray([1.0, 0.7, 0.4], dtype)
        out = jax.vmap(solve)(scales[:, None] * y0)
    else:
        out = solve(y0)
    return jax.tree.map(np.asarray, out)


CASES = [
    # Default run: a PyTree of a boolean and a real-valued condition, a direction
    # each, and several outputs. (Conditions at t0 and the steady-state event
    # against closed forms by default: test_events.py.)
    EventCase(cond="mixed", direction={"late": None, "half": True}, saveat="subs"),
    # Slow: more combinations.
    EventCase(cond="bool_at_t0", root_finder=False, saveat="mixed"),
    EventCase(cond="zero_at_t0"),
    EventCase(cond="steady", y0=2.0, controller="pid", saveat="mixed"),
    EventCase(cond="pair", direction=(False, True), saveat="mixed"),
    EventCase(cond="real", max_steps=None, controller="pid", vmap=True),
    EventCase(cond="pair", direction=(False, False)),
    EventCase(cond="pair", direction=(True, None)),
    EventCase(cond="bool", root_finder=False, saveat="mixed", controller="pid"),
    EventCase(cond="bool_at_t0", saveat="subs"),
    EventCase(cond="zero_at_t0", direction=True, root_finder=False, saveat="steps"),
    EventCase(cond="same_step", saveat="ts"),
    EventCase(cond="real", backwards=True, saveat="mixed", vmap=True),
    EventCase(cond="bool", root_finder=False, dtype="float32", vmap=True),
    EventCase(cond="steady", saveat="steps"),
    EventCase(cond="steady", y0=2.0, controller="pid", root_finder=False),
    EventCase(cond="real", direction=True, saveat="ts", controller="pid"),
    EventCase(cond="real", direction=False, backwards=True, saveat="subs"),
    EventCase(cond="pair", direction=(True, True), vmap=True, saveat="mixed"),
    EventCase(cond="pair", direction=None, backwards=True, controller="pid"),
    EventCase(cond="mixed", direction=True, vmap=True),
    EventCase(cond="bool", root_finder=True, saveat="steps"),
    EventCase(cond="bool", root_finder=True, saveat="mixed", backwards=True),
    EventCase(cond="bool", root_finder=False, saveat="steps", backwards=True),
    EventCase(cond="bool_at_t0", root_finder=False, saveat="ts", vmap=True),
    EventCase(cond="bool_at_t0", root_finder=False, dtype="float32"),
    EventCase(cond="zero_at_t0", direction=False, saveat="mixed"),
    EventCase(cond="zero_at_t0", root_finder=False, dtype="float32", vmap=True),
    EventCase(cond="real", root_finder=False, dtype="float32", saveat="subs"),
    EventCase(cond="pair", root_finder=False, direction=(False, True), dtype="float32"),
    EventCase(cond="real", max_steps=None, saveat="ts"),
    EventCase(cond="bool", root_finder=False, max_steps=None, saveat="t1"),
    EventCase(cond="same_step", root_finder=False, saveat="mixed"),
    # A root finder given for a boolean condition, with saves at times: as one
    # kernel on CPU this once aborted the process (tests/test_one_kernel.py).
    EventCase(cond="bool", direction=False, saveat="ts", controller="pid"),
]


def _param(index, case):
    marks = () if index < DEFAULT_CASES else (pytest.mark.slow,)
    return pytest.param(case, id=str(case) or "default", marks=marks)


@pytest.mark.parametrize("case", [_param(i, c) for i, c in enumerate(CASES)])
def test_event_same_answer_as_diffrax(case):
    expected = run(diffrax, case)
    # Only informative if the event fires (in some member of a batch).
    assert expected["result"].reshape(-1, 4)[:, 3].any()
    problems = diff_outputs(expected, run(diffeqx, case), case.dtype)
    assert not problems, f"{case}\n" + "\n".join(problems)


def test_steps_saved_once_when_a_root_found_event_does_not_fire():
    """docs/migration.md: with `SaveAt(steps=True)` and a real-valued condition that
    never crosses zero (so the root finder is never used), Diffrax saves the last
    step a second time; diffeqx saves each step once, and otherwise the same."""

    def run(lib):
        event = lib.Event(
            lambda t, y, args, **kw: y[0] + 1.0, root_finder=optx.Newton(1e-8, 1e-8)
        )
        sol = lib.diffeqsolve(
            lib.ODETerm(lambda t, y, args: -y), lib.Tsit5(), 0.0, 5.0, 0.1,
            jnp.array([1.0]), saveat=lib.SaveAt(steps=True), event=event,
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
            max_steps=64,
        )  # fmt: skip
        assert sol.result == lib.RESULTS.successful
        return int(sol.stats["num_steps"]), np.asarray(sol.ts), np.asarray(sol.ys)

    steps, theirs_ts, theirs_ys = run(diffrax)
    ours_steps, ours_ts, ours_ys = run(diffeqx)
    assert ours_steps == steps == 14
    assert np.isfinite(ours_ts).sum() == steps
    assert np.isfinite(theirs_ts).sum() == steps + 1
    assert theirs_ts[steps] == theirs_ts[steps - 1] == 5.0
    np.testing.assert_array_equal(theirs_ys[steps], theirs_ys[steps - 1])
    # (The step sizes follow the last digits of the error estimate: see "Values to
    # the last digits" on the migration page.)
    np.testing.assert_allclose(ours_ts[:steps], theirs_ts[:steps], rtol=1e-9)
    np.testing.assert_allclose(ours_ys[:steps], theirs_ys[:steps], rtol=1e-9)
