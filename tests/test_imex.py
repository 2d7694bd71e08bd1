"""IMEX solvers (`KenCarp3/4/5`, `Sil3`) and the additive engine behind them:
convergence order and dense output against a closed form, stiff parts with steps far
beyond the stiff scale, a split solve against the unsplit problem's reference, the
implicit half alone against its own ESDIRK, Jacobian reuse (`CalculateJacobian`),
`MultiButcherTableau` validation, and `jit`/`vmap`/`grad`/float32."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from diffeqx._profile import count_executions

IMEX = {
    "KenCarp3": (dfx.KenCarp3, 3),
    "KenCarp4": (dfx.KenCarp4, 4),
    "KenCarp5": (dfx.KenCarp5, 5),
    "Sil3": (dfx.Sil3, 2),
}
# Global order of dense output between steps: min(order, interpolant order + 1).
# KenCarp3's continuous extension is second order, KenCarp4/5's third; Sil3 uses a
# cubic Hermite polynomial.
_DENSE_ORDER = {"KenCarp3": 3, "KenCarp4": 4, "KenCarp5": 4, "Sil3": 2}
_TIGHT = dfx.VeryChord(rtol=1e-13, atol=1e-13)


# x'' = -x + cos(2t), split into its linear part (implicit) and its forcing
# (explicit).
def _oscillator_linear(t, y, args):
    return jnp.stack([y[1], -y[0]])


def _oscillator_forcing(t, y, args):
    return jnp.stack([jnp.zeros_like(y[0]), jnp.cos(2 * t)])


def _oscillator_exact(t):
    return np.array(
        [
            np.cos(t) + (np.cos(t) - np.cos(2 * t)) / 3,
            -np.sin(t) + (-np.sin(t) + 2 * np.sin(2 * t)) / 3,
        ]
    )


def _split(explicit, implicit):
    return dfx.MultiTerm(dfx.ODETerm(explicit), dfx.ODETerm(implicit))


def _slope(hs, errors):
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


_T1 = 4.0
_NS = (20, 40, 80, 160)
# Dense output is checked at the same fractions of every step at every step size.
_THETAS = (0.37, 0.81)


@pytest.mark.parametrize("name", list(IMEX))
def test_convergence_order_and_dense_output(name):
    cls, order = IMEX[name]
    num_queries = max(_NS)

    @jax.jit
    def solve(n):
        dt0 = _T1 / n.astype(jnp.float64)
        sol = dfx.diffeqsolve(
            _split(_oscillator_forcing, _oscillator_linear),
            cls(root_finder=_TIGHT),
            0.0,
            _T1,
            dt0,
            jnp.array([1.0, 0.0]),
            saveat=dfx.SaveAt(t1=True, dense=True),
        )
        step = (jnp.arange(num_queries) % n).astype(jnp.float64)
        ts = jnp.concatenate([(step + theta) * dt0 for theta in _THETAS])
        return sol.ys[-1], ts, jax.vmap(sol.evaluate)(ts)

    final, dense = [], []
    for n in _NS:
        y1, ts, ys = (np.asarray(x) for x in solve(jnp.asarray(n)))
        final.append(np.abs(y1 - _oscillator_exact(_T1)).max())
        dense.append(np.abs(ys - _oscillator_exact(ts).T).max())
    hs = [_T1 / n for n in _NS]
    assert abs(_slope(hs, final) - order) < 0.2, final
    assert abs(_slope(hs, dense) - _DENSE_ORDER[name]) < 0.2, dense


def _pr_stiff(t, y, args):
    # The stiff part of a Prothero–Robinson problem (eigenvalue -1e4) ...
    return -1e4 * (y - jnp.cos(t))


def _pr_forcing(t, y, args):
    # ... and its non-stiff forcing; the solution from y(0) = 1 is cos(t).
    return -jnp.sin(t) + jnp.zeros_like(y)


def _pr_unsplit(t, y, args):
    return _pr_stiff(t, y, args) + _pr_forcing(t, y, args)


def _zero(t, y, args):
    return jnp.zeros_like(y)


@pytest.mark.parametrize(
    # KenCarp4 against the closed form by default: its order and dense output.
    "name",
    ["KenCarp3", pytest.param("KenCarp4", marks=pytest.mark.slow), "KenCarp5"],
)
def test_stiff_part_with_steps_far_beyond_the_stiff_scale(name):
    cls, _ = IMEX[name]
    save = jnp.linspace(0.5, 2.0, 4)

    @jax.jit
    def errors(dt0):
        def error(terms):
            ys = dfx.diffeqsolve(
                terms,
                cls(root_finder=_TIGHT),
                0.0,
                2.0,
                dt0,
                jnp.array([1.0]),
                saveat=dfx.SaveAt(ts=save),
            ).ys
            return jnp.max(jnp.abs(ys[:, 0] - jnp.cos(save)))

        return error(_split(_pr_forcing, _pr_stiff)), error(_split(_zero, _pr_unsplit))

    # h * 1e4 = 1000 and 500: the L-stable, stiffly accurate implicit half damps the
    # stiff mode at once. The whole field in the implicit half leaves only the
    # stage-order error of the smooth solution; with the forcing explicit, its
    # stage errors are amplified by the stiff part (IMEX order reduction: measured
    # 2e-3 for KenCarp3, 3e-6 and 9e-6 for KenCarp4/5 at h = 0.1), but stay bounded
    # and shrink with the step.
    (split_coarse, whole_coarse), (split_fine, whole_fine) = (
        tuple(map(float, errors(jnp.asarray(h)))) for h in (0.1, 0.05)
    )
    assert whole_coarse < 1e-6 and whole_fine < whole_coarse
    assert split_coarse < 5e-3 and split_fine < split_coarse


# A 1-D reaction–diffusion problem: stiff diffusion (implicit), logistic growth
# (explicit). Split and unsplit are the same differential equation.
_N = 16
_DX = 1.0 / (_N + 1)


def _diffusion(t, u, args):
    padded = jnp.concatenate([jnp.zeros(1, u.dtype), u, jnp.zeros(1, u.dtype)])
    return 0.1 * (padded[2:] - 2 * u + padded[:-2]) / _DX**2


def _reaction(t, u, args):
    return u * (1 - u)


_U0 = jnp.sin(jnp.pi * jnp.linspace(_DX, 1 - _DX, _N)) ** 2


def test_split_solve_matches_the_unsplit_problem():
    reference = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, u, a: _diffusion(t, u, a) + _reaction(t, u, a)),
        dfx.Kvaerno5(),
        0.0,
        1.0,
        1e-3,
        _U0,
        stepsize_controller=dfx.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=10_000,
    ).ys[-1]
    for name in ("KenCarp4", "Sil3"):
        cls, _ = IMEX[name]
        sol = dfx.diffeqsolve(
            _split(_reaction, _diffusion),
            cls(),
            0.0,
            1.0,
            1e-3,
            _U0,
            stepsize_controller=dfx.PIDController(rtol=1e-7, atol=1e-9),
            max_steps=10_000,
        )
        assert dfx.is_successful(sol.result)
        np.testing.assert_allclose(
            np.asarray(sol.ys[-1]), np.asarray(reference), rtol=0, atol=2e-6
        )


class _KenCarp4Implicit(dfx.AbstractESDIRK, dfx.AbstractAdaptiveSolver):
    """KenCarp4's implicit half on its own, as a user-defined ESDIRK."""

    tableau: ClassVar = dfx.KenCarp4.tableau.tableaus[1]
    calculate_jacobian: ClassVar = dfx.CalculateJacobian.second_stage
    interpolation_cls: ClassVar = dfx.KenCarp4.interpolation_cls
    root_finder: dfx.VeryChord = _TIGHT
    root_find_max_steps: int = 10

    def order(self, terms):
        return 4


