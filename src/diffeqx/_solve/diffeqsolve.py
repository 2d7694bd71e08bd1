"""`diffeqsolve`: check the arguments, set up the loop, run it through the adjoint,
and build the `Solution`. Each phase is a named function; this module holds the
public entry point and the phases that need the whole problem."""

import dataclasses
import threading
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._adjoint.base import AbstractAdjoint, AbstractCustomGradientAdjoint
from .._adjoint.checkpoint import RecursiveCheckpointAdjoint
from .._brownian.base import brownian_paths
from .._brownian.tree import VirtualBrownianTree
from .._controller.base import AbstractStepSizeController
from .._controller.clip import unwrap_controller
from .._controller.constant import ConstantStepSize, StepTo
from .._eager import call_compiled
from .._event import Event
from .._profile import scope
from .._progress import AbstractProgressMeter, NoProgressMeter
from .._root_finder import resolve_root_finder_tols
from .._saveat import SaveAt, is_subsaveat
from .._solution import Solution, is_event, is_okay, succeeded, where_result
from .._solver.base import AbstractSolver
from .._solver.sde import resolve_deprecated_tuple_terms
from .._transforms import batch_is_empty, batched_leaf, is_staged
from . import checks, kernel
from .event import locate_event
from .fixed import fixed_step_plan, requested_writes, run_fixed_steps
from .loop import run_loop, tree_where
from .save import after_loop_while_loop, save_in_step
from .setup import initial_state, promote_inputs
from .solution import assemble_solution, raise_if_failed


