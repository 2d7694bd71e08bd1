"""The solver protocol: `AbstractSolver` and its families."""

import abc
import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._brownian.base import brownian_paths
from .._term import AbstractTerm


def _is_sde(terms) -> bool:
    """Whether `terms` are driven by Brownian motion (a path anywhere among them)."""
    return bool(brownian_paths(terms))


_SolverState = TypeVar("_SolverState")

# Whether the step being traced is accepted whatever its error estimate (constant
# step sizes): set by the solve loop around each `step` it traces.
_always_accepted: list[bool] = []


@contextlib.contextmanager
def tracing_step(always_accepted: bool):
    """Traces the solver steps inside it as steps that are accepted whatever their
    error estimate (`always_accepted=True`: a constant-step solve) or not."""
    _always_accepted.append(bool(always_accepted))
    try:
        yield
    finally:
        _always_accepted.pop()


def refreshed_after_jump(made_jump, fresh: Callable[[], PyTree], kept: PyTree):
    """`fresh()` where `made_jump`, else `kept`: a value a solver keeps between steps
    (e.g. a first-same-as-last evaluation) that a jump in the vector field makes
    stale. Under `vmap` `made_jump` is per member: `fresh()` is computed when any
    member needs it and taken where it does. (A batched predicate would turn a
    `lax.cond` on `made_jump` into a select, computing `fresh()` at every step.)"""

    if made_jump is False:
        return kept

    def refresh():
        return jtu.tree_map(lambda a, b: jnp.where(made_jump, a, b), fresh(), kept)

    return jax.lax.cond(eqxi.unvmap_any(made_jump), refresh, lambda: kept)


def step_always_accepted() -> bool:
    """Whether the step being traced is accepted whatever its error estimate. Then no
    accept/reject decision can hang on the last bit of the arithmetic, and a solver
    may round differently from Diffrax for speed. False outside a solve."""
    return bool(_always_accepted) and _always_accepted[-1]


class _SolverMeta(type(eqx.Module)):
    """Makes a wrapped solver count as an instance of the class of the solver it
    wraps (one level deep), as in Diffrax: `isinstance(HalfSolver(Euler()), Euler)`
    and `isinstance(HalfSolver(Euler()), AbstractItoSolver)` are true. Subclassing
    is unaffected (`issubclass(HalfSolver, Euler)` is false)."""

    def __instancecheck__(cls, instance):
        if super().__instancecheck__(instance):
            return True
        if issubclass(type(instance), AbstractWrappedSolver):
            try:
                inner = instance.solver
            except AttributeError:
                return False
            # Not `isinstance` again: only one level of wrapping counts.
            return issubclass(type(inner), cls)
        return False


def is_solver_of_type(solver, cls) -> bool:
    """Whether `solver` itself, not a solver it wraps, is an instance of `cls`."""
    return issubclass(type(solver), cls)


class AbstractSolver(eqx.Module, Generic[_SolverState], metaclass=_SolverMeta):
    """Base class for every solver. The protocol, which `diffeqsolve` drives:

    - `term_structure`: the PyTree structure of terms the solver accepts, e.g.
      `AbstractTerm` (any single term) or `(ODETerm, AbstractTerm)`.
    - `interpolation_cls`: called as `interpolation_cls(t0=, t1=, **dense_info)` to
      build the interpolant over one step.
    - `init(terms, t0, t1, y0, args) -> solver_state`.
    - `step(terms, t0, t1, y0, args, solver_state, made_jump)
      -> (y1, y_error, dense_info, solver_state, result)`: one step from `t0` to `t1`.
      The step size `t1 - t0` may be read freely (e.g. for step-size-dependent
      dynamics). `y_error` may be `None` for solvers without an error estimate.
    - `func(terms, t0, y0, args) -> dy/dt`: the vector field, used e.g. to choose the
      first step size.
    - `order(terms)`, `strong_order(terms)`, `error_order(terms)`.

    Time always runs forwards inside `step`: for `t1 < t0`, `diffeqsolve` presents the
    terms in reversed time. The wrapping keeps the structure of `terms`: a `MultiTerm`
    stays a `MultiTerm` whose `.terms` are the (wrapped) parts, and a tuple stays a
    tuple, so a solver can take the parts apart as its `term_structure` says.

    `AbstractSolver[StateType]` may be written in annotations (the type parameter is
    the solver state's type; it is not checked).
    """

    term_structure: eqx.AbstractClassVar[Any]
    interpolation_cls: eqx.AbstractClassVar[Callable[..., Any]]

    def order(self, terms: PyTree[AbstractTerm]) -> int | None:
        """Order of convergence for ODEs, or `None` if not known."""
        return None

    def strong_order(self, terms: PyTree[AbstractTerm]) -> float | None:
        """Strong order of convergence for SDEs, or `None` if not known."""
        return None

    def error_order(self, terms: PyTree[AbstractTerm]) -> float | None:
        """Local order of the error estimate, used by adaptive step-size controllers.

        For an ODE the error estimate is the difference of a method of order `p` and
        one of order `p - 1`, so its local order is `p`: this returns `order(terms)`.
        For an SDE it is `strong_order(terms) + 0.5`.
        """
        if _is_sde(terms):
            order = self.strong_order(terms)
            return None if order is None else order + 0.5
        return self.order(terms)

    @abc.abstractmethod
    def init(self, terms, t0, t1, y0, args) -> _SolverState:
        """The initial solver state."""

    @abc.abstractmethod
    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        """One step from `t0` to `t1`."""

    @abc.abstractmethod
    def func(self, terms, t0, y0, args) -> PyTree:
        """The vector field at `(t0, y0)`."""


class AbstractAdaptiveSolver(AbstractSolver[_SolverState]):
    """A solver whose `step` returns a meaningful error estimate `y_error`, so that it
    can be used with an adaptive step-size controller such as `PIDController`.

    Subclassing it is a statement about the solver, not a requirement: any
    `AbstractSolver` whose `step` returns an error estimate (not `None`) runs with an
    adaptive controller. `diffeqsolve` decides by tracing `step` once."""


class AbstractItoSolver(AbstractSolver[_SolverState]):
    """Marks a solver that, applied to an SDE, converges to the Itô solution
    (e.g. `Euler`)."""


class AbstractStratonovichSolver(AbstractSolver[_SolverState]):
    """Marks a solver that, applied to an SDE, converges to the Stratonovich solution
    (e.g. `Heun`, `Midpoint`, `Ralston`)."""


class AbstractImplicitSolver(AbstractSolver[_SolverState]):
    """An implicit solver: its steps solve nonlinear systems.

    Subclasses provide `root_finder` (an `optimistix.AbstractRootFinder`) and
    `root_find_max_steps` (an int), as fields or properties. `step` reports a failed
    root find as `RESULTS.promote(optx_result)`, which keeps Optimistix's code."""

    root_finder: eqx.AbstractVar[Any]
    root_find_max_steps: eqx.AbstractVar[int]


class AbstractWrappedSolver(AbstractSolver[_SolverState]):
    """A solver that wraps another one, given as its field or property `solver`.

    As in Diffrax, a wrapper counts as an instance of the classes of the solver it
    wraps, one level deep: `isinstance(HalfSolver(Euler()), Euler)` and
    `isinstance(HalfSolver(Euler()), AbstractItoSolver)` are true (`issubclass` is
    unaffected)."""

    solver: eqx.AbstractVar[AbstractSolver]
