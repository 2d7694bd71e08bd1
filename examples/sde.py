"""Ornstein–Uhlenbeck sample paths: an SDE solved for many Brownian paths at once.

    dy = theta (mu - y) dt + sigma dW,    y(0) = y0

The noise is additive, so `ShARK` (strong order 1.5, using the space-time Lévy area
of each step) is the solver of choice. Each path has its own key; `jax.vmap` over
the keys solves them all in one compiled program. The sample mean and variance at the
save times are compared with the closed form

    E[y(t)]   = mu + (y0 - mu) exp(-theta t),
    Var[y(t)] = sigma² (1 - exp(-2 theta t)) / (2 theta),

and, when matplotlib is installed and `--plot` is given, a few paths are plotted with
the mean and a two-standard-deviation band.

Run with:  python examples/sde.py [--paths 4000] [--plot ou.png]
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import diffeqx as dfx  # noqa: E402

THETA, MU, SIGMA, Y0, T1 = 2.0, 1.0, 0.6, -1.0, 3.0


def sample_path(key, ts):
    bm = dfx.VirtualBrownianTree(
        0.0, T1, tol=1e-3, shape=(), key=key, levy_area=dfx.SpaceTimeLevyArea
    )
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: THETA * (MU - y)),
        dfx.ControlTerm(lambda t, y, args: SIGMA, bm),
    )
    sol = dfx.diffeqsolve(
        terms, dfx.ShARK(), 0.0, T1, 0.02, jnp.asarray(Y0), saveat=dfx.SaveAt(ts=ts)
    )
    return sol.ys


def exact_moments(ts):
    decay = jnp.exp(-THETA * ts)
    mean = MU + (Y0 - MU) * decay
    variance = SIGMA**2 * (1 - decay**2) / (2 * THETA)
    return mean, variance


def solve(num_paths=4000, seed=0):
    ts = jnp.linspace(0.0, T1, 31)
    keys = jr.split(jr.key(seed), num_paths)
    paths = jax.jit(jax.vmap(sample_path, in_axes=(0, None)))(keys, ts)
    return ts, paths


def plot(ts, paths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, variance = exact_moments(ts)
    band = 2 * jnp.sqrt(variance)
    fig, ax = plt.subplots(figsize=(6, 4))
    for sample in paths[:8]:
        ax.plot(ts, sample, lw=0.8, alpha=0.7)
    ax.plot(ts, mean, "k", lw=2, label="exact mean")
    ax.fill_between(ts, mean - band, mean + band, color="k", alpha=0.1, label="±2 sd")
    ax.set_xlabel("t")
    ax.set_ylabel("y")
    ax.set_title("Ornstein–Uhlenbeck sample paths (ShARK)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved the plot to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Ornstein–Uhlenbeck sample paths.")
    parser.add_argument("--paths", type=int, default=4000)
    parser.add_argument("--plot", default=None, help="save a plot of the paths here")
    options = parser.parse_args(argv)
    ts, paths = solve(options.paths)
    mean, variance = exact_moments(ts)
    sample_mean, sample_var = paths.mean(axis=0), paths.var(axis=0)
    print(f"{options.paths} paths; t, sample mean (exact), sample variance (exact):")
    for i in range(0, ts.shape[0], 6):
        print(
            f"  t={float(ts[i]):4.1f}  {float(sample_mean[i]):+.4f} "
            f"({float(mean[i]):+.4f})  {float(sample_var[i]):.4f} "
            f"({float(variance[i]):.4f})"
        )
    if options.plot:
        try:
            plot(ts, paths, options.plot)
        except ImportError:
            print("matplotlib is not installed: no plot")
    return ts, paths


if __name__ == "__main__":
    main()