def diffeqsolve(
    terms: PyTree,
    solver: AbstractSolver,
    t0,
    t1,
    dt0,
    y0: PyTree,
    args: PyTree = None,
    *,
    saveat: SaveAt = SaveAt(t1=True),
    stepsize_controller: AbstractStepSizeController = ConstantStepSize(),
    adjoint: AbstractAdjoint = RecursiveCheckpointAdjoint(),
    event: Any = None,
    max_steps: int | None = 4096,
    throw: bool = True,
    progress_meter: AbstractProgressMeter = NoProgressMeter(),
    solver_state: PyTree = None,
    controller_state: PyTree = None,
    made_jump: Any = None,
    discrete_terminating_event: Any = None,
) -> Solution:
    """Solves a differential equation from `t0` to `t1`.

    Called outside `jax.jit`, the solve is compiled as one program and kept: a later
    call that differs only in the values of its arrays (and, for adaptive steps, of
    `t0`, `t1`, `dt0`) reuses it (see the Performance page). Inside a function being
    traced, it is traced as a nested `jax.jit`, as Diffrax's is: when that function
    is traced again with the solve's inputs unchanged (the same functions, Python
    values, shapes and dtypes, under the same transformations), the solve is not.

    **Arguments:**

    - `terms`: the equation, as a PyTree of terms matching `solver.term_structure`
      (e.g. `ODETerm(f)` for `dy/dt = f(t, y, args)`).
    - `solver`: the solver instance, e.g. `Tsit5()`.
    - `t0`, `t1`: start and end times. `t1 < t0` integrates backwards in time;
      `t0 == t1` returns `y0`.
    - `dt0`: the first step size (same sign as `t1 - t0`). With an adaptive
      controller it may be `None`: as in Diffrax, the first step is then 0.01 and
      the controller adapts from there.
    - `y0`: the initial state: any PyTree of arrays (possibly empty). Integer and
      boolean leaves are promoted to floating point, as in Diffrax.
    - `args`: any PyTree passed to the vector field.
    - `saveat`: what to save (`SaveAt`); by default the state at `t1`.
    - `stepsize_controller`: `ConstantStepSize()` (default), `PIDController(...)`,
      `StepTo(ts)` or `ClipStepSizeController(...)`.
    - `adjoint`: how to differentiate; `RecursiveCheckpointAdjoint()` by default.
    - `event`: an `Event`: stop the solve when a condition is met (or record each
      time it is met, with `Event(..., terminate=False)`).
    - `max_steps`: the most steps to take (accepted or rejected). `None` for no
      bound; reverse-mode differentiation, `SaveAt(steps=...)` and
      `SaveAt(dense=True)` then need a bound elsewhere (they say which).
    - `throw`: raise a runtime error if the solve fails (when any field of the
      `Solution` is used). With `throw=False` the failure is reported in
      `Solution.result`, everything saved before it is kept, the `t1` output holds
      the time and state where the solve stopped, and unfilled outputs are `inf`.
    - `progress_meter`: reports progress; `NoProgressMeter()` by default.
    - `solver_state`, `controller_state`, `made_jump`: resume from a previous solve's
      final states (save them with `SaveAt(solver_state=True, ...)`).
    - `discrete_terminating_event`: deprecated, as in Diffrax (use `event`); accepted
      with a `UserWarning`.

    **Returns:** a `Solution`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import diffeqx

    term = diffeqx.ODETerm(lambda t, y, args: -args * y)
    sol = diffeqx.diffeqsolve(
        term, diffeqx.Tsit5(), t0=0.0, t1=1.0, dt0=0.1, y0=jnp.array([1.0, 2.0]),
        args=0.5, saveat=diffeqx.SaveAt(ts=jnp.linspace(0, 1, 5)),
        stepsize_controller=diffeqx.PIDController(rtol=1e-6, atol=1e-8),
    )
    ```
    """
    event = checks.resolve_deprecated_event(event, discrete_terminating_event)
    terms = resolve_deprecated_tuple_terms(terms, solver)
    solver = resolve_root_finder_tols(solver, stepsize_controller)
    problem = dict(
        terms=terms,
        solver=solver,
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=stepsize_controller,
        event=event,
        max_steps=max_steps,
        progress_meter=progress_meter,
        solver_state=solver_state,
        controller_state=controller_state,
        made_jump=made_jump,
    )
    subs = _check_arguments(adjoint=adjoint, **problem)
    if batch_is_empty():
        # Under a `jax.vmap` over no members there is nothing to solve (and the
        # checks that raise a failed solve's error cannot be compiled for no
        # members): the solution's structure, its arrays zeros.
        return _for_no_members(lambda: _solve(problem, subs, adjoint, throw))
    staged = is_staged()
    if not (staged and getattr(_tracing, "inside", False)):
        # Called eagerly (outside `jax.jit`; possibly under an eager `jax.vmap` or
        # `jax.grad`): the arguments have been checked with their values; the solve
        # is compiled as one program, cached (see `_solve_eagerly`). Traced: as a
        # nested `jax.jit`, whose trace is reused when the enclosing function is
        # traced again. (A solve made while such a trace is made, e.g. an adjoint's
        # own, is traced inline: its key would hold functions made for that trace.)
        solution = _eager_call(problem, adjoint, throw, staged)
        if solution is not None:
            return solution
    return _solve(problem, subs, adjoint, throw)


def _for_no_members(solve) -> Solution:
    """What `solve()` returns, its arrays zeros of the same shapes and dtypes (weak
    types kept), without compiling it."""
    return jtu.tree_map(_zeros_like_shape, eqx.filter_eval_shape(solve))


