"""Root finders for the nonlinear systems of implicit solvers, and the tolerances they
take from the step-size controller."""

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx

from ._solution import promote_result, succeeded, where_result


class _FromController:
    """Marks a root finder's `rtol`, `atol` or `norm` as taken from the solve's
    step-size controller."""

    def __repr__(self) -> str:
        return "<the solve's stepsize_controller's>"

    def __eq__(self, other) -> bool:
        return isinstance(other, _FromController)

    def __hash__(self) -> int:
        return hash(_FromController)


FROM_CONTROLLER = _FromController()


class _ChordState(eqx.Module):
    linear_state: Any  # the factorised Jacobian at the initial guess
    aux: Any
    num_steps: Any
    diffsize: Any  # the last correction, tolerance-scaled
    diffsize_prev: Any
    at_precision: Any  # the last correction is at the rounding level of the iterate
    result: Any


# lineax's Krylov solvers: they apply the operator by matrix-vector products only.
# (`lineax.NormalCG` is a function returning a `CG`.)
_MATRIX_FREE = tuple(
    cls for cls in (lx.GMRES, lx.BiCGStab, lx.CG) if isinstance(cls, type)
)


def is_matrix_free(solver) -> bool:
    """Whether the `lineax` solver needs only products with the operator (no matrix,
    no diagonals)."""
    return isinstance(solver, _MATRIX_FREE)


def _as_tags(tags) -> frozenset:
    if isinstance(tags, frozenset):
        return tags
    if isinstance(tags, (set, tuple, list)):
        return frozenset(tags)
    return frozenset([tags])


def _without_aux(fn):
    return lambda y, args: fn(y, args)[0]


