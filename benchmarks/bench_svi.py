"""Distributed SVI (raybayes.fit_svi) vs NumPyro's published SVI recipe: time to target.

Simulates ``--categories x --products x --weeks`` rows with known elasticities
(:func:`raybayes.datasets.simulate_elasticity`) and, in one run:

* sets the target: ``--target-factor`` (1.2) x the RMSE of the raybayes MAP
  (:func:`raybayes.optim.fit_map`, timed separately, part of neither contestant),
  or ``--target`` directly;
* raybayes: ``raybayes.fit_svi`` on ``--workers`` shard workers (``--backend``),
  evaluated every ``--eval-every`` steps by a callback (the callback's time is not
  counted by ``info.elapsed_s``); it stops at the target or ``--max-steps``. Its
  times include ``fit_svi``'s set-up (plan, workers, data), as the peer's include
  its init and JIT compilation;
* the peer, the published NumPyro recipe: ``SVI`` with ``AutoNormal``,
  ``RenyiELBO(num_particles=4)`` and ``optax.adamw`` on
  ``optax.exponential_decay(0.01, 1000, 0.99, end_value=1e-5)``, run in jitted
  blocks of ``--peer-block`` steps (``lax.fori_loop`` over ``svi.update``),
  evaluated between blocks outside the timed region, until the target or
  ``--peer-budget-s`` of timed wall time. JIT compilation counts in its time and is
  also reported separately.

The RMSE is that of the posterior-mean product elasticities ``beta`` (mean of
``--draws`` guide draws) against the truth. Both contestants use the same
(non-centred) ``elasticity_model``. Prints each contestant's RMSE-vs-time
trajectory, its time to the target and the ratio peer / raybayes.

Usage:
    python benchmarks/bench_svi.py --products 10000 --workers 2 --backend ray
    python benchmarks/bench_svi.py --products 200 --peer-budget-s 30 --skip-ours
    python benchmarks/bench_svi.py --products 10000 --target 0.33 --out svi.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Predictive, RenyiELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.optim import optax_to_numpyro

from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.models.elasticity import elasticity_model

MODEL = elasticity_model  # already non-centred; not wrapped in reparam again


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def _version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------- target


def run_map(kwargs, true_beta, args):
    from raybayes.optim import fit_map

    start = time.perf_counter()
    res = fit_map(
        MODEL,
        model_kwargs=kwargs,
        num_shards=args.map_shards,
        backend=args.map_backend,
        tol=args.map_tol,
        max_steps=args.map_max_iter,
        progress_bar=args.progress,
    )
    wall = time.perf_counter() - start
    map_beta = np.asarray(res.params["beta"])
    return dict(
        rmse=rmse(map_beta, true_beta),
        wall_s=wall,
        optim_s=res.time_s,
        iterations=res.num_iterations,
        status=res.status,
    )


# ----------------------------------------------------------------------------- raybayes


def run_ours(kwargs, true_beta, target, args):
    import raybayes

    trajectory = []  # (elapsed_s, step, rmse, loss)

    def callback(info):
        draws = info.sample_posterior(args.draws, seed=0, var_names=("beta",))
        beta = np.asarray(draws["beta"]).reshape(args.draws, -1).mean(0)
        r = rmse(beta, true_beta)
        trajectory.append((float(info.elapsed_s), int(info.step), r, float(info.loss)))
        if args.progress:
            print(
                f"  raybayes step {int(info.step):6d}  "
                f"fit {float(info.elapsed_s):8.2f} s  "
                f"loss {float(info.loss):.6g}  RMSE {r:.4f}",
                flush=True,
            )
        over_budget = (
            args.ours_budget_s is not None and info.elapsed_s >= args.ours_budget_s
        )
        return bool(r <= target or over_budget)

    start = time.perf_counter()
    result = raybayes.fit_svi(
        MODEL,
        model_kwargs=kwargs,
        num_shards=args.workers,
        backend=args.backend,
        guide=args.guide,
        subsample_size=args.subsample_size,
        num_particles=args.num_particles,
        learning_rate=args.lr,
        num_steps=args.max_steps,
        tol=args.tol,  # None: no convergence stop; the callback stops at the target
        seed=0,
        num_samples=args.draws,
        progress_bar=False,
        callback=callback,
        callback_every=args.eval_every,
    )
    wall = time.perf_counter() - start
    if not trajectory or trajectory[-1][1] != int(result.num_steps):
        # The fit ended between two callbacks: evaluate its final draws too.
        draws = result.sample_posterior(args.draws, var_names=["beta"])
        beta = np.asarray(draws["beta"]).reshape(args.draws, -1).mean(0)
        losses = np.asarray(result.losses)
        trajectory.append(
            (
                float(result.time_s),
                int(result.num_steps),
                rmse(beta, true_beta),
                float(losses[-1]) if losses.size else float("nan"),
            )
        )
    # info.elapsed_s counts the optimisation only; the peer's clock includes its
    # init and JIT compilation, so ours includes the set-up (plan, workers, data).
    setup = float(getattr(result, "setup_s", 0.0))
    return dict(
        trajectory=[(t + setup, step, r, loss) for t, step, r, loss in trajectory],
        time_s=float(result.time_s) + setup,
        fit_s=float(result.time_s),
        setup_s=setup,
        steps=int(result.num_steps),
        stop_reason=getattr(result, "stop_reason", "?"),
        wall_s=wall,
    )


# ----------------------------------------------------------------------------- peer


def _split_kwargs(kwargs):
    """(array arguments, static arguments) of the model's keyword arguments."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    return arrays, static