def _zeros_like_shape(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
        return x
    if x.weak_type:
        # A Python zero of the dtype's kind makes a weakly typed array (of the
        # default dtype of that kind, which a weak type always has).
        zero = {"i": 0, "u": 0, "f": 0.0, "c": 0j}.get(np.dtype(x.dtype).kind)
        if zero is not None:
            weak = jax.lax.full(x.shape, zero)
            if weak.dtype == x.dtype:
                return weak
    return jnp.zeros(x.shape, x.dtype)


def _solve(
    problem: dict, subs: list, adjoint, throw: bool, given_times=None, writes=None
) -> Solution:
    """`diffeqsolve` once its arguments are checked. `given_times`: what is known
    at trace time about `t0`, `t1`, `dt0` (by default the arguments themselves);
    `writes`: for constant steps, `fixed.requested_writes` of the requested times
    as they were given, when they are no longer known here."""
    terms, solver, t0, t1, dt0, y0, args = (
        problem[k] for k in ("terms", "solver", "t0", "t1", "dt0", "y0", "args")
    )
    saveat, stepsize_controller, event = (
        problem[k] for k in ("saveat", "stepsize_controller", "event")
    )
    max_steps, progress_meter = problem["max_steps"], problem["progress_meter"]
    controller_state, made_jump = problem["controller_state"], problem["made_jump"]
    # A solve on a Brownian tree under `jax.vmap`, which maps one of its arguments
    # (as given, before any is converted): run member by member below.
    member_by_member = (
        kernel.possible_per_member()
        and any(isinstance(p, VirtualBrownianTree) for p in brownian_paths(terms))
        and batched_leaf(problem) is not None
    )
    problem = dict(problem)
    checks.warn_deprecated_event(event)
    if given_times is None:
        # The values as given: under `jax.jit` even a constant becomes a tracer once
        # converted, and the fixed-step plan needs to read them at trace time.
        given_times = (t0, t1, dt0)
    with scope("setup"):
        t0, t1, dt0, y0 = promote_inputs(t0, t1, dt0, y0, subs)
        problem.update(t0=t0, t1=t1, dt0=dt0, y0=y0)
        checks.check_step_protocol(terms, solver, stepsize_controller, t0, t1, y0, args)
    if isinstance(adjoint, AbstractCustomGradientAdjoint):
        # The adjoint wraps a whole solve in its own derivative rule.
        with scope("adjoint"):
            return adjoint.custom_solve(diffeqsolve, dict(problem, throw=throw))
    fixed = None
    if event is None and isinstance(progress_meter, NoProgressMeter):
        fixed = fixed_step_plan(
            stepsize_controller,
            saveat,
            subs,
            adjoint,
            *given_times,
            max_steps,
            t0.dtype,
            # A resumed controller, or a `made_jump` for the first step (which the
            # fixed-length scan does not carry), take the general loop.
            controller_state is not None
            or (made_jump is not None and made_jump is not False),
            writes,
        )
    statics = dict(
        subs=subs,
        times_are_numbers=all(isinstance(t, (int, float)) for t in given_times[:2]),
        forwards=_known_forwards(*given_times[:2]),
        seeded=fixed is None,
    )

    def setup_and_loop(problem):
        with scope("setup"):
            spec, init_state = initial_state(**statics, **problem)
        with scope("adjoint"):
            final = None
            if fixed is not None:
                # Constant steps known at trace time: a fixed-length scan (None
                # where it finds, once the step is traced, that it would keep
                # more than it may for requested times under reverse mode).
                final = run_fixed_steps(spec, init_state, *fixed)
            if final is None:
                final = _run_adjoint_loop(spec, init_state, adjoint)
        return spec, final

    one_kernel = (
        # A small adaptive solve, its setup and loop as one compiled kernel (on
        # CPU, see `kernel.py`). Not with constant steps: their step times are
        # computed from constants that XLA folds, as in Diffrax's program, to the
        # last bit, which the call's barrier against folding would change.
        fixed is None
        and isinstance(progress_meter, NoProgressMeter)
        and not isinstance(
            unwrap_controller(stepsize_controller), (ConstantStepSize, StepTo)
        )
    )

    def finish(spec, final, t0, t1, y0):
        # After the loop: a terminating event located, the solution's arrays, and
        # whether the solve failed.
        if event is not None and event.terminate:
            with scope("events"):
                final = _finish_terminal_event(spec, final)
        with scope("progress"):
            progress_meter.close(final.progress_state)
        with scope("solution"):
            solution = assemble_solution(
                spec, saveat, final, t0, t1, y0, max_steps, event
            )
        return solution, ~is_okay(final.result)

    def solve_all(problem):
        # The whole solve, for one that runs as one kernel: what follows the loop,
        # computed after it, would be kernels of its own (the saves filled at `t1`,
        # the rejected steps' count, the flag, the event's location). The arrays
        # it reads come in through `problem`, not from the enclosing trace: every
        # input of the kernel is used in it (see `kernel.py`).
        spec, final = setup_and_loop(problem)
        return finish(spec, final, *(problem[k] for k in ("t0", "t1", "y0")))

    def raising(solution_and_failed):
        solution, failed = solution_and_failed
        return raise_if_failed(solution, failed) if throw else solution

    # Where the batch's members run one after another, a terminating event is
    # located after their kernels.
    whole = event is None or not event.terminate
    out = None
    if one_kernel and kernel.possible():
        # A terminating event is located in the kernel too, unless that takes
        # what the kernel cannot compile (a root finder's linear solve by a
        # factorisation, say): then after it, the loop still one kernel.
        loop_alone = []

        def without_the_event():
            loop_alone.append(True)
            return kernel.call(setup_and_loop, problem)

        out = kernel.call(
            solve_all, problem, otherwise=None if whole else without_the_event
        )
        if not loop_alone:
            return raising(out)
    elif one_kernel and member_by_member:
        # Each member's solve as one kernel, the members one after another (on
        # CPU, see `kernel.call_per_member`): at each step the batched loop would
        # walk every member's tree query to the deepest member's depth (measured
        # on 2 CPU cores, adaptive SPaRK on 64 paths: 0.67x-0.81x the run time
        # and 0.6x-0.7x the compile time of the batched loop).
        out = kernel.call_per_member(
            solve_all if whole else setup_and_loop,
            problem,
            precheck=lambda: terms.vf(problem["t0"], problem["y0"], problem["args"]),
        )
        if whole and out is not None:
            return raising(out)
    spec, final = setup_and_loop(problem) if out is None else out
    return raising(finish(spec, final, t0, t1, y0))


def initial_solver_and_controller_state(**problem):
    """The solver and controller states a solve of `problem` (`diffeqsolve`'s
    arguments, without `adjoint` and `throw`) starts from, without its loop: for a
    caller that passes them on (`solver_state=`, `controller_state=`) to a series of
    solves and needs the first one's before it runs (`BacksolveAdjoint`'s backward
    segments, carried through a `lax.scan`)."""
    problem = dict(
        dict(
            event=None,
            max_steps=4096,
            progress_meter=NoProgressMeter(),
            solver_state=None,
            controller_state=None,
            made_jump=None,
        ),
        **problem,
    )
    problem["solver"] = resolve_root_finder_tols(
        problem["solver"], problem["stepsize_controller"]
    )
    subs = _subsaveats(problem["saveat"])
    t0, t1, dt0, y0 = promote_inputs(
        problem["t0"], problem["t1"], problem["dt0"], problem["y0"], subs
    )
    problem.update(t0=t0, t1=t1, dt0=dt0, y0=y0)
    _, state = initial_state(subs=subs, **problem)
    return state.solver_state, state.controller_state


# ---- eager calls -----------------------------------------------------------------
#
# Outside `jax.jit`, JAX would run a solve op by op: every operation of the setup a
# small program of its own, and the loop, traced anew on each call, compiled again on
# each call and kept in JAX's caches (measured on CPU, a 10-step Tsit5 solve: 1.4 s
# for the first call, 0.5 s for each repeated one, and about 100 memory mappings of
# compiled code kept per call, until the process reaches the operating system's
# limit on them). So an eager call compiles the whole solve as one program, cached
# (as `equinox.filter_jit` caches: by the functions, the solver's and controller's
# settings and other Python values, and the shapes and dtypes of the arrays) and
# keyed also by the transformations applied to the call (`_eager.call_compiled`).
#
# The times stay values the program computes with (not constants, which XLA would
# fold into the arithmetic, rounding differently from the same solve under `jax.jit`
# with the times passed as arrays), so that a new `t1` reuses the program; what the
# solve reads from them at trace time (the constant-step plan, the direction,
# whether they are Python numbers) is part of the key. Except for Python numbers in
# a constant-step solve, whose program is compiled per value anyway: those are
# compiled in as constants, as Diffrax compiles them (`_ConstantStepTime`).

_TIMES = ("t0", "t1", "dt0")


class _KnownTime:
    """A time argument's value, known at the call (a Python number or a concrete
    scalar array), as `_solve` reads it at trace time. Keyed by its bytes, dtype and
    kind: `0.0` and `-0.0`, `float32` and `float64`, `1.0` and `jnp.array(1.0)` are
    different keys."""

    __slots__ = ("bytes", "dtype", "number")

    def __init__(self, x):
        value = np.asarray(x)
        self.bytes, self.dtype = value.tobytes(), value.dtype
        self.number = isinstance(x, (int, float))

    def _key(self):
        return (self.bytes, self.dtype.str, self.number)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _KnownTime) and self._key() == other._key()

    def __array__(self, dtype=None, copy=None):
        value = np.frombuffer(self.bytes, self.dtype).reshape(())
        return value if dtype is None else value.astype(dtype)

    def given(self):
        """As given: the Python number, or a NumPy scalar array."""
        value = np.asarray(self)
        return value.item() if self.number else value