def test_zero_explicit_part_equals_the_implicit_tableau_alone():
    def field(t, y, args):
        return -1e3 * (y - jnp.cos(t)) - jnp.sin(t)

    common = dict(
        t0=0.0,
        t1=1.0,
        dt0=1e-3,
        y0=jnp.array([1.5]),
        saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 9)),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
    )
    split = dfx.diffeqsolve(
        _split(lambda t, y, a: jnp.zeros_like(y), field),
        dfx.KenCarp4(root_finder=_TIGHT),
        **common,
    )
    alone = dfx.diffeqsolve(dfx.ODETerm(field), _KenCarp4Implicit(), **common)
    # The same steps and values. Not to the bit: the implicit tableau alone is first
    # same as last (its first stage takes the previous step's last stage, the value
    # its root find settled on), where KenCarp4's explicit half is not, so the split
    # method evaluates its first stage afresh; the two differ by about the root
    # finder's tolerance.
    np.testing.assert_allclose(np.asarray(split.ys), np.asarray(alone.ys), rtol=1e-11)
    assert int(split.stats["num_steps"]) == int(alone.stats["num_steps"])
    assert int(split.stats["num_accepted_steps"]) == int(
        alone.stats["num_accepted_steps"]
    )


def _count_factorisations(solver, terms, y0):
    """LU factorisations a step performs (in stage loops: once per stage)."""

    def step(y):
        return solver.step(terms, 0.0, 0.1, y, None, None, False)[0]

    return count_executions(jax.make_jaxpr(step)(y0), "lu")


