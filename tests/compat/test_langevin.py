"""ALIGN, ShOULD and QUICSORT through Diffrax and diffeqx on the same deterministic
driving path (`tests/compat/_sde_paths.py`: closed-form `W`, `H`, `K`), with
constant and adaptive steps.

Three differences are intentional and tested as such:

- *Coefficients for 1e-3 < gamma h < taylor_threshold.* Below the threshold
  (0.1 by default) Diffrax sums the coefficients' Taylor series to `h^5`, which
  leaves relative errors up to about `(gamma h)^5 / 720` (1.4e-8 in `a`, 5e-7 in
  the K weight at `gamma h = 0.1`); diffeqx sums enough terms for the dtype's
  rounding. Elsewhere both are exact to rounding, and the solves agree to 1e-12;
  in between they agree to the size of Diffrax's truncation.
- *float32 and lower precision.* From the threshold on Diffrax uses closed forms,
  which cancel for small `gamma h`; diffeqx sums the series below `gamma h = 1`
  (3 for the Lévy-area weights) whatever the threshold, and computes the
  coefficients in at least float32.
- *Backward solves.* Diffrax chooses between series and closed forms by the sign
  of `gamma h`, not its size, so the negative steps of a backward solve always
  use its truncated series (relative error 1.7e-2 in `exp(-gamma h)` at
  `gamma h = -2`); diffeqx chooses by `|gamma h|`. And diffeqx presents the Brownian motion in reversed time with
  `W` and `K` negated and `H` kept, which is what time reversal does to them (and
  makes the backward step the inverse of the forward one); Diffrax negates `H`
  too. With a path whose `H` is negated for Diffrax, the two agree to 1e-12.
"""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx

from ._sde_paths import polynomial_path

SOLVERS = ("ALIGN", "ShOULD", "QUICSORT")


def _levy(lib, name):
    return lib.SpaceTimeLevyArea if name == "ALIGN" else lib.SpaceTimeTimeLevyArea


def _grad(x, args):
    # Non-quadratic and coupled.
    return x**3 + x - 0.3 * x[::-1]


def _solve(lib, name, gamma, dt, *, adaptive=False, backwards=False, path=None):
    if path is None:
        path = polynomial_path(lib, (2,), _levy(lib, name), seed=2)
    gamma = jnp.asarray(gamma)
    u = jnp.asarray([1.3, 0.8])
    terms = lib.MultiTerm(
        lib.UnderdampedLangevinDriftTerm(gamma, u, _grad),
        lib.UnderdampedLangevinDiffusionTerm(gamma, u, path),
    )
    controller = (
        lib.PIDController(rtol=1e-3, atol=1e-3) if adaptive else lib.ConstantStepSize()
    )
    # Backwards, the friction amplifies: a shorter interval keeps the state bounded.
    t0, t1 = (1.0, 0.0) if backwards else (0.0, 3.0)
    sol = lib.diffeqsolve(
        terms,
        getattr(lib, name)(),
        t0,
        t1,
        -dt if backwards else dt,
        (jnp.asarray([0.5, -0.2]), jnp.asarray([0.1, 0.3])),
        saveat=lib.SaveAt(steps=True),
        stepsize_controller=controller,
        max_steps=512,
    )
    n = int(sol.stats["num_accepted_steps"])
    return dict(
        ts=np.asarray(sol.ts)[:n],
        x=np.asarray(sol.ys[0])[:n],
        v=np.asarray(sol.ys[1])[:n],
        stats={k: int(sol.stats[k]) for k in ("num_steps", "num_accepted_steps")},
        successful=bool(sol.result == lib.RESULTS.successful),
    )


def _assert_same(ours, theirs, rtol):
    assert ours["successful"] and theirs["successful"]
    assert ours["stats"] == theirs["stats"]
    np.testing.assert_allclose(ours["ts"], theirs["ts"], rtol=1e-13, atol=1e-13)
    for key in ("x", "v"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=rtol, atol=rtol)


# gamma h above the threshold everywhere (0.25 and 0.4), and far below it
# (1e-5): both libraries are exact to rounding there.
GAMMAS = {"closed-form": [2.5, 4.0], "series": [1e-4, 2e-4]}