class _StaticTime(_KnownTime):
    """A time argument that is not a tracer, in the key of a nested trace, keeping
    the object itself (a Python number, or a concrete array with its weak type)."""

    __slots__ = ("value", "weak")

    def __init__(self, x):
        super().__init__(x)
        self.value, self.weak = x, bool(getattr(x, "weak_type", False))

    def _key(self):
        return (*super()._key(), type(self.value), self.weak)


class _ConstantStepTime(_KnownTime):
    """A known time argument of a constant-step solve, whose plan (the number of
    steps) is read from the values, so that the program is compiled per value
    anyway. A Python number is then compiled in as a constant, as
    `equinox.filter_jit` (around Diffrax's `diffeqsolve`) compiles it: XLA folds
    the step times computed from it as in Diffrax, e.g. exact integers for
    `t0=0, t1=100, dt0=1` in float32, where computed at run time step 15 would
    end at `100 * (15 / 100) = 15.000001`. An array stays a value the program
    computes with (as Diffrax traces it), and so does a NumPy scalar (a `float`
    too, but an array to `equinox.filter_jit`)."""

    __slots__ = ("constant",)

    def __init__(self, x):
        super().__init__(x)
        self.constant = self.number and not isinstance(x, np.generic)

    def _key(self):
        return (*super()._key(), self.constant)