@final
class VeryChord(optx.AbstractRootFinder):
    """The chord method as implicit Runge–Kutta solvers use it: Newton's method with
    the Jacobian computed and factorised once, at the initial guess, and reused for
    every iteration.

    Stopping (Hairer & Wanner, *Solving ODEs II*, IV.8): with `theta` the ratio of
    two successive tolerance-scaled corrections, iteration stops as converged when
    the predicted remaining error `theta / (1 - theta) * |correction|` is below
    `kappa`, or as soon as a correction is at the rounding level of the iterate (a
    linear problem is then solved in one iteration); it stops as diverged when
    `theta >= 1` short of that, or when an iterate is not finite. Corrections are
    scaled by `atol + rtol * |y|` and measured with `norm`.

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerances.
    - `norm`: the norm of the scaled corrections (`optimistix.max_norm` by default).
    - `kappa`: the fraction of the tolerance the predicted error must reach.
    - `linear_solver`: the `lineax` solver for the linear systems (for a square
      system, by default, a dense LU factorisation). A Krylov solver
      (`lineax.GMRES`, `lineax.BiCGStab`, ...) uses Jacobian–vector products only,
      from one linearisation per solve: no matrix is formed.
    - `tags`: `lineax` structure tags of the Jacobian of the system (for implicit
      Runge–Kutta stages, `I - a_ii h J`), e.g. `lineax.tridiagonal_tag` or
      `lineax.diagonal_tag`, with a matching `linear_solver` (`lineax.Tridiagonal()`,
      `lineax.Diagonal()`): the Jacobian's diagonals are then built from three or
      one Jacobian–vector products, not from a full matrix. The structure must
      hold; it is not checked.

    Passing `options=dict(init_state=state)`, with `state` the result of an earlier
    `init`, reuses that factorised Jacobian instead of computing a new one: the
    diagonally implicit solvers do this across the stages of a step (see
    `CalculateJacobian`).

    Inside implicit solvers it is usually created by
    `with_stepsize_controller_tols(VeryChord)()`, which takes `rtol`, `atol` and
    `norm` from the step-size controller.
    """

    rtol: Any
    atol: Any
    norm: Callable = optx.max_norm
    kappa: float = 1e-2
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    tags: Any = eqx.field(default=frozenset(), static=True)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        reused = options.get("init_state") if options else None
        if isinstance(reused, _ChordState):
            # The factorised Jacobian of an earlier, related system (an earlier
            # stage of the same step), reused as the chord matrix.
            linear_state = reused.linear_state
        else:
            tags = frozenset(tags) | _as_tags(self.tags)
            jacobian = lx.JacobianLinearOperator(_without_aux(fn), y, args, tags=tags)
            if is_matrix_free(self.linear_solver):
                # Linearised once: every Krylov iteration is then one
                # Jacobian-vector product without re-evaluating the function.
                jacobian = lx.linearise(jacobian)
            linear_state = self.linear_solver.init(jacobian, {})
        dtype = jnp.result_type(*jtu.tree_leaves(y)) if jtu.tree_leaves(y) else float
        # The sizes of corrections are real, also for a complex state.
        inf = jnp.asarray(jnp.inf, jnp.finfo(dtype).dtype)
        return _ChordState(
            linear_state=linear_state,
            aux=jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct),
            num_steps=jnp.asarray(0),
            diffsize=inf,
            diffsize_prev=inf,
            at_precision=jnp.asarray(False),
            result=optx.RESULTS.successful,
        )

    def step(self, fn, y, args, options, state, tags):
        residual, aux = fn(y, args)
        correction, linear_result, _ = self.linear_solver.compute(
            state.linear_state, residual, {}
        )
        new_y = jtu.tree_map(lambda a, b: (a - b).astype(a.dtype), y, correction)
        scale = jtu.tree_map(lambda x: self.atol + self.rtol * jnp.abs(x), new_y)
        diffsize = self.norm(
            jtu.tree_map(lambda d, w: d / w.astype(d.dtype), correction, scale)
        )
        noise = self.norm(
            jtu.tree_map(
                lambda x, w: jnp.finfo(x.dtype).eps * jnp.abs(x) / w, new_y, scale
            )
        )
        result = where_result(
            succeeded(linear_result),
            optx.RESULTS.successful,
            promote_result(linear_result, optx.RESULTS),
        )
        new_state = _ChordState(
            linear_state=state.linear_state,
            aux=aux,
            num_steps=state.num_steps + 1,
            diffsize=diffsize.astype(state.diffsize.dtype),
            diffsize_prev=state.diffsize,
            at_precision=diffsize <= 10 * noise,
            result=result,
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        rate = state.diffsize / state.diffsize_prev
        converged = (
            (state.num_steps >= 2)
            & (rate < 1)
            & (state.diffsize * rate / (1 - rate) < self.kappa)
        )
        converged = converged | ((state.num_steps >= 1) & state.at_precision)
        diverged = ((state.num_steps >= 2) & (rate >= 1) & ~converged) | ~jnp.isfinite(
            state.diffsize
        ) & (state.num_steps >= 1)
        failed = ~succeeded(state.result)
        result = where_result(
            failed,
            state.result,
            where_result(
                diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
            ),
        )
        return converged | diverged | failed, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {"num_steps": state.num_steps}


def with_stepsize_controller_tols(cls: type) -> Callable[..., Any]:
    """`with_stepsize_controller_tols(cls)(**kwargs)` is the root finder
    `cls(rtol=..., atol=..., norm=..., **kwargs)` whose `rtol`, `atol` and `norm` are
    taken from the step-size controller of the solve it is used in (the controller's
    `rtol`, `atol` and `norm`). A solve whose controller has no tolerances (e.g.
    `ConstantStepSize`) then raises an error asking for a root finder with its own."""

    def make(**kwargs):
        return cls(
            rtol=FROM_CONTROLLER, atol=FROM_CONTROLLER, norm=FROM_CONTROLLER, **kwargs
        )

    return make


def _uses_controller_tols(root_finder) -> bool:
    return any(
        getattr(root_finder, name, None) is FROM_CONTROLLER
        for name in ("rtol", "atol", "norm")
    )


def resolve_root_finder_tols(solver, controller):
    """The solver with the tolerances its root finder takes from the controller filled
    in (see `with_stepsize_controller_tols`); unchanged if it takes none."""
    root_finder = getattr(solver, "root_finder", None)
    if root_finder is None or not _uses_controller_tols(root_finder):
        return solver
    values = {}
    for name in ("rtol", "atol", "norm"):
        if getattr(root_finder, name, None) is not FROM_CONTROLLER:
            continue
        value = getattr(controller, name, None)
        if value is None:
            # Opens with Diffrax's words for the same error, which users search.
            raise ValueError(
                "The tolerances for the implicit solver have not been specified: "
                f"the root finder of {type(solver).__name__} takes its `{name}` from "
                f"the step-size controller, but {type(controller).__name__} has none. "
                "Pass a root finder with its own tolerances, e.g. "
                f"`{type(solver).__name__}(root_finder=diffeqx.VeryChord(rtol=1e-6, "
                "atol=1e-6))`, or use an adaptive controller such as "
                "`PIDController(rtol=..., atol=...)`."
            )
        values[name] = value
    names = list(values)
    root_finder = eqx.tree_at(
        lambda r: [getattr(r, n) for n in names],
        root_finder,
        [values[n] for n in names],
        is_leaf=lambda x: x is FROM_CONTROLLER,
    )
    return eqx.tree_at(lambda s: s.root_finder, solver, root_finder)
