"""A deterministic stand-in for Brownian motion that both libraries accept, so that an
SDE solve can be run through Diffrax and diffeqx on exactly the same increments and
Lévy areas (their Brownian trees sample differently, by design).

`polynomial_path(lib, shape, levy_area)` is an `AbstractBrownianPath` of `lib`
(`diffrax` or `diffeqx`) whose value is `W(t) = c t + a t² + b t³` per component. Its
space-time and space-time-time Lévy areas over `[s, t]` (width `h`) are those of that
curve's bridge, computed in closed form:

- `H = -a h²/6 - b (h³/12 + (2s + t) h²/6)`,
- `K = b h³/120` (the `c t` and `a t²` parts contribute nothing).

Only the arithmetic of the solvers is compared on such a path; its increments are not
Brownian (they scale like `h`, not `sqrt(h)`).
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np


def _coefficients(shape, seed=0):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape, dtype=int))
    c, a, b = (rng.uniform(-1.5, 1.5, size).reshape(shape) for _ in range(3))
    return c, a, b


def polynomial_path(lib, shape=(), levy_area=None, dtype=jnp.float64, seed=0):
    """A `lib.AbstractBrownianPath` on `[0, 10]` with the curve above; `levy_area` is
    the class (of `lib`) that `evaluate(..., use_levy=True)` returns."""
    levy_area = lib.BrownianIncrement if levy_area is None else levy_area
    c, a, b = _coefficients(shape, seed)

    class PolynomialPath(lib.AbstractBrownianPath):
        levy_area: type = eqx.field(static=True)
        shape: tuple = eqx.field(static=True)

        @property
        def t0(self):
            return 0.0

        @property
        def t1(self):
            return 10.0

        def _value(self, t):
            t = jnp.asarray(t, dtype)
            return (
                jnp.asarray(c, dtype) * t
                + jnp.asarray(a, dtype) * t**2
                + jnp.asarray(b, dtype) * t**3
            )

        def evaluate(self, t0, t1=None, left=True, use_levy=False):
            if t1 is None:
                return self._value(t0)
            w = self._value(t1) - self._value(t0)
            if not use_levy:
                return w
            s, t = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
            h = t - s
            dt = h
            fields = dict(dt=dt, W=w)
            if issubclass(self.levy_area, lib.AbstractSpaceTimeLevyArea):
                fields["H"] = -jnp.asarray(a, dtype) * h**2 / 6 - jnp.asarray(
                    b, dtype
                ) * (h**3 / 12 + (2 * s + t) * h**2 / 6)
            if issubclass(self.levy_area, lib.AbstractSpaceTimeTimeLevyArea):
                fields["K"] = jnp.asarray(b, dtype) * h**3 / 120
            return self.levy_area(**fields)

    return PolynomialPath(levy_area=levy_area, shape=shape)
