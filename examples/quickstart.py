"""Quick start: solve a damped harmonic oscillator and compare with its exact solution.

The oscillator  x'' + 2 zeta omega x' + omega^2 x = 0,  x(0) = 1, x'(0) = 0,
is written as a first-order system in y = (x, v) and solved with the Tsit5
Runge-Kutta method under an adaptive PID step-size controller. The solution is
saved at a handful of requested times and printed next to the closed form.

Run with:  python examples/quickstart.py
"""

import jax

# Accuracy comparisons below are made in double precision.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import diffeqx as dfx  # noqa: E402

OMEGA = 2.0  # natural angular frequency
ZETA = 0.1  # damping ratio (< 1: underdamped)


def oscillator(t, y, args):
    """Vector field of the damped oscillator as a first-order system."""
    del t
    omega, zeta = args
    x, v = y
    return jnp.stack([v, -2.0 * zeta * omega * v - omega**2 * x])


def exact_solution(t, omega, zeta):
    """Closed form for x(0) = 1, v(0) = 0 in the underdamped regime."""
    omega_d = omega * jnp.sqrt(1.0 - zeta**2)
    decay = jnp.exp(-zeta * omega * t)
    x = decay * (jnp.cos(omega_d * t) + (zeta * omega / omega_d) * jnp.sin(omega_d * t))
    v = -decay * (omega**2 / omega_d) * jnp.sin(omega_d * t)
    return jnp.stack([x, v], axis=-1)


def main():
    ts = jnp.linspace(0.0, 10.0, 11)
    y0 = jnp.array([1.0, 0.0])

    sol = dfx.diffeqsolve(
        dfx.ODETerm(oscillator),
        dfx.Tsit5(),
        t0=0.0,
        t1=10.0,
        dt0=0.1,
        y0=y0,
        args=(OMEGA, ZETA),
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
    )

    exact = exact_solution(ts, OMEGA, ZETA)
    error = jnp.max(jnp.abs(sol.ys - exact), axis=-1)

    rows = zip(ts.tolist(), sol.ys.tolist(), error.tolist(), strict=True)
    print(f"{'t':>6}  {'x(t)':>13}  {'v(t)':>13}  {'max |error|':>12}")
    for t, (x, v), err in rows:
        print(f"{t:6.2f}  {x:13.9f}  {v:13.9f}  {err:12.2e}")

    outcome = "successful" if dfx.is_successful(sol.result) else sol.result
    print()
    print(f"result:         {outcome}")
    print(f"steps taken:    {int(sol.stats['num_steps'])}")
    print(f"accepted steps: {int(sol.stats['num_accepted_steps'])}")
    print(f"rejected steps: {int(sol.stats['num_rejected_steps'])}")


if __name__ == "__main__":
    main()