class _UnknownTime:
    """A time argument whose value is not read at trace time."""

    def __array__(self, dtype=None, copy=None):
        raise TypeError("not known at trace time")


_UNKNOWN = _UnknownTime()


def _known(x) -> bool:
    return x is not None and (
        (isinstance(x, (int, float)) and not isinstance(x, bool))
        or (
            isinstance(x, (jax.Array, np.ndarray, np.generic))
            and not isinstance(x, jax.core.Tracer)
            and np.shape(x) == ()
        )
    )


def _eager_call(problem: dict, adjoint, throw, staged=False):
    """The solve, compiled and cached (see `call_compiled`): the times are traced,
    with what `_solve` reads from them at trace time in the key. `None` when the call
    cannot be cached (something static about it is not hashable): it then runs as
    before, op by op.

    With `staged=True` (the call is part of a program being traced) the solve is
    traced as a nested `jax.jit` instead; the times that are not tracers are part of
    the key and given to `_solve` as they are (as if it were traced inline)."""
    given = tuple(problem[name] for name in _TIMES)
    untimed = dict(problem, t0=None, t1=None, dt0=None)
    # For constant steps known here: how many requested times a step may save
    # (read from their values, which the call traces).
    writes = None
    if type(problem["stepsize_controller"]) is ConstantStepSize and all(
        _known(x) for x in given
    ):
        writes = requested_writes(_subsaveats(problem["saveat"]), *given)
    if staged:
        key = tuple(
            None if x is None or isinstance(x, jax.core.Tracer) else _StaticTime(x)
            for x in given
        ) + (writes,)
        traced = tuple(x if isinstance(x, jax.core.Tracer) else None for x in given)
        return call_compiled(
            _solve_eagerly, (key, untimed, adjoint, throw, True), traced, staged=True
        )
    if type(problem["stepsize_controller"]) is ConstantStepSize:
        # The constant-step plan reads the values.
        key = tuple(
            _ConstantStepTime(x) if _known(x) else (None if x is None else _UNKNOWN)
            for x in given
        ) + (writes,)
    else:
        # Only whether `t0 <= t1` is known, and whether they are Python numbers.
        t0, t1, _ = given
        if _known(t0) and _known(t1):
            order = (0.0, 1.0) if _known_forwards(t0, t1) else (1.0, 0.0)
            key = tuple(
                _KnownTime(v if isinstance(x, (int, float)) else np.asarray(v))
                for v, x in zip(order, (t0, t1), strict=True)
            ) + (None, None)
        else:
            key = (_UNKNOWN, _UNKNOWN, None, None)
    return call_compiled(_solve_eagerly, (key, untimed, adjoint, throw, False), given)


