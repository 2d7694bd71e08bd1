"""Argument checks for `diffeqsolve`: each error names the argument, what was
received and what was expected, and is raised before any tracing of the loop."""

import inspect
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._brownian.base import brownian_paths
from .._controller.base import AbstractStepSizeController
from .._controller.clip import is_adaptive_controller, unwrap_controller
from .._controller.constant import ConstantStepSize, StepTo
from .._event import Event
from .._saveat import SaveAt
from .._solver.base import (
    AbstractImplicitSolver,
    AbstractItoSolver,
    AbstractSolver,
    AbstractStratonovichSolver,
    AbstractWrappedSolver,
    is_solver_of_type,
)
from .._solver.explicit import Euler
from .._solver.runge_kutta import AbstractRungeKutta
from .._solver.term_structure import (
    structure_repr,
    term_structure_mismatch,
    term_type_mismatch,
)
from .._term import AbstractTerm, is_term
from .._times import TimesError


def describe(x) -> str:
    if inspect.isfunction(x) or inspect.ismethod(x):
        return f"the function {getattr(x, '__qualname__', x)!r}"
    if isinstance(x, type):
        return f"the class {x.__name__}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(describe(v) for v in list(x)[:4])
        more = ", ..." if len(x) > 4 else ""
        return f"a Python {type(x).__name__} of [{inner}{more}]"
    text = repr(x)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (of type {type(x).__name__})"


def check_solver(solver) -> None:
    if isinstance(solver, type):
        if issubclass(solver, AbstractSolver):
            raise TypeError(
                f"`solver` must be a solver instance, but got the class "
                f"{solver.__name__}. Did you mean `{solver.__name__}()`?"
            )
        raise TypeError(
            f"`solver` must be an instance of AbstractSolver, got {describe(solver)}."
        )
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            "`solver` must be an instance of AbstractSolver (e.g. `Tsit5()`), got "
            f"{describe(solver)}."
        )


def check_terms(terms, solver) -> None:
    leaves = jtu.tree_leaves(terms, is_leaf=is_term)
    bad = [leaf for leaf in leaves if not isinstance(leaf, AbstractTerm)]
    if isinstance(terms, type) or not leaves or bad:
        hint = ""
        if callable(terms) and not isinstance(terms, AbstractTerm):
            hint = " Wrap a vector field `f(t, y, args)` as `ODETerm(f)`."
        elif isinstance(terms, list):
            hint = (
                " Wrap each vector field in a term (e.g. `ODETerm(f)`) and combine "
                "several with `MultiTerm(...)` or a tuple."
            )
        raise TypeError(
            "`terms` must be a PyTree of AbstractTerm instances (e.g. `ODETerm(f)`), "
            f"but got {describe(terms)}.{hint}"
        )
    structure = solver.term_structure
    mismatch = term_structure_mismatch(terms, structure)
    if mismatch is not None:
        raise ValueError(
            f"`terms` do not match the term_structure of {type(solver).__name__}: "
            f"{mismatch}. The solver expects {structure_repr(structure)}, and got "
            f"{structure_repr(terms)}."
        )


def check_y0(y0) -> None:
    """`y0` may be any PyTree (even an empty one) of numbers or arrays: boolean and
    integer leaves are promoted to floating point later, as Diffrax does."""
    for path, leaf in jtu.tree_flatten_with_path(y0)[0]:
        try:
            dtype = jnp.result_type(leaf)
        except TypeError:
            dtype = None
        if dtype is None or not (
            jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
        ):
            where = jtu.keystr(path) or "y0"
            raise TypeError(
                f"`y0` must be a PyTree of numeric arrays, but the leaf at {where} is "
                f"{describe(leaf)}."
            )


def concrete(x) -> Any:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    except (TypeError, ValueError):
        return None


