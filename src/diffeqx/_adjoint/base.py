"""The adjoint protocol: how the solve loop is run and differentiated."""

import abc
import functools as ft
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi


class AbstractAdjoint(eqx.Module):
    """Base class for adjoints. An adjoint decides how the solve loop is run, and so
    how it is differentiated.

    `loop(run_loop, init_state, max_steps)` must return the final loop state;
    `run_loop(init_state, outer_while_loop, inner_while_loop)` runs the solve with the
    given while-loop implementations (each with the signature
    `(cond_fun, body_fun, init_val, *, max_steps, buffers) -> final_val`).
    """

    @abc.abstractmethod
    def loop(self, *, run_loop: Callable, init_state, max_steps: int | None):
        """Runs the solve loop and returns the final state."""


def while_loop_of_kind(kind: str, **kwargs) -> Callable:
    """A while loop with write-once buffers: `"lax"` (forward-mode differentiable),
    `"checkpointed"` (reverse-mode, with recursive checkpointing) or `"bounded"`
    (both modes, any order, cost growing with `max_steps`)."""
    return ft.partial(eqxi.while_loop, kind=kind, **kwargs)
