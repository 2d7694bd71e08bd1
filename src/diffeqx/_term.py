"""Terms: what is integrated.

A term describes one piece of a differential equation in the form
`dy = vf(t, y, args) · d(control)(t)`. For an ODE the control is time itself, so the
increment over `[t0, t1]` is `vf(t, y, args) * (t1 - t0)`.
"""

import abc
from collections.abc import Callable
from typing import Any, Generic, TypeVar, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._profile import scope

# Type parameters of the generic term classes (`AbstractTerm[VF, Control]`, ...).
VFT = TypeVar("VFT")
ControlT = TypeVar("ControlT")
TermsT = TypeVar("TermsT")


class AbstractTerm(eqx.Module, Generic[VFT, ControlT]):
    """Base class for every term.

    Subclasses implement:

    - `vf(t, y, args)`: the vector field at time `t` and state `y`;
    - `contr(t0, t1)`: the control increment over `[t0, t1]`;
    - `prod(vf, control)`: how a vector field acts on a control increment, giving a
      change in `y`.

    `vf_prod(t, y, args, control)` is `prod(vf(t, y, args), control)`; override it when
    the product can be computed more cheaply without materialising `vf`.

    `AbstractTerm[VF, Control]` may be written in annotations and in a solver's
    `term_structure`; there, `diffeqsolve` checks that the term's vector field and
    control have these types (e.g. `AbstractTerm[Any, Float[Array, ""]]` for a
    scalar control).
    """

    @abc.abstractmethod
    def vf(self, t, y: PyTree, args: PyTree) -> PyTree:
        """The vector field evaluated at `(t, y, args)`."""

    @abc.abstractmethod
    def contr(self, t0, t1, **kwargs) -> PyTree:
        """The control increment over the interval `[t0, t1]`."""

    @abc.abstractmethod
    def prod(self, vf: PyTree, control: PyTree) -> PyTree:
        """The change in `y` produced by the vector field `vf` and control `control`."""

    def vf_prod(self, t, y: PyTree, args: PyTree, control: PyTree) -> PyTree:
        """`prod(vf(t, y, args), control)`."""
        return self.prod(self.vf(t, y, args), control)

    def is_vf_expensive(self, t0, t1, y, args) -> bool:
        """Whether `vf` is much more expensive than `vf_prod` (cheaper to evaluate
        `vf_prod` twice than `vf` once). As in Diffrax, a first-same-as-last
        Runge–Kutta method then carries no vector field between steps (its `init`
        returns no state) and evaluates each step's first stage afresh."""
        return False


def _check_vf_structure(y, out):
    y_struct = jtu.tree_structure(y)
    out_struct = jtu.tree_structure(out)
    if y_struct != out_struct:
        raise ValueError(
            "The vector field of an `ODETerm` must return a PyTree with the same "
            f"structure as `y`. `y` has structure {y_struct} but the vector field "
            f"returned structure {out_struct}."
        )


@final
class ODETerm(AbstractTerm[VFT, Any]):
    """The term `f(t, y, args) dt` of an ordinary differential equation.

    **Arguments:**

    - `vector_field`: a callable `(t, y, args) -> dy/dt` returning a PyTree with the
      same structure as `y`.

    **Example:**

    ```python
    term = diffeqx.ODETerm(lambda t, y, args: -args * y)
    ```
    """

    vector_field: Callable[..., PyTree]

    def vf(self, t, y, args):
        out = self.vector_field(t, y, args)
        _check_vf_structure(y, out)

        def _broadcast(o, yi):
            o = jnp.asarray(o)
            if not jnp.issubdtype(o.dtype, jnp.inexact) and jnp.issubdtype(
                jnp.result_type(yi), jnp.inexact
            ):
                # An integer or boolean field (e.g. a Python `0` for a term that is
                # zero) for a floating state: its values in the state's dtype, as
                # Diffrax's product with the control gives them.
                o = o.astype(jnp.result_type(yi))
            if o.shape != jnp.shape(yi):
                try:
                    o = jnp.broadcast_to(o, jnp.shape(yi))
                except ValueError as e:
                    raise ValueError(
                        "The vector field of an `ODETerm` returned a leaf of shape "
                        f"{o.shape} for a state leaf of shape {jnp.shape(yi)}; the "
                        "shapes must match."
                    ) from e
            return o

        return jtu.tree_map(_broadcast, out, y)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        # The state's dtype is at least as wide as the time's (see `diffeqsolve`), so
        # casting the control to it is exact.
        return jtu.tree_map(lambda v: jnp.asarray(control, dtype=v.dtype) * v, vf)