def check_controller(stepsize_controller, solver, dt0, t0, t1) -> None:
    if isinstance(stepsize_controller, type):
        raise TypeError(
            "`stepsize_controller` must be an instance, but got the class "
            f"{stepsize_controller.__name__}. Did you mean "
            f"`{stepsize_controller.__name__}(...)`?"
        )
    if not isinstance(stepsize_controller, AbstractStepSizeController):
        raise TypeError(
            "`stepsize_controller` must be an AbstractStepSizeController (e.g. "
            f"`PIDController(rtol=1e-6, atol=1e-6)`), got {describe(stepsize_controller)}."
        )
    inner = unwrap_controller(stepsize_controller)
    if (
        is_adaptive_controller(stepsize_controller)
        and _known_error_estimate(solver) is False
    ):
        _raise_no_error_estimate(solver, inner)
    if dt0 is None and isinstance(inner, ConstantStepSize):
        raise ValueError(
            "`dt0=None` was passed with `ConstantStepSize`, which needs an explicit "
            "step: pass e.g. `dt0=0.01`, or use an adaptive controller such as "
            "`PIDController` that can choose the first step itself."
        )
    if dt0 is not None and isinstance(inner, StepTo):
        raise ValueError(
            f"`StepTo` fixes every step itself, so `dt0` must be None; got dt0={dt0!r}."
        )
    if isinstance(dt0, (list, tuple)):
        raise ValueError(
            f"`dt0` must be a scalar step size or None, got {describe(dt0)}. To use "
            "different step sizes, `jax.vmap` over an array of them."
        )
    if dt0 is not None:
        dt0_c, t0_c, t1_c = concrete(dt0), concrete(t0), concrete(t1)
        if dt0_c is not None and dt0_c.shape != ():
            raise ValueError(f"`dt0` must be a scalar, got shape {dt0_c.shape}.")
        if dt0_c is not None and t0_c is not None and t1_c is not None:
            span = t1_c - t0_c
            if dt0_c == 0 and span != 0:
                raise ValueError("`dt0` must be non-zero, got dt0=0.")
            if span * dt0_c < 0:
                raise ValueError(
                    f"`dt0` must have the same sign as `t1 - t0`: got dt0={dt0_c}, but "
                    f"t1 - t0 = {span}. To integrate backwards in time pass t1 < t0 "
                    "and a negative dt0."
                )


def _known_error_estimate(solver) -> bool | None:
    """Whether `solver.step` returns an error estimate, when known without tracing
    it (the built-in solvers); `None` for any other solver."""
    # The solver's own class: a wrapper of a Runge-Kutta method (e.g. `HalfSolver`)
    # counts as an instance of it, but has its own `step`.
    if is_solver_of_type(solver, AbstractRungeKutta):
        tableaus = getattr(solver.tableau, "tableaus", (solver.tableau,))
        if all(tab.b_error is not None for tab in tableaus):
            return True
        # An implicit method may estimate its error otherwise (`ImplicitEuler`).
        return None if is_solver_of_type(solver, AbstractImplicitSolver) else False
    if is_solver_of_type(solver, Euler):
        return False
    return None


class NoErrorEstimateError(ValueError, RuntimeError):
    """A solver without an error estimate under an adaptive step-size controller,
    found when `diffeqsolve` is traced. A `ValueError`, and also a `RuntimeError`,
    which is what Diffrax raises for it, so that code catching either keeps
    working."""


def _raise_no_error_estimate(solver, controller) -> None:
    raise NoErrorEstimateError(
        f"The solver {type(solver).__name__} returns no error estimate (its `step` "
        f"gives `y_error=None`), so it cannot be used with the adaptive "
        f"{type(controller).__name__}. Use `ConstantStepSize()` with this solver, a "
        "solver with an error estimate such as `Tsit5()`, or return an error "
        "estimate from `step`."
    )


def check_step_protocol(terms, solver, stepsize_controller, t0, t1, y0, args) -> None:
    """Checks that need the solve's values, done by tracing (no computation):

    - the vector-field and control types a subscripted `term_structure` asks for
      (e.g. `AbstractTerm[Any, Float[Array, ""]]`);
    - that a solver used with an adaptive controller returns an error estimate,
      when that is known without tracing `step` (the built-in Runge–Kutta methods
      and `Euler`). Otherwise adaptivity is decided by what `step` returns, as
      Diffrax does (a subclass of `AbstractSolver` that returns one runs
      adaptively), and checked where the loop's step is traced
      (`raise_if_no_error_estimate`): an extra trace here would trace the step, and
      the user's vector field in it, once more.

    `t0`, `t1` and `y0` are the converted arrays, in the user's time."""
    mismatch = term_type_mismatch(terms, solver.term_structure, t0, y0, args)
    if mismatch is not None:
        raise ValueError(
            f"`terms` do not match the term_structure of {type(solver).__name__} "
            f"({structure_repr(solver.term_structure)}): {mismatch}."
        )
    if is_adaptive_controller(stepsize_controller) and (
        _known_error_estimate(solver) is False
    ):
        _raise_no_error_estimate(solver, unwrap_controller(stepsize_controller))