class _Kvaerno5EveryStage(dfx.AbstractESDIRK, dfx.AbstractAdaptiveSolver):
    tableau: ClassVar = dfx.Kvaerno5.tableau
    calculate_jacobian: ClassVar = dfx.CalculateJacobian.every_stage
    interpolation_cls: ClassVar = dfx.Kvaerno5.interpolation_cls
    root_finder: dfx.VeryChord = _TIGHT
    root_find_max_steps: int = 10

    def order(self, terms):
        return 5


def test_one_jacobian_factorisation_per_step_where_the_diagonal_allows():
    y0 = jnp.array([1.0, 0.0])
    ode = dfx.ODETerm(_oscillator_linear)
    split = _split(_oscillator_forcing, _oscillator_linear)
    assert _count_factorisations(dfx.Kvaerno5(root_finder=_TIGHT), ode, y0) == 1
    assert _count_factorisations(dfx.KenCarp4(root_finder=_TIGHT), split, y0) == 1
    # Differing diagonal entries (Sil3), or a method that asks for it: every stage.
    assert _count_factorisations(dfx.Sil3(root_finder=_TIGHT), split, y0) == 3
    assert _count_factorisations(_Kvaerno5EveryStage(), ode, y0) == 6
    # Reuse changes the iteration, not the answer: the same solution to the root
    # finder's tolerance.
    kwargs = dict(t0=0.0, t1=2.0, dt0=0.1, y0=y0)
    reused = dfx.diffeqsolve(ode, dfx.Kvaerno5(root_finder=_TIGHT), **kwargs).ys
    fresh = dfx.diffeqsolve(ode, _Kvaerno5EveryStage(), **kwargs).ys
    np.testing.assert_allclose(np.asarray(reused), np.asarray(fresh), atol=1e-12)


def test_reuse_needs_equal_diagonal_entries():
    class BadReuse(dfx.AbstractDIRK):
        tableau: ClassVar = dfx.Sil3.tableau
        calculate_jacobian: ClassVar = dfx.CalculateJacobian.second_stage
        interpolation_cls: ClassVar = dfx.Sil3.interpolation_cls
        term_structure: ClassVar = dfx.Sil3.term_structure
        root_finder: dfx.VeryChord = _TIGHT
        root_find_max_steps: int = 10

    with pytest.raises(ValueError, match="diagonal entry from there on equal"):
        BadReuse()


def test_multi_butcher_tableau_validation():
    explicit, implicit = dfx.KenCarp3.tableau.tableaus
    with pytest.raises(ValueError, match="same number of stages"):
        dfx.MultiButcherTableau(explicit, dfx.Kvaerno5.tableau)
    with pytest.raises(ValueError, match="At most one tableau"):
        dfx.MultiButcherTableau(implicit, implicit)
    # Different nodes are accepted, as in Diffrax: each term is evaluated at its own
    # tableau's nodes (tests/compat/test_runge_kutta_subclass.py).
    mixed = dfx.MultiButcherTableau(dfx.Heun.tableau, dfx.Midpoint.tableau)
    assert mixed.implicit_index is None
    with pytest.raises(TypeError, match="expects `ButcherTableau`s"):
        dfx.MultiButcherTableau(explicit, "not a tableau")
    assert dfx.KenCarp3.tableau.implicit_index == 1


