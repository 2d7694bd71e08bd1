"""Neural ODE: learn the vector field of a decaying spiral from its trajectories.

The data come from the linear system

    dy/dt = A y,    A = [[-0.1, 2.0], [-2.0, -0.1]],

which turns every initial condition into a spiral winding slowly inwards. A batch of
initial conditions is drawn at random, and the true system is solved with Tsit5 under
a PID step-size controller, saving each trajectory at 40 evenly spaced times in
[0, T]. A neural ODE

    dy/dt = f_theta(y),    f_theta an MLP,

is then fitted to those trajectories by minimising the mean squared error between its
own solutions (started from the same initial conditions, saved at the same times) and
the data. Each solve is written for one initial condition; `jax.vmap` batches it.

Gradients flow through the solver by the adjoint method chosen on the command line:
`--adjoint recursive` (the default) differentiates through the solver's own steps
with `RecursiveCheckpointAdjoint`; `--adjoint backsolve` solves the adjoint equations
backwards in time with `BacksolveAdjoint`, in memory that does not grow with the
number of steps.

Run with:  python examples/neural_ode.py  [--adjoint backsolve]
"""

import argparse
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import diffeqx as dfx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _adam import adam  # noqa: E402

DTYPE = jnp.float32  # explicit, so the example behaves alike with or without x64
TRUE_MATRIX = jnp.array([[-0.1, 2.0], [-2.0, -0.1]], DTYPE)


# ---- data -----------------------------------------------------------------------------


def true_field(t, y, args):
    del t, args
    return TRUE_MATRIX @ y


def make_trajectories(
    key, num_trajectories: int, length: int = 40, horizon: float = 5.0
):
    """Trajectories of the true system from random initial conditions.

    Returns `ts` of shape (length,) and `ys` of shape (num_trajectories, length, 2);
    `ys[:, 0]` are the initial conditions, drawn uniformly from the square [-1, 1]^2."""
    ts = jnp.linspace(0.0, horizon, length, dtype=DTYPE)
    y0s = jr.uniform(key, (num_trajectories, 2), DTYPE, minval=-1.0, maxval=1.0)

    def solve(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(true_field),
            dfx.Tsit5(),
            t0=ts[0],
            t1=ts[-1],
            dt0=ts[1] - ts[0],
            y0=y0,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
        )
        return sol.ys

    return ts, jax.jit(jax.vmap(solve))(y0s)


# ---- model ----------------------------------------------------------------------------


class VectorField(eqx.Module):
    """f_theta(y): an MLP from the state to its time derivative."""

    mlp: eqx.nn.MLP

    def __init__(self, size=2, width=32, depth=2, *, key):
        self.mlp = eqx.nn.MLP(
            size,
            size,
            width,
            depth,
            activation=jax.nn.softplus,
            dtype=DTYPE,
            key=key,
        )

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


def make_adjoint(name: str):
    """The adjoint method called `name` on the command line."""
    if name == "recursive":
        return dfx.RecursiveCheckpointAdjoint()
    if name == "backsolve":
        return dfx.BacksolveAdjoint()
    raise ValueError(f"unknown adjoint {name!r}: expected 'recursive' or 'backsolve'")


class NeuralODE(eqx.Module):
    field: VectorField
    adjoint: dfx.AbstractAdjoint

    def __init__(self, adjoint, *, key, **field_options):
        self.field = VectorField(key=key, **field_options)
        self.adjoint = adjoint

    def __call__(self, ts, y0):
        """The model's trajectory from one initial condition `y0`, saved at `ts`."""
        sol = dfx.diffeqsolve(
            dfx.ODETerm(self.field),
            dfx.Tsit5(),
            t0=ts[0],
            t1=ts[-1],
            dt0=ts[1] - ts[0],
            y0=y0,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
            adjoint=self.adjoint,
            max_steps=4096,
        )
        return sol.ys


# ---- training -------------------------------------------------------------------------


def mse(model, ts, ys):
    predictions = jax.vmap(model, in_axes=(None, 0))(ts, ys[:, 0])
    return jnp.mean((predictions - ys) ** 2)


def train(model, ts, ys, *, steps, batch_size, learning_rate, key, log, log_every):
    """Fits `model` to the trajectories `ys`; returns it and the loss at every step."""
    init, update = adam(learning_rate)
    opt_state = init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, opt_state, ys):
        value, grads = eqx.filter_value_and_grad(mse)(model, ts, ys)
        updates, opt_state = update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, value

    num_trajectories = ys.shape[0]
    history = []
    for step in range(steps):
        key, subkey = jr.split(key)
        index = jr.choice(subkey, num_trajectories, (batch_size,), replace=False)
        model, opt_state, value = train_step(model, opt_state, ys[index])
        history.append(float(value))
        if log and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {history[-1]:.6f}")
    return model, history


def main(
    num_trajectories=256,
    steps=500,
    batch_size=32,
    length=40,
    horizon=5.0,
    learning_rate=3e-3,
    width=32,
    depth=2,
    adjoint="recursive",
    seed=0,
    log=True,
    log_every=50,
):
    """Trains a neural ODE on spiral trajectories.

    Returns a dictionary with the training loss at every step (`"history"`), the loss
    of the trained model on the whole data set before and after training
    (`"initial_loss"`, `"final_loss"`) and the wall time taken (`"seconds"`)."""
    start = time.perf_counter()
    key_data, key_model, key_train = jr.split(jr.key(seed), 3)
    ts, ys = make_trajectories(key_data, num_trajectories, length, horizon)
    model = NeuralODE(make_adjoint(adjoint), width=width, depth=depth, key=key_model)
    evaluate = eqx.filter_jit(mse)
    initial_loss = float(evaluate(model, ts, ys))
    model, history = train(
        model,
        ts,
        ys,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        key=key_train,
        log=log,
        log_every=log_every,
    )
    final_loss = float(evaluate(model, ts, ys))
    seconds = time.perf_counter() - start
    if log:
        print(
            f"loss on all {num_trajectories} trajectories: {initial_loss:.6f} before, "
            f"{final_loss:.6f} after training ({initial_loss / final_loss:.0f}x lower; "
            f"{steps} steps, {adjoint} adjoint, {seconds:.1f} s)"
        )
    return {
        "history": history,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adjoint", choices=("recursive", "backsolve"), default="recursive"
    )
    options = parser.parse_args()
    main(steps=options.steps, seed=options.seed, adjoint=options.adjoint)