CONSTANT_CASES = [(name, "closed-form") for name in SOLVERS] + [
    # ALIGN's series regime against Diffrax by default (gamma h = 0.05):
    # test_truncated_series_of_diffrax_is_the_only_difference_in_between.
    pytest.param("ALIGN", "series", marks=pytest.mark.slow),
    pytest.param("ShOULD", "series", marks=pytest.mark.slow),
    pytest.param("QUICSORT", "series", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, regime", CONSTANT_CASES)
def test_constant_steps_match_diffrax(name, regime):
    ours = _solve(diffeqx, name, GAMMAS[regime], 0.1)
    theirs = _solve(diffrax, name, GAMMAS[regime], 0.1)
    assert ours["stats"]["num_steps"] == 30
    _assert_same(ours, theirs, rtol=1e-12)


def test_adaptive_align_matches_diffrax():
    # gamma = 20: every step (the smallest is about 0.007) has gamma h above 0.1.
    ours = _solve(diffeqx, "ALIGN", [20.0, 25.0], 0.1, adaptive=True)
    theirs = _solve(diffrax, "ALIGN", [20.0, 25.0], 0.1, adaptive=True)
    assert ours["stats"]["num_steps"] > ours["stats"]["num_accepted_steps"] > 20
    _assert_same(ours, theirs, rtol=1e-12)


def _first_fast(first, *slow):
    """Parameters: `first` in the default run, the others in the slow one."""
    return [first, *(pytest.param(name, marks=pytest.mark.slow) for name in slow)]


@pytest.mark.parametrize("name", _first_fast("ALIGN", "ShOULD", "QUICSORT"))
def test_truncated_series_of_diffrax_is_the_only_difference_in_between(name):
    # gamma h = 0.05: Diffrax's series stops at h^5 (see the module docstring).
    ours = _solve(diffeqx, name, [0.5, 0.25], 0.1)
    theirs = _solve(diffrax, name, [0.5, 0.25], 0.1)
    assert ours["stats"] == theirs["stats"]
    for key in ("x", "v"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", _first_fast("ShOULD", "ALIGN", "QUICSORT"))
def test_float32_coefficients_do_not_cancel_where_diffrax_s_do(name):
    # gamma h = 0.1 and 0.15: from the threshold on Diffrax computes closed forms
    # that cancel in float32 (its K weight of ShOULD is off by up to 2.3 times its
    # value near 0.13); diffeqx sums the series there. Measured: diffeqx's float32
    # solves within 8e-7 of the float64 one, Diffrax's 3e-5 to 1.3e-4.
    def final(lib, dtype):
        path = polynomial_path(lib, (2,), _levy(lib, name), dtype=dtype, seed=2)
        gamma, u = jnp.asarray([0.2, 0.3], dtype), jnp.asarray([1.3, 0.8], dtype)
        terms = lib.MultiTerm(
            lib.UnderdampedLangevinDriftTerm(gamma, u, _grad),
            lib.UnderdampedLangevinDiffusionTerm(gamma, u, path),
        )
        t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, 3.0, 0.5))
        y0 = (jnp.asarray([0.5, -0.2], dtype), jnp.asarray([0.1, 0.3], dtype))
        sol = lib.diffeqsolve(terms, getattr(lib, name)(), t0, t1, dt0, y0)
        return np.concatenate([np.asarray(part[-1], np.float64) for part in sol.ys])

    exact = final(diffeqx, jnp.float64)
    np.testing.assert_allclose(final(diffrax, jnp.float64), exact, rtol=1e-12)
    assert np.max(np.abs(final(diffeqx, jnp.float32) - exact)) < 2e-6
    assert np.max(np.abs(final(diffrax, jnp.float32) - exact)) > 1e-5


class _HNegated(diffrax.AbstractBrownianPath):
    """A Diffrax path whose space-time Lévy area is negated."""

    path: diffrax.AbstractBrownianPath
    levy_area: type = eqx.field(static=True)
    shape: tuple = eqx.field(static=True)

    @property
    def t0(self):
        return self.path.t0

    @property
    def t1(self):
        return self.path.t1

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        out = self.path.evaluate(t0, t1, left, use_levy)
        if not use_levy:
            return out
        return eqx.tree_at(lambda levy: levy.H, out, -out.H)


# Solves backwards in time by default: ODEs against Diffrax (tests/compat/
# test_solves.py), SDEs against the exact step (test_srk.py::test_backwards_in_...).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ALIGN", "QUICSORT"])
def test_backward_solves_differ_from_diffrax_only_in_the_sign_of_h(name):
    # Small friction: Diffrax sums its (truncated) series whenever gamma h is below
    # the threshold, which for the negative steps of a backward solve is always;
    # at |gamma h| = 1e-5 the truncation is far below rounding.
    gamma = [1e-4, 2e-4]
    ours = _solve(diffeqx, name, gamma, 0.1, backwards=True)
    theirs = _solve(diffrax, name, gamma, 0.1, backwards=True)
    assert ours["stats"]["num_steps"] == 10
    assert not np.allclose(ours["x"], theirs["x"], rtol=1e-6)
    inner = polynomial_path(diffrax, (2,), _levy(diffrax, name), seed=2)
    flipped = _HNegated(inner, _levy(diffrax, name), (2,))
    theirs = _solve(diffrax, name, gamma, 0.1, backwards=True, path=flipped)
    np.testing.assert_allclose(ours["ts"], theirs["ts"], rtol=1e-13, atol=1e-13)
    for key in ("x", "v"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, atol=1e-12)