def _beta_kwargs(kwargs):
    """Model arguments that compute ``beta`` cheaply: ``beta`` depends on the latent
    sites and ``category_of_product`` only, so the observation arrays are cut to one
    row (the model then samples one predictive ``units`` instead of N)."""
    out = dict(kwargs)
    for name in ("log_price", "product_idx", "time_idx"):
        out[name] = np.asarray(kwargs[name])[:1]
    out["units"] = None
    return out


def run_peer(kwargs, true_beta, target, args):
    """The published recipe: AutoNormal, RenyiELBO(4 particles), adamw on an
    exponentially decaying learning rate."""
    guide = AutoNormal(MODEL)
    schedule = optax.exponential_decay(
        init_value=0.01, transition_steps=1000, decay_rate=0.99, end_value=1e-5
    )
    optim = optax_to_numpyro(optax.adamw(schedule))
    svi = SVI(MODEL, guide, optim, RenyiELBO(num_particles=4))
    block = int(args.peer_block)

    beta_kwargs = _beta_kwargs(kwargs)

    @jax.jit
    def beta_draws(rng_key, params):
        k1, k2 = jax.random.split(rng_key)
        post = guide.sample_posterior(k1, params, sample_shape=(args.draws,))
        if "beta" in post:
            return post["beta"]
        pred = Predictive(MODEL, posterior_samples=post, return_sites=["beta"])
        return pred(k2, **beta_kwargs)["beta"]

    def evaluate(state):
        beta = np.asarray(beta_draws(jax.random.PRNGKey(1), svi.get_params(state)))
        return rmse(beta.reshape(args.draws, -1).mean(0), true_beta)

    # ---- timed: data to the device, init (trace + compile), then blocks of steps
    start = time.perf_counter()
    arrays, static = _split_kwargs(kwargs)
    arrays = jax.device_put(arrays)

    def run_block(state, arrays):
        def body(_, carry):
            state, loss_sum = carry
            state, loss = svi.update(state, **arrays, **static)
            return state, loss_sum + loss

        zero = jnp.zeros((), jnp.result_type(float))
        state, loss_sum = jax.lax.fori_loop(0, block, body, (state, zero))
        return state, loss_sum / block

    run_block = jax.jit(run_block)
    state = svi.init(jax.random.PRNGKey(0), **arrays, **static)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start

    elapsed, steps = init_s, 0
    trajectory, block_s = [], []
    while True:
        t0 = time.perf_counter()
        state, mean_loss = run_block(state, arrays)
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        # ---- not timed: evaluation
        elapsed += dt
        steps += block
        block_s.append(dt)
        r = evaluate(state)
        trajectory.append((elapsed, steps, r, float(mean_loss)))
        if args.progress:
            print(
                f"  peer step {steps:6d}  {elapsed:8.2f} s  block {dt:6.2f} s  "
                f"mean loss {float(mean_loss):.6g}  RMSE {r:.4f}",
                flush=True,
            )
        if r <= target or elapsed >= args.peer_budget_s:
            break
    steady = float(np.median(block_s[1:])) if len(block_s) > 1 else float("nan")
    return dict(
        trajectory=trajectory,
        time_s=elapsed,
        steps=steps,
        init_s=init_s,
        first_block_s=block_s[0],
        steady_block_s=steady,
        compile_s=init_s + block_s[0] - steady,  # nan when only one block ran
        steps_per_s=block / steady if steady == steady else block / block_s[0],
    )