_tracing = threading.local()


def _solve_eagerly(given_key, problem: dict, adjoint, throw, nested, t0, t1, dt0):
    """`_solve` of an eager call (or, `nested`, of a nested trace), as traced by
    `call_compiled`. The arguments were checked before."""
    given_key, writes = given_key[:3], given_key[3]
    if nested:
        # A nested trace: the times as they were given, or their tracers.
        t0, t1, dt0 = (
            x.value if isinstance(x, _StaticTime) else t
            for x, t in zip(given_key, (t0, t1, dt0), strict=True)
        )
        given_times = (t0, t1, dt0)
    else:
        given_times = tuple(
            x.given() if isinstance(x, _KnownTime) else x for x in given_key
        )
        # Python numbers of a constant-step solve: compiled in (see
        # `_ConstantStepTime`).
        t0, t1, dt0 = (
            x.given() if isinstance(x, _ConstantStepTime) and x.constant else t
            for x, t in zip(given_key, (t0, t1, dt0), strict=True)
        )
    problem = dict(problem, t0=t0, t1=t1, dt0=dt0)
    subs = _subsaveats(problem["saveat"])
    inside, _tracing.inside = getattr(_tracing, "inside", False), True
    try:
        return _solve(problem, subs, adjoint, throw, given_times, writes)
    finally:
        _tracing.inside = inside


def _subsaveats(saveat) -> list:
    if saveat.subs is None:
        return []
    return jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)


def _check_arguments(
    *,
    terms,
    solver,
    t0,
    t1,
    dt0,
    y0,
    saveat,
    stepsize_controller,
    adjoint,
    event,
    max_steps,
    progress_meter,
    **_checked_later,
):
    """Every check that needs no tracing; returns the `SubSaveAt`s as a list. (`args`
    and the states to resume from are checked when the first step is traced.)"""
    checks.check_solver(solver)
    checks.check_terms(terms, solver)
    checks.check_sde(terms, solver, stepsize_controller)
    checks.check_y0(y0)
    checks.check_times(t0, t1)
    checks.check_max_steps(max_steps)
    checks.check_controller(stepsize_controller, solver, dt0, t0, t1)
    for name, value, cls, example in (
        ("event", event, Event, "`Event(cond_fn, ...)` or None"),
        ("adjoint", adjoint, AbstractAdjoint, "`RecursiveCheckpointAdjoint()`"),
        (
            "progress_meter",
            progress_meter,
            AbstractProgressMeter,
            "`NoProgressMeter()`",
        ),
    ):
        if not (isinstance(value, cls) or (name == "event" and value is None)):
            raise TypeError(
                f"`{name}` must be an instance of {cls.__name__} such as {example}, "
                f"got {checks.describe(value)}."
            )
    subs = _subsaveats(saveat)
    checks.check_saveat(saveat, t0, t1, max_steps, subs)
    checks.check_unsafe_brownian(terms, stepsize_controller, adjoint)
    return subs


