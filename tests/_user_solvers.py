"""Solvers written against the public solver protocol, as a user would write them.

Shared by the tests of user-written solvers. `heun_euler` is built for either library
(`diffeqx` or `diffrax`): the protocol is the same, so the compatibility tests run the
identical user code through both.
"""

from typing import ClassVar

import jax

import diffeqx as dfx


def axpy(a, x, y):
    """a * x + y, leafwise."""
    return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


class HandWrittenEuler(dfx.AbstractSolver):
    """Explicit Euler, written against the solver protocol by hand. Its `step` returns
    no error estimate, so it runs with constant step sizes only."""

    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1 = axpy(t1 - t0, terms.vf(t0, y0, args), y0)
        return y1, None, dict(y0=y0, y1=y1), None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def heun_euler(lib=dfx, base: str = "AbstractAdaptiveSolver", order: int = 2):
    """Heun's method with an embedded Euler step as error estimate, subclassing
    `lib.<base>` (`AbstractAdaptiveSolver`, or `AbstractSolver`: adaptivity comes from
    returning an estimate, not from the base class)."""

    class HeunEuler(getattr(lib, base)):
        term_structure: ClassVar = lib.AbstractTerm
        interpolation_cls: ClassVar = lib.LocalLinearInterpolation

        def order(self, terms):
            return order

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            dt = t1 - t0
            k1 = terms.vf(t0, y0, args)
            k2 = terms.vf(t1, axpy(dt, k1, y0), args)
            y1 = jax.tree_util.tree_map(
                lambda y, a, b: y + 0.5 * dt * (a + b), y0, k1, k2
            )
            y_error = jax.tree_util.tree_map(lambda a, b: 0.5 * dt * (b - a), k1, k2)
            return y1, y_error, dict(y0=y0, y1=y1), None, lib.RESULTS.successful

        def func(self, terms, t0, y0, args):
            return terms.vf(t0, y0, args)

    return HeunEuler()
