"""Stiff chemistry: Robertson's three-species reaction, solved with an implicit solver.

    A -> B          (rate 0.04)
    B + B -> C + B  (rate 3e7)
    B + C -> A + C  (rate 1e4)

The concentration of B stays below 4e-5 and relaxes on a time scale of about 1e-4,
while A turns into C over 1e5 time units: a classic stiff problem. `Kvaerno5`, an
implicit (ESDIRK) method, takes about 140 steps over the whole range, where an
explicit method's step size would be held down by stability all the way. The
species are saved at logarithmically spaced times and, when matplotlib is installed,
plotted on log-log axes (B scaled by 1e4 so that all three share the axes).

Run with:  python examples/stiff_chemistry.py [--plot robertson.png]
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import diffeqx as dfx  # noqa: E402


def robertson(t, y, args):
    """The reaction rates: dy/dt for y = (A, B, C)."""
    k1, k2, k3 = args
    a, b, c = y[0], y[1], y[2]
    return jnp.stack(
        [
            -k1 * a + k3 * b * c,
            k1 * a - k3 * b * c - k2 * b**2,
            k2 * b**2,
        ]
    )


def solve(t1=1e5, num_saves=60, rtol=1e-8, atol=1e-12):
    ts = jnp.logspace(-6, jnp.log10(t1), num_saves)
    return dfx.diffeqsolve(
        dfx.ODETerm(robertson),
        dfx.Kvaerno5(),
        t0=0.0,
        t1=t1,
        dt0=1e-6,
        y0=jnp.array([1.0, 0.0, 0.0]),
        args=(0.04, 3e7, 1e4),
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
    )


def plot(sol, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, scale) in enumerate((("A", 1.0), ("B x 1e4", 1e4), ("C", 1.0))):
        ax.loglog(sol.ts, scale * sol.ys[:, i], label=label)
    ax.set_xlabel("t")
    ax.set_ylabel("concentration")
    ax.set_title("Robertson's reaction (Kvaerno5)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved the plot to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Robertson's stiff reaction.")
    parser.add_argument("--plot", default=None, help="save a log-log plot here")
    options = parser.parse_args(argv)
    sol = solve()
    ys = sol.ys
    print(
        f"steps: {int(sol.stats['num_steps'])} "
        f"(rejected: {int(sol.stats['num_rejected_steps'])})"
    )
    print("      t            A            B            C      A+B+C-1")
    for t, y in list(zip(sol.ts.tolist(), ys.tolist(), strict=True))[::10]:
        print(f"{t:9.2e}  {y[0]:.5e}  {y[1]:.5e}  {y[2]:.5e}  {sum(y) - 1:+.1e}")
    if options.plot:
        try:
            plot(sol, options.plot)
        except ImportError:
            print("matplotlib is not installed: no plot")
    return sol


if __name__ == "__main__":
    main()