def raise_if_no_error_estimate(solver, stepsize_controller, y_error, y) -> None:
    """At the loop's trace of `step`: an adaptive controller needs the error
    estimate that `step` returned as `y_error`. (An empty state `y` has an empty
    estimate, which may come back as `None`: there is no error to control, as in
    Diffrax, and every step is accepted.)"""
    if not jtu.tree_leaves(y):
        return
    if y_error is None and is_adaptive_controller(stepsize_controller):
        _raise_no_error_estimate(solver, unwrap_controller(stepsize_controller))


class _DiscreteEventState(eqx.Module):
    """What an old-style (pre-`Event`) discrete terminating event reads."""

    tprev: Any
    y: Any


def resolve_deprecated_event(event, discrete_terminating_event):
    """`diffeqsolve(..., discrete_terminating_event=...)`, deprecated in Diffrax in
    favour of `event=`: accepted as Diffrax does, with a `UserWarning`. The callable
    `fn(state, *, args, **kwargs)` sees `state.tprev` (the time at the end of the
    step) and `state.y`; the solve stops after the first step where it is True."""
    if discrete_terminating_event is None:
        return event
    if event is not None:
        raise ValueError(
            "Pass either `event=` or the deprecated `discrete_terminating_event=`, "
            "not both."
        )
    return Event(cond_fn=DiscreteTerminatingCondition(discrete_terminating_event))