def test_a_single_term_names_the_multiterm_it_needs():
    with pytest.raises(ValueError, match="MultiTerm"):
        dfx.diffeqsolve(
            dfx.ODETerm(_oscillator_linear),
            dfx.KenCarp4(),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0, 0.0]),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        )


def _parametrised_solve(rate, y0, dtype=jnp.float64):
    def stiff(t, y, args):
        return -args * (y - jnp.cos(t))

    def forcing(t, y, args):
        return -jnp.sin(t) + jnp.zeros_like(y)

    return dfx.diffeqsolve(
        _split(forcing, stiff),
        dfx.KenCarp3(root_finder=dfx.VeryChord(rtol=1e-10, atol=1e-10)),
        jnp.asarray(0.0, dtype),
        jnp.asarray(1.0, dtype),
        jnp.asarray(0.05, dtype),
        y0,
        args=rate,
    ).ys[-1]


@pytest.mark.slow  # the engine's gradients are tested by default with Kvaerno3
def test_grad_matches_finite_differences():
    y0 = jnp.array([2.0])

    def loss(rate, y0):
        return jnp.sum(_parametrised_solve(rate, y0) ** 2)

    rate = jnp.asarray(3.0)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(rate, y0)
    eps = 1e-6
    fd_rate = (loss(rate + eps, y0) - loss(rate - eps, y0)) / (2 * eps)
    fd_y0 = (loss(rate, y0 + eps) - loss(rate, y0 - eps)) / (2 * eps)
    np.testing.assert_allclose(float(grads[0]), float(fd_rate), rtol=1e-6)
    np.testing.assert_allclose(float(grads[1][0]), float(fd_y0), rtol=1e-6)


@pytest.mark.slow  # the engine under vmap/float32 is tested by default with Kvaerno
def test_vmap_over_parameters_equals_a_loop_and_float32():
    rates = jnp.array([1.0, 10.0, 100.0])
    y0 = jnp.array([2.0])
    batched = jax.vmap(_parametrised_solve, in_axes=(0, None))(rates, y0)
    looped = jnp.stack([_parametrised_solve(r, y0) for r in rates])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-12)

    single = _parametrised_solve(
        jnp.asarray(10.0, jnp.float32), jnp.array([2.0], jnp.float32), jnp.float32
    )
    assert single.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(single), np.asarray(looped[1]), rtol=1e-4)


class _MidpointWithExtraStages(dfx.AbstractDIRK):
    """The implicit midpoint rule (stage 0, diagonal 1/2; the solution is
    `y0 + k0`), followed by an explicit and another implicit stage that do not enter
    the solution: implicit stages that are not contiguous run unrolled."""

    tableau: ClassVar = dfx.ButcherTableau(
        c=np.array([0.5, 1.0]),
        b_sol=np.array([1.0, 0.0, 0.0]),
        b_error=None,
        a_lower=(np.array([0.5]), np.array([0.0, 0.5])),
        a_diagonal=np.array([0.5, 0.0, 0.5]),
        c1=0.5,
    )
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation
    root_finder: dfx.VeryChord = _TIGHT
    root_find_max_steps: int = 10

    def order(self, terms):
        return 2


def test_non_contiguous_implicit_stages():
    hs = [0.1, 0.05, 0.025]

    # The step size is traced: one compilation serves the three step sizes.
    @jax.jit
    def final(h):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: jnp.stack([y[1], -y[0]])),
            _MidpointWithExtraStages(),
            0.0,
            2.0,
            h,
            jnp.array([1.0, 0.0]),
        )
        return sol.ys[-1]

    def error(h):
        y1 = np.asarray(final(jnp.asarray(h)))
        return np.abs(y1 - np.array([np.cos(2.0), -np.sin(2.0)]))

    errors = [error(h).max() for h in hs]
    assert abs(_slope(hs, errors) - 2) < 0.2, errors