@final
class MultiTerm(AbstractTerm, Generic[TermsT]):
    """The sum of several terms, e.g. drift and diffusion of an SDE.

    `vf` and `contr` return tuples with one entry per term; `prod` sums the products.
    The parts are `.terms`, a tuple.

    **Arguments:**

    - `*terms`: the terms to add together.

    `MultiTerm[tuple[ODETerm, ControlTerm]]` may be written in annotations and in a
    solver's `term_structure`, which then accepts a `MultiTerm` of exactly these
    parts.
    """

    terms: tuple[AbstractTerm, ...]

    def __init__(self, *terms: AbstractTerm):
        for i, term in enumerate(terms):
            if not isinstance(term, AbstractTerm):
                raise TypeError(
                    f"`MultiTerm` expects `AbstractTerm` instances, but argument {i} "
                    f"is {term!r} of type {type(term).__name__}."
                )
        self.terms = tuple(terms)

    def vf(self, t, y, args):
        return tuple(term.vf(t, y, args) for term in self.terms)

    def contr(self, t0, t1, **kwargs):
        return tuple(term.contr(t0, t1, **kwargs) for term in self.terms)

    def prod(self, vf, control):
        outs = [
            term.prod(v, c) for term, v, c in zip(self.terms, vf, control, strict=True)
        ]
        return jtu.tree_map(lambda *xs: sum(xs[1:], xs[0]), *outs)

    def vf_prod(self, t, y, args, control):
        outs = [
            term.vf_prod(t, y, args, c)
            for term, c in zip(self.terms, control, strict=True)
        ]
        return jtu.tree_map(lambda *xs: sum(xs[1:], xs[0]), *outs)

    def is_vf_expensive(self, t0, t1, y, args) -> bool:
        return any(term.is_vf_expensive(t0, t1, y, args) for term in self.terms)


class _ForwardTimeTerm(AbstractTerm):
    """Presents a term in the time variable `tau = direction * t`, so that the solve
    loop always integrates forwards in `tau` even when `t1 < t0`. `direction=None`
    says that the solve is known at trace time to run forwards: times are then
    passed on as they are (the same values, and the same tracers, with no
    multiplications by a direction of 1 that XLA cannot drop)."""

    term: AbstractTerm
    direction: Any

    def _time(self, t):
        return t if self.direction is None else self.direction * t

    def vf(self, t, y, args):
        with scope("vector_field"):
            return self.term.vf(self._time(t), y, args)

    def contr(self, t0, t1, **kwargs):
        return self.term.contr(self._time(t0), self._time(t1), **kwargs)

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        with scope("vector_field"):
            return self.term.vf_prod(self._time(t), y, args, control)

    def is_vf_expensive(self, t0, t1, y, args) -> bool:
        return self.term.is_vf_expensive(self._time(t0), self._time(t1), y, args)


def scales_vector_field(terms) -> bool:
    """Whether `terms.prod(vf, control)` is the scalar control (the step's length)
    times `vf`, and `terms.vf_prod` the same product: an `ODETerm` that overrides
    neither, possibly presented in forward time."""
    if isinstance(terms, _ForwardTimeTerm):
        terms = terms.term
    return (
        isinstance(terms, ODETerm)
        and type(terms).prod is ODETerm.prod
        and type(terms).vf_prod is AbstractTerm.vf_prod
    )


def is_term(x: Any) -> bool:
    return isinstance(x, AbstractTerm)


def forward_time_terms(terms: PyTree[AbstractTerm], direction) -> PyTree[AbstractTerm]:
    """Wraps every term of a PyTree of terms so that time runs forwards.

    The structure is kept: a `MultiTerm` becomes a `MultiTerm` of wrapped parts (so
    that solvers for split or stochastic equations still find `terms.terms`), and
    tuples, lists and dicts keep their shape."""

    def _wrap(term):
        if isinstance(term, MultiTerm):
            return MultiTerm(*(_wrap(part) for part in term.terms))
        return _ForwardTimeTerm(term, direction)

    return jtu.tree_map(_wrap, terms, is_leaf=is_term)


def unwrap_is_ode(terms) -> bool:
    """Whether `terms` is (a forward-time wrapper of) a single `ODETerm`: not a
    `MultiTerm`, even one of ODE terms."""
    while isinstance(terms, _ForwardTimeTerm):
        terms = terms.term
    return isinstance(terms, ODETerm)
