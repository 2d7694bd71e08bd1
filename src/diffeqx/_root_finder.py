"""Root finders for the nonlinear systems of implicit solvers, and the tolerances they
take from the step-size controller."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import lineax as lx
import optimistix as optx


class _FromController:
    """Marks a root finder's `rtol`, `atol` or `norm` as taken from the solve's
    step-size controller."""

    def __repr__(self) -> str:
        return "<taken from `diffeqsolve(..., stepsize_controller=...)` argument>"

    def __eq__(self, other) -> bool:
        return isinstance(other, _FromController)

    def __hash__(self) -> int:
        return hash(_FromController)


FROM_CONTROLLER = _FromController()


class VeryChord(optx.AbstractRootFinder):
    """The chord method as implicit Runge–Kutta solvers use it: Newton's method with
    the Jacobian taken once, at the initial guess, and reused for every iteration.
    Iteration stops when the predicted distance to the root, estimated from the rate
    of convergence of successive corrections (Hairer & Wanner, *Solving ODEs II*,
    IV.8), is below `kappa` in the tolerance-scaled `norm`; a rate of 1 or more
    stops it as diverged.

    **Arguments:**

    - `rtol`, `atol`: relative and absolute tolerances, scaling each correction as
      `atol + rtol * |y|`.
    - `norm`: the norm of the scaled corrections (`optimistix.max_norm` by default).
    - `kappa`: the fraction of the tolerance the predicted error must reach.
    - `linear_solver`: the `lineax` solver for the linear systems (a dense LU
      factorisation by default for square systems).

    Inside implicit solvers it is usually created by
    `with_stepsize_controller_tols(VeryChord)()`, which takes `rtol`, `atol` and
    `norm` from the step-size controller.
    """

    rtol: Any
    atol: Any
    norm: Callable = optx.max_norm
    kappa: float = 1e-2
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)

    def _chord(self) -> optx.Chord:
        return optx.Chord(
            rtol=self.rtol,
            atol=self.atol,
            norm=self.norm,
            kappa=self.kappa,
            linear_solver=self.linear_solver,
            cauchy_termination=False,
        )

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self._chord().init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self._chord().step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        return self._chord().terminate(fn, y, args, options, state, tags)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self._chord().postprocess(
            fn, y, aux, args, options, state, tags, result
        )


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
            raise ValueError(
                f"The root finder of {type(solver).__name__} takes its `{name}` from "
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