def _run_adjoint_loop(spec, init_state, adjoint):
    """The adjoint's while loop over the steps."""

    def run(state, outer, inner, mark=None):
        # `mark` (if given) is applied to everything the loop reads: its initial state
        # and the fixed inputs it closes over. (Field by field: the event's condition
        # receives the user's own objects, e.g. `saveat`, not copies.)
        if mark is None:
            return run_loop(spec, state, outer, inner)
        marked = dataclasses.replace(
            spec,
            terms=mark(spec.terms),
            solver=mark(spec.solver),
            controller=mark(spec.controller),
            args=mark(spec.args),
            t1=mark(spec.t1),
            subs_ts=mark(spec.subs_ts),
        )
        return run_loop(marked, mark(state), outer, inner)

    return adjoint.loop(
        run_loop=run,
        init_state=init_state,
        max_steps=spec.max_steps,
    )


def _finish_terminal_event(spec, final):
    """Moves the end of a solve stopped by a terminating event onto the event.

    Without a root finder the solve already ends where it stopped (the end of the step
    in which the event fired, saved as usual, or `t0`). With one the event is located
    in that step, whose saves were held back, and they are made now, up to the event.
    A solve stopped at `t0` saves none of its `SaveAt(ts=...)` times, as Diffrax,
    unless it has zero length (`t0 == t1`): then it saves as without the event."""
    espec = spec.event_spec
    fired = is_event(final.result)
    at_t0 = fired & (final.num_steps == 0)
    last = final.event_state.last
    event_mask = espec.tree([m & fired for m in last.mask])
    # A solve of zero length (`t0 == t1`) saves as it would without the event.
    suppress = at_t0 & (final.tprev != spec.t1)
    save_state = [
        state
        if ts_tau is None
        else dataclasses.replace(
            state, ts_index=jnp.where(suppress, ts_tau.shape[0], state.ts_index)
        )
        for state, ts_tau in zip(final.save_state, spec.subs_ts, strict=True)
    ]
    result, t_end, y_end = final.result, final.tprev, final.y
    if espec.event.root_finder is not None:
        interpolation_cls = spec.solver.interpolation_cls
        location = locate_event(
            espec, last, final.y, interpolation_cls, spec.args, spec.direction
        )
        result = where_result(succeeded(location.result), result, location.result)
        t_end = jnp.where(fired, location.t, final.tprev)
        # At `t0` there is no step to interpolate on: the state is `y0`.
        y_end = tree_where(fired & ~at_t0, location.y, final.y)
        interpolant = interpolation_cls(t0=last.tprev, t1=last.tnext, **last.dense_info)
        # An event located exactly at the step's end (always so for a boolean
        # condition) saves that step twice under `SaveAt(steps=...)`: first its end
        # as the solver reached it, then the event. This is what Diffrax 0.7.2 does.
        at_step_end = fired & ~at_t0 & (t_end == last.tnext)
        for end_time, end_state, pred in (
            (last.tnext, final.y, at_step_end),
            (t_end, y_end, fired),
        ):
            save_state = [
                save_in_step(
                    state,
                    sub,
                    ts_tau,
                    interpolant,
                    end_time,
                    end_state,
                    pred,
                    # The event's step was counted as accepted but not saved in the
                    # loop.
                    final.num_accepted_steps - 1,
                    spec.args,
                    spec.direction,
                    after_loop_while_loop(),
                )
                for state, sub, ts_tau in zip(
                    save_state, spec.subs, spec.subs_ts, strict=True
                )
            ]
    return dataclasses.replace(
        final,
        tprev=t_end,
        y=y_end,
        result=result,
        save_state=save_state,
        event_mask=event_mask,
    )


def _known_forwards(t0, t1) -> bool:
    """Whether `t0 <= t1` is known at trace time."""
    t0, t1 = checks.concrete(t0), checks.concrete(t1)
    if t0 is None or t1 is None or t0.shape != () or t1.shape != ():
        return False
    return bool(t0 <= t1)