# ----------------------------------------------------------------------------- report


def time_to_target(trajectory, target):
    for elapsed, step, r, _ in trajectory:
        if r <= target:
            return elapsed, step
    return None


def thin(trajectory, target, max_rows):
    """At most ``max_rows`` rows, evenly spaced, keeping the first and the last row
    and the first row that reaches the target."""
    n = len(trajectory)
    if n <= max_rows:
        return list(range(n))
    keep = set(np.linspace(0, n - 1, max_rows).round().astype(int).tolist())
    hit = [i for i, row in enumerate(trajectory) if row[2] <= target]
    if hit:
        keep.add(hit[0])
    return sorted(keep)


def trajectory_table(trajectory, target, max_rows):
    lines = ["| wall s | steps | RMSE(beta) | loss |", "|---:|---:|---:|---:|"]
    for i in thin(trajectory, target, max_rows):
        elapsed, step, r, loss = trajectory[i]
        mark = " *" if r <= target else ""
        lines.append(f"| {elapsed:.2f} | {step} | {r:.4f}{mark} | {loss:.6g} |")
    return lines


def reach_line(name, run, target):
    hit = time_to_target(run["trajectory"], target)
    if hit is not None:
        return (
            f"{name}: reached RMSE <= {target:.4f} in **{hit[0]:.2f} s** "
            f"({hit[1]} steps)"
        )
    return (
        f"{name}: **not reached** in {run['time_s']:.1f} s ({run['steps']} steps), "
        f"RMSE at end {run['trajectory'][-1][2]:.4f}"
    )