class DiscreteTerminatingCondition:
    """The condition of an `Event` made from a deprecated discrete terminating event
    `fn(state, *, args, **kwargs)`. Compared (and hashed) by `fn`, so that solves
    with the same `fn` share their compiled program. Not a PyTree node: `Event` maps
    over a PyTree of conditions, and must see this one as a single condition."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, t, y, args, **kwargs):
        return self.fn(_DiscreteEventState(tprev=t, y=y), args=args, **kwargs)

    def __eq__(self, other):
        if type(other) is not type(self):
            return False
        if self.fn is other.fn:
            return True
        try:
            return bool(self.fn == other.fn)
        except Exception:  # e.g. a Module holding traced arrays
            return False

    def __hash__(self):
        try:
            return hash((type(self), self.fn))
        except TypeError:  # e.g. a Module holding arrays: by identity
            return hash((type(self), id(self.fn)))


def warn_deprecated_event(event) -> None:
    """The deprecation warning of `discrete_terminating_event=`, made when the solve
    is traced (as Diffrax makes it): once per compiled program, not once per call."""
    if event is not None and isinstance(event.cond_fn, DiscreteTerminatingCondition):
        warnings.warn(
            "`diffeqsolve(..., discrete_terminating_event=...)` is deprecated (as it "
            "is in Diffrax): pass `event=Event(cond_fn)` with a boolean "
            "`cond_fn(t, y, args, **kwargs)` instead.",
            UserWarning,
            stacklevel=2,
        )


def check_times(t0, t1) -> None:
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, (list, tuple)):
            raise TypeError(
                f"`{name}` must be a scalar time, got {describe(value)}. To solve "
                "over several intervals, `jax.vmap` over an array of times."
            )
        shape = jnp.shape(value)
        if shape != ():
            raise ValueError(
                f"`{name}` must be a scalar time, got an array of shape {shape}. To "
                "solve over several intervals, `jax.vmap` over the times."
            )


def check_saveat(saveat, t0, t1, max_steps, subs) -> None:
    if not isinstance(saveat, SaveAt):
        raise TypeError(f"`saveat` must be a `SaveAt(...)`, got {describe(saveat)}.")
    t0_c, t1_c = concrete(t0), concrete(t1)
    for sub in subs:
        if sub.steps and max_steps is None:
            raise ValueError(
                "`SaveAt(steps=True)` needs a finite `max_steps` to size its output; "
                "got `max_steps=None`."
            )
        if sub.ts is None:
            continue
        ts = concrete(sub.ts)
        if ts is None:
            continue
        if np.any(np.isnan(ts)):
            raise ValueError(f"`SaveAt(ts=...)` contains NaN: {ts}.")
        if t0_c is not None and t1_c is not None and ts.size:
            forwards = t1_c >= t0_c
            diffs = np.diff(ts)
            if (forwards and np.any(diffs < 0)) or (not forwards and np.any(diffs > 0)):
                order = "increasing" if forwards else "decreasing"
                raise TimesError(
                    f"`SaveAt(ts=...)` must be monotonically {order} in the direction "
                    f"of integration (t0={t0_c}, t1={t1_c}); got ts={ts}."
                )
            lo, hi = min(t0_c, t1_c), max(t0_c, t1_c)
            if ts.min() < lo or ts.max() > hi:
                raise TimesError(
                    f"`SaveAt(ts=...)` must lie within [t0, t1] = [{t0_c}, {t1_c}]; got "
                    f"ts from {ts.min()} to {ts.max()}."
                )


def check_max_steps(max_steps) -> None:
    if max_steps is None:
        return
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise TypeError(
            f"`max_steps` must be a positive int or None, got {describe(max_steps)}."
        )
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be at least 1, got {max_steps}.")


def check_unsafe_brownian(terms, stepsize_controller, adjoint) -> None:
    """`UnsafeBrownianPath` draws each increment from the key and the interval's
    times, so it is only right when every interval is sampled once: constant steps,
    no rejected step, and no backward pass that re-derives the step times."""
    from .._brownian.unsafe import UnsafeBrownianPath
    from .._transforms import differentiation_levels

    def is_unsafe(x):
        return isinstance(x, UnsafeBrownianPath)

    if not any(is_unsafe(x) for x in jtu.tree_leaves(terms, is_leaf=is_unsafe)):
        return
    if is_adaptive_controller(stepsize_controller):
        raise ValueError(
            "`UnsafeBrownianPath` cannot be used with an adaptive step-size "
            f"controller ({type(stepsize_controller).__name__}): a rejected step "
            "would draw a new, inconsistent increment. Use `VirtualBrownianTree`, or "
            "constant steps."
        )
    if "reverse" in differentiation_levels():
        # Measured: under `jax.jit`, `jax.grad` through such a solve gave wrong
        # gradients with RecursiveCheckpointAdjoint and DirectAdjoint alike (the
        # sampled times need not round the same in the backward pass); forward
        # mode matched finite differences.
        raise ValueError(
            "Reverse-mode differentiation (`jax.grad`, `jax.vjp`) of a solve driven "
            f"by `UnsafeBrownianPath` (adjoint {type(adjoint).__name__}) is not "
            "supported: its increments are drawn from the step times, which the "
            "backward pass need not reproduce bit for bit. Use `VirtualBrownianTree`, "
            "or forward mode (`jax.jacfwd`, `jax.jvp`, `adjoint=ForwardMode()`)."
        )


def check_sde(terms, solver, stepsize_controller) -> None:
    """For a solve driven by Brownian motion: the solver's Lévy-area needs are met by
    every path, Euler is not used with adaptive steps, and a solver not marked as
    converging to the Itô or the Stratonovich solution is warned about."""
    paths = brownian_paths(terms)
    if not paths:
        return
    needed = getattr(solver, "minimal_levy_area", None)
    if needed is not None:
        for path in paths:
            given = getattr(path, "levy_area", None)
            if not (isinstance(given, type) and issubclass(given, needed)):
                given_name = getattr(given, "__name__", repr(given))
                raise ValueError(
                    f"`{type(solver).__name__}` needs a Brownian motion that provides "
                    f"`{needed.__name__}` (e.g. a path created with "
                    f"`levy_area=diffeqx.{_concrete_levy_area(needed)}`), but "
                    f"`{type(path).__name__}` was given `levy_area={given_name}`."
                )
    if is_solver_of_type(solver, Euler) and is_adaptive_controller(stepsize_controller):
        raise ValueError(
            "An SDE cannot be solved by `Euler` with an adaptive step-size controller "
            f"({type(stepsize_controller).__name__}): Euler has no error estimate, "
            "and adapting the steps to the noise would bias the solution. Use "
            "constant steps, or a solver with an error estimate (e.g. "
            "`HalfSolver(Euler())`, `SPaRK()`, `ReversibleHeun()`)."
        )
    inner = solver
    while isinstance(inner, AbstractWrappedSolver):
        inner = inner.solver
    if not isinstance(inner, (AbstractItoSolver, AbstractStratonovichSolver)):
        warnings.warn(
            f"`{type(solver).__name__}` is not marked as converging to either the "
            "Itô or the Stratonovich solution of an SDE (it subclasses neither "
            "`AbstractItoSolver` nor `AbstractStratonovichSolver`).",
            stacklevel=4,
        )


def _concrete_levy_area(cls) -> str:
    from .._brownian import levy

    for name in ("BrownianIncrement", "SpaceTimeLevyArea", "SpaceTimeTimeLevyArea"):
        if issubclass(getattr(levy, name), cls):
            return name
    return cls.__name__
