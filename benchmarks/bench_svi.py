"""Distributed SVI (raybayes.fit_svi) vs NumPyro SVI peers: time to a target RMSE.

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
* the peers (``--peers``, any of):

  - ``recipe``, the published NumPyro recipe: ``SVI`` with ``AutoNormal``,
    ``RenyiELBO(num_particles=4)`` and ``optax.adamw`` on
    ``optax.exponential_decay(0.01, 1000, 0.99, end_value=1e-5)``;
  - ``tuned``, a tuned single-process NumPyro SVI: ``AutoNormal``,
    ``Trace_ELBO(num_particles=1)``, ``optax.adam(--peer-lr)`` (0.05), full batch;
  - ``subsample``, NumPyro's own plate subsampling: the same model written with
    ``numpyro.plate("products", P, subsample_size=B)`` (the observations of a
    product nested in its plate, so they get the ``P / B`` scale), ``AutoNormal``,
    ``Trace_ELBO(1)``, ``adam(--peer-lr)``; the ``B`` indices are drawn with
    ``jax.random.choice`` inside the jitted step and substituted into the plate
    (NumPyro's own index draw is a sequential loop, much slower on CPU).
    ``B`` = ``--peer-subsample-size`` (default: raybayes' products per step).

  Each runs in jitted blocks of ``--peer-block`` steps (``lax.fori_loop`` over
  ``svi.update``, the data passed as arguments of the jitted block, as
  ``svi.run(..., jit_model_args=True)`` does), evaluated between blocks outside
  the timed region, until the target or ``--peer-budget-s`` of timed wall time.
  JIT compilation counts in its time and is also reported separately.

The RMSE is that of the posterior-mean product elasticities ``beta`` (mean of
``--draws`` guide draws) against the truth. Both contestants use the same
(non-centred) ``elasticity_model``. Prints each contestant's RMSE-vs-time
trajectory, its time to the target, the ratio peer / raybayes for each peer and
the ratio against the best (fastest to the target) peer.

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
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.optim import optax_to_numpyro

from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.models.elasticity import elasticity_model
from raybayes.models.negbin import NegativeBinomialLogMean

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


def subsampled_elasticity_model(
    log_price, time_idx, category_of_product, num_categories, num_times, units,
    subsample_size, idx=None,
):
    """``elasticity_model`` (non-centred, negative binomial) written for NumPyro's
    plate subsampling: data on the full grid ``(P, T)`` (products x weeks), the
    observations nested in the ``products`` plate. ``idx`` ``(B,)``: the subsample
    indices, substituted into the plate (drawn by the caller inside the jitted
    step)."""
    P, T = log_price.shape
    beta_global = numpyro.sample("beta_global", dist.Normal(-2.0, 1.0))
    sigma_category = numpyro.sample("sigma_category", dist.HalfNormal(1.0))
    sigma_beta = numpyro.sample("sigma_beta", dist.HalfNormal(1.0))
    sigma_delta = numpyro.sample("sigma_delta", dist.HalfNormal(1.0))
    sigma_gamma = numpyro.sample("sigma_gamma", dist.HalfNormal(1.0))
    mu_delta = numpyro.sample("mu_delta", dist.Normal(0.0, 10.0))
    with numpyro.plate("categories", num_categories, dim=-1):
        z_category = numpyro.sample("z_category", dist.Normal(0.0, 1.0))
        beta_category = beta_global + sigma_category * z_category
        with numpyro.plate("times", num_times, dim=-2):
            gamma = sigma_gamma * numpyro.sample(
                "gamma_decentered", dist.Normal(0.0, 1.0)
            )
    concentration = numpyro.sample("concentration", dist.Exponential(0.1))
    with handlers.substitute(data=None if idx is None else {"products": idx}):
        with numpyro.plate(
            "products", P, subsample_size=subsample_size, dim=-2
        ) as rows:
            cat = category_of_product[rows]
            z_beta = numpyro.sample("z_beta", dist.Normal(0.0, 1.0))
            delta = mu_delta + sigma_delta * numpyro.sample(
                "delta_decentered", dist.Normal(0.0, 1.0)
            )
            beta = beta_category[cat][:, None] + sigma_beta * z_beta
            log_mu = (
                beta * log_price[rows]
                + gamma[time_idx[rows], cat[:, None]]
                + delta
            )
            with numpyro.plate("weeks", T, dim=-1):
                numpyro.sample(
                    "units",
                    NegativeBinomialLogMean(log_mu, concentration),
                    obs=units[rows],
                )


def _grid_kwargs(kwargs):
    """The model's data on the full (products x weeks) grid, for the subsampled
    peer model; raises if the rows are not that grid in product-major order."""
    P, T = len(kwargs["category_of_product"]), int(kwargs["num_times"])
    pidx, tidx = np.asarray(kwargs["product_idx"]), np.asarray(kwargs["time_idx"])
    if len(pidx) != P * T or not (
        np.array_equal(pidx, np.repeat(np.arange(P), T))
        and np.array_equal(tidx, np.tile(np.arange(T), P))
    ):
        raise ValueError("the subsample peer needs every product in every week")
    return dict(
        log_price=np.asarray(kwargs["log_price"]).reshape(P, T),
        time_idx=tidx.reshape(P, T),
        category_of_product=np.asarray(kwargs["category_of_product"]),
        num_categories=int(kwargs["num_categories"]),
        num_times=T,
        units=np.asarray(kwargs["units"]).reshape(P, T),
    )


PEER_LABELS = {
    "recipe": "NumPyro recipe: AutoNormal, RenyiELBO(4), adamw on "
    "exponential_decay(0.01, 1000, 0.99, end 1e-5), full batch",
    "tuned": "NumPyro tuned: AutoNormal, Trace_ELBO(1), adam({lr}), full batch",
    "subsample": "NumPyro plate subsampling: AutoNormal, Trace_ELBO(1), adam({lr}), "
    "{B} products/step, indices drawn in the jitted step",
}


def run_peer(kwargs, true_beta, target, args, kind="recipe"):
    """One NumPyro peer (see the module docstring) in jitted blocks of steps."""
    block = int(args.peer_block)
    if kind == "recipe":
        model = MODEL
        schedule = optax.exponential_decay(
            init_value=0.01, transition_steps=1000, decay_rate=0.99, end_value=1e-5
        )
        optim = optax_to_numpyro(optax.adamw(schedule))
        elbo = RenyiELBO(num_particles=4)
    else:
        optim = optax_to_numpyro(optax.adam(args.peer_lr))
        elbo = Trace_ELBO(num_particles=1)
        model = MODEL if kind == "tuned" else subsampled_elasticity_model
    guide = AutoNormal(model)
    svi = SVI(model, guide, optim, elbo)

    if kind == "subsample":
        grid = _grid_kwargs(kwargs)
        P = grid["category_of_product"].shape[0]
        B = int(args.peer_subsample_size)
        cat = jnp.asarray(grid["category_of_product"])

        @jax.jit
        def beta_draws(rng_key, params):
            # beta = beta_global + sigma_category z_category[c] + sigma_beta z_beta,
            # each site drawn from its AutoNormal factor (positive sites: exp).
            keys = jax.random.split(rng_key, 5)
            shape = (args.draws,)

            def site(name, k, positive=False):
                loc, scale = params[f"{name}_auto_loc"], params[f"{name}_auto_scale"]
                u = loc + scale * jax.random.normal(k, shape + loc.shape)
                return jnp.exp(u) if positive else u

            bg = site("beta_global", keys[0])
            sc = site("sigma_category", keys[1], True)
            sb = site("sigma_beta", keys[2], True)
            zc = site("z_category", keys[3])
            zb = site("z_beta", keys[4])[..., 0]
            return bg[:, None] + sc[:, None] * zc[:, cat] + sb[:, None] * zb

        model_kwargs = dict(grid, subsample_size=B)
    else:
        beta_kwargs = _beta_kwargs(kwargs)
        model_kwargs = kwargs

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
    arrays, static = _split_kwargs(model_kwargs)
    arrays = jax.device_put(arrays)

    def run_block(state, arrays, first_step):
        def body(i, carry):
            state, loss_sum = carry
            extra = {}
            if kind == "subsample":
                key = jax.random.fold_in(jax.random.PRNGKey(2), first_step + i)
                extra["idx"] = jax.random.choice(key, P, (B,), replace=False)
            state, loss = svi.update(state, **arrays, **static, **extra)
            return state, loss_sum + loss

        zero = jnp.zeros((), jnp.result_type(float))
        state, loss_sum = jax.lax.fori_loop(0, block, body, (state, zero))
        return state, loss_sum / block

    run_block = jax.jit(run_block)
    extra = {"idx": jnp.arange(B)} if kind == "subsample" else {}
    state = svi.init(jax.random.PRNGKey(0), **arrays, **static, **extra)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start

    elapsed, steps = init_s, 0
    trajectory, block_s = [], []
    while True:
        t0 = time.perf_counter()
        state, mean_loss = run_block(state, arrays, steps)
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
                f"  peer {kind} step {steps:6d}  {elapsed:8.2f} s  block {dt:6.2f} s  "
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
    parser.add_argument(
        "--guide", default="normal", choices=("normal", "lowrank", "structured")
    )
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
    parser.add_argument(
        "--peers",
        default="recipe,tuned,subsample",
        help="comma-separated peers: recipe, tuned, subsample",
    )
    parser.add_argument("--peer-lr", type=float, default=0.05, help="tuned peers' Adam")
    parser.add_argument(
        "--peer-subsample-size",
        type=int,
        default=None,
        help="products per step of the subsample peer (default: raybayes' "
        "workers x subsample size, else products / 10)",
    )
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
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEER_LABELS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {list(PEER_LABELS)}")
    if args.peer_subsample_size is None:
        args.peer_subsample_size = (
            args.workers * args.subsample_size
            if args.subsample_size is not None
            else max(1, args.products // 10)
        )

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

    ours, peer_runs = None, {}
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
    for kind in [] if args.skip_peer else peers:
        peer = run_peer(kwargs, true_beta, target, args, kind)
        peer_runs[kind] = peer
        label = PEER_LABELS[kind].format(lr=args.peer_lr, B=args.peer_subsample_size)
        out(f"## peer {kind}: {label}; blocks of {args.peer_block} steps")
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
        out(reach_line(f"peer {kind}", peer, target))
        out()
    if ours is not None and peer_runs:
        for kind, peer in peer_runs.items():
            out(f"- {kind}: " + ratio_line(peer, ours, target))
        reached = {
            k: time_to_target(p["trajectory"], target)[0]
            for k, p in peer_runs.items()
            if time_to_target(p["trajectory"], target) is not None
        }
        if reached:
            best = min(reached, key=reached.get)
            out(f"- best peer ({best}): " + ratio_line(peer_runs[best], ours, target))
        else:
            out("- best peer: none of the peers reached the target")
        out(
            f"(evaluation granularity: raybayes every {args.eval_every} steps, "
            f"peers every {args.peer_block} steps; rows marked * reach the target)"
        )

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
