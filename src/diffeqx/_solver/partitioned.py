"""Two fixed-step solvers outside the Runge–Kutta family: the semi-implicit
(symplectic) Euler method for a state split in two parts, each part driven by the
other, and the leapfrog/midpoint two-step method.

Both take a step from the values they are given, have no error estimate (so they run
with `ConstantStepSize` or `StepTo`), and give linear dense output.
"""

from typing import Any, ClassVar, final

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._path.local import LocalLinearInterpolation
from .._solution import RESULTS
from .._term import AbstractTerm
from .base import AbstractSolver


def _add(y, dy):
    """`y + dy` leaf by leaf, in `y`'s dtype (no implicit promotion)."""
    return jtu.tree_map(
        lambda a, b: a + jnp.asarray(b, dtype=jnp.result_type(a)), y, dy
    )


@final
class SemiImplicitEuler(AbstractSolver):
    """The semi-implicit (symplectic) Euler method, for a state `y = (y1, y2)` whose
    parts drive each other:

        dy1 = f1(t, y2) dt,    dy2 = f2(t, y1) dt,

    given as `terms=(term1, term2)` (e.g. two `ODETerm`s; any terms whose vector
    fields take the other part of the state), with `y0=(y1_0, y2_0)`. One step from
    `t0` to `t1` updates the first part from the second, then the second from the
    new first:

        y1_1 = y1_0 + f1(t0, y2_0) (t1 - t0),
        y2_1 = y2_0 + f2(t0, y1_1) (t1 - t0),

    each vector field at the step's start and times its own term's control. For a
    separable Hamiltonian system (`y1` the positions, `f1 = ∂H/∂p`; `y2` the momenta,
    `f2 = -∂H/∂q`) the map is symplectic: the energy error stays bounded over long
    solves instead of drifting. First order. Each part may be any PyTree. No error
    estimate, so fixed steps (`ConstantStepSize` or `StepTo`); linear dense output.
    """

    term_structure: ClassVar[Any] = (AbstractTerm, AbstractTerm)
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        term1, term2 = terms
        y1_0, y2_0 = y0
        y1_1 = _add(y1_0, term1.vf_prod(t0, y2_0, args, term1.contr(t0, t1)))
        y2_1 = _add(y2_0, term2.vf_prod(t0, y1_1, args, term2.contr(t0, t1)))
        y1 = (y1_1, y2_1)
        return y1, None, dict(y0=y0, y1=y1), None, RESULTS.successful

    def func(self, terms, t0, y0, args):
        term1, term2 = terms
        y1_0, y2_0 = y0
        return term1.vf(t0, y2_0, args), term2.vf(t0, y1_0, args)


@final
class LeapfrogMidpoint(AbstractSolver):
    """The leapfrog/midpoint method (as named by Shampine, 2009), a second-order
    explicit two-step method: with the previous point `(t_prev, y_prev)`,

        y1 = y_prev + f(t0, y0) (t1 - t_prev),

    the vector field at the current point times the control over both steps
    (`2 h f(t0, y0)` for constant steps `h`). The first step, whose previous point is
    its start, is Euler's. After a jump in the vector field (`made_jump`) the
    previous point is set aside and the step is Euler's again, so that no step
    reaches back across the discontinuity (Diffrax's method ignores `made_jump`).

    One vector-field evaluation per step; the solver state is the previous point.
    Weakly stable: on decaying problems a parasitic, sign-alternating component
    grows, so it suits oscillatory and conservative problems. Not to be confused with
    the explicit midpoint Runge–Kutta method (`Midpoint`). No error estimate, so
    fixed steps (`ConstantStepSize` or `StepTo`); linear dense output.
    """

    term_structure: ClassVar[Any] = AbstractTerm
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return t0, y0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        t_prev, y_prev = solver_state
        if made_jump is not False:
            t_prev, y_prev = jax.lax.cond(
                made_jump,
                lambda: (jnp.asarray(t0, jnp.result_type(t_prev)), y0),
                lambda: (t_prev, y_prev),
            )
        y1 = _add(y_prev, terms.vf_prod(t0, y0, args, terms.contr(t_prev, t1)))
        new_state = (jnp.asarray(t0, jnp.result_type(t_prev)), y0)
        return y1, None, dict(y0=y0, y1=y1), new_state, RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