def ratio_line(peer, ours, target):
    p = time_to_target(peer["trajectory"], target)
    o = time_to_target(ours["trajectory"], target)
    if p is not None and o is not None:
        return f"time to target, peer / raybayes: **{p[0] / o[0]:.2f}x**"
    if o is not None:
        return (
            f"time to target, peer / raybayes: **>= {peer['time_s'] / o[0]:.2f}x** "
            f"(peer not reached in {peer['time_s']:.1f} s)"
        )
    if p is not None:
        return (
            f"time to target, peer / raybayes: **<= {p[0] / ours['time_s']:.2f}x** "
            f"(raybayes not reached in {ours['time_s']:.1f} s)"
        )
    return "time to target, peer / raybayes: n/a (neither reached the target)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--weeks", type=int, default=156)
    # target
    parser.add_argument(
        "--target", type=float, default=None, help="target RMSE; skips the MAP fit"
    )
    parser.add_argument(
        "--target-factor",
        type=float,
        default=1.2,
        help="target = this x the RMSE of the MAP",
    )
    parser.add_argument("--map-shards", type=int, default=2)
    parser.add_argument("--map-backend", default="local")
    parser.add_argument("--map-tol", type=float, default=1e-8)
    parser.add_argument("--map-max-iter", type=int, default=500)
    # raybayes
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", default="ray", choices=("ray", "local"))
    parser.add_argument("--guide", default="normal", choices=("normal", "lowrank"))
    parser.add_argument(
        "--subsample-size",
        type=lambda s: None if s.lower() == "none" else int(s),
        default=None,
        help="products per shard per step ('none': all, the default)",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--num-particles", type=int, default=1)
    parser.add_argument(
        "--tol",
        type=float,
        default=None,
        help="fit_svi's ELBO-convergence tol (default None: run to the target)",
    )
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--ours-budget-s",
        type=float,
        default=None,
        help="stop raybayes at the first evaluation after this many seconds",
    )
    # peer
    parser.add_argument(
        "--peer-block",
        type=int,
        default=500,
        help="peer steps per jitted block (evaluated between blocks)",
    )
    parser.add_argument("--peer-budget-s", type=float, default=600.0)
    # common
    parser.add_argument(
        "--draws",
        type=int,
        default=100,
        help="guide draws for the posterior mean of beta",
    )
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--max-rows", type=int, default=15, help="rows of each trajectory table"
    )
    parser.add_argument(
        "--out", default=None, help="also write the summary as Markdown here"
    )
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    df, truth = simulate_elasticity(args.categories, args.products, args.weeks, seed=0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    kwargs = data.model_kwargs()
    true_beta = truth["beta"][data.products["product"].to_numpy()]

    lines = ["# Distributed SVI vs NumPyro's SVI recipe: time to a target RMSE", ""]

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    out(
        f"data: {args.categories} categories x {args.products} products x {args.weeks} "
        f"weeks = {data.num_obs:,} rows; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores; jax {jax.__version__}, "
        f"numpyro {numpyro.__version__}, "
        f"optax {optax.__version__}, ray {_version('ray')}"
    )
    out()
    if args.target is not None:
        target = float(args.target)
        out(f"target RMSE(beta): {target:.4f} (given by --target; MAP not fitted)")
    else:
        fit = run_map(kwargs, true_beta, args)
        target = args.target_factor * fit["rmse"]
        out(
            f"target RMSE(beta): {target:.4f} = {args.target_factor} x MAP RMSE "
            f"{fit['rmse']:.4f}; "
            f"MAP (raybayes fit_map, {args.map_shards} shards, {args.map_backend}) "
            f"{fit['wall_s']:.1f} s wall (L-BFGS {fit['optim_s']:.1f} s, "
            f"{fit['iterations']} it, {fit['status']})"
        )
    out()

    ours = peer = None
    if not args.skip_ours:
        ours = run_ours(kwargs, true_beta, target, args)
        sub = "all" if args.subsample_size is None else args.subsample_size
        out(
            f"## raybayes fit_svi: {args.workers} workers ({args.backend}), guide "
            f"{args.guide}, subsample {sub} products/shard/step, lr {args.lr}, "
            f"evaluated every {args.eval_every} steps"
        )
        out()
        for line in trajectory_table(ours["trajectory"], target, args.max_rows):
            out(line)
        out()
        out(
            f"{ours['steps']} steps ({ours['stop_reason']}) in "
            f"{ours['time_s']:.2f} s = "
            f"set-up {ours['setup_s']:.2f} s + fit {ours['fit_s']:.2f} s "
            f"({ours['steps'] / ours['fit_s']:.1f} steps/s incl. JIT compile); times "
            f"in the table include the set-up; call wall time with evaluations and "
            f"final draws {ours['wall_s']:.2f} s"
        )
        out(reach_line("raybayes", ours, target))
        out()
    if not args.skip_peer:
        peer = run_peer(kwargs, true_beta, target, args)
        out(
            f"## peer: NumPyro SVI, AutoNormal, RenyiELBO(num_particles=4), adamw on "
            f"exponential_decay(0.01, 1000, 0.99, end 1e-5), blocks of "
            f"{args.peer_block} steps"
        )
        out()
        for line in trajectory_table(peer["trajectory"], target, args.max_rows):
            out(line)
        out()
        if len(peer["trajectory"]) > 1:
            rate = (
                f"steady {peer['steps_per_s']:.1f} steps/s "
                f"({peer['steady_block_s']:.2f} s per block); "
                f"init {peer['init_s']:.2f} s, "
                f"first block {peer['first_block_s']:.2f} s, so JIT compile + init "
                f"~ {peer['compile_s']:.2f} s"
            )
        else:
            rate = (
                f"one block only: {peer['steps_per_s']:.1f} steps/s including JIT "
                f"compile; init {peer['init_s']:.2f} s"
            )
        out(
            f"{peer['steps']} steps in {peer['time_s']:.2f} s timed (init and compile "
            f"included); {rate}"
        )
        out(reach_line("peer", peer, target))
        out()
    if ours is not None and peer is not None:
        out(ratio_line(peer, ours, target))
        out(
            f"(evaluation granularity: raybayes every {args.eval_every} steps, "
            f"peer every {args.peer_block} steps; rows marked * reach the target)"
        )

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
