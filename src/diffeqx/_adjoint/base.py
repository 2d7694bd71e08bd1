"""The adjoint protocol: how the solve loop is run and differentiated."""

import abc
import functools as ft
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
import jax.tree_util as jtu


class AbstractAdjoint(eqx.Module):
    """Base class for adjoints. An adjoint decides how the solve loop is run, and so
    how it is differentiated.

    `loop(run_loop, init_state, max_steps)` must return the final loop state;
    `run_loop(init_state, outer_while_loop, inner_while_loop)` runs the solve with the
    given while-loop implementations (each with the signature
    `(cond_fun, body_fun, init_val, *, max_steps, buffers) -> final_val`); its
    optional keyword `mark` is a function applied to every input the loop reads (the
    initial state and the fixed inputs it closes over) before it runs.
    """

    @abc.abstractmethod
    def loop(self, *, run_loop: Callable, init_state, max_steps: int | None):
        """Runs the solve loop and returns the final state."""

    def fixed_step_block(self, num_steps: int) -> int | None:
        """Whether (and how) a solve whose `num_steps` constant steps are known at
        trace time may run as a fixed-length scan instead of a while loop: `None`
        for no (the default, e.g. for adjoints with their own derivative rule), `0`
        for a plain scan, or `k > 0` to group the steps into rematerialised blocks
        of `k` steps for reverse mode."""
        return None


def while_loop_of_kind(kind: str, **kwargs) -> Callable:
    """A while loop with write-once buffers: `"lax"` (forward-mode differentiable),
    `"checkpointed"` (reverse-mode, with recursive checkpointing) or `"bounded"`
    (both modes, any order, cost growing with `max_steps`)."""
    return ft.partial(eqxi.while_loop, kind=kind, **kwargs)


class AbstractCustomGradientAdjoint(AbstractAdjoint):
    """An adjoint that defines the derivative of the whole solve itself (rather than
    differentiating the loop). `diffeqsolve` hands it the checked problem through
    `custom_solve(solve, problem)`, where `solve` is `diffeqsolve` and `problem` the
    dict of its arguments."""

    @abc.abstractmethod
    def custom_solve(self, solve: Callable, problem: dict):
        """Returns the `Solution`, with this adjoint's derivative rule attached."""


def closure_convert_terms(terms, t0, y0, args):
    """Makes the values that vector-field closures capture (e.g. parameters traced by
    an outer `jax.grad`) explicit leaves of the terms, so that a custom derivative
    rule can differentiate with respect to them."""
    from .._control_term import is_control_term
    from .._term import MultiTerm, ODETerm, is_term

    t0 = jnp.asarray(t0)

    def convert(term):
        if isinstance(term, MultiTerm):
            return MultiTerm(*(convert(sub) for sub in term.terms))
        if isinstance(term, ODETerm) or is_control_term(term):
            converted = eqx.filter_closure_convert(term.vector_field, t0, y0, args)
            return eqx.tree_at(lambda x: x.vector_field, term, converted)
        return term

    return jtu.tree_map(convert, terms, is_leaf=is_term)
