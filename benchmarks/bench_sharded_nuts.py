"""Data-sharded NUTS: one sharded gradient against the unsharded one, and its overhead.

On the elasticity simulation (``--products`` x 156 weeks), for each size it times,
in one run:

* the peer: the unsharded potential and gradient of the model as NumPyro's NUTS
  evaluates it (``initialize_model``'s potential, ``jax.value_and_grad``, jitted,
  all data in one process), for a batch of ``--chains`` positions (vmapped);
* raybayes' sharded potential (:meth:`NUTSShardObjective.batch_value_and_grad`, the
  function each leapfrog step of ``raybayes.sample(..., num_shards=S)`` calls) with
  1 and 2 shards, in-process and on Ray actors;
* the communication alone: the same round trip to the Ray shard actors carrying
  the same arrays both ways, with no compute on the workers (``echo``).

It prints the median times, the ratio sharded / unsharded, the communication
overhead as a fraction of the unsharded gradient time, and the cost model: bytes
and round trips per leapfrog step, and the predicted time per leapfrog step for 16
and 64 workers.

``--scale`` runs the scale benchmark instead: ``raybayes.sample`` with
``num_shards=2`` and 4 chains to bulk and tail ESS >= 400 and R-hat <= 1.01 on
every product elasticity, then the coverage of the 90% intervals against the
simulation truth. By default it runs the best configuration found for this model
(issue 14): data-informed centring (``centered="auto"``: each shard gets its own
products' weights through the split) and the low-rank plus diagonal mass matrix;
``--centered none --mass diagonal`` gives the first runs' configuration (the
non-centred model, NumPyro's diagonal adaptation). The full run (10,000 products x
156 weeks, 1.56M rows) is::

    python benchmarks/bench_sharded_nuts.py --scale --products 10000

Usage (the gradient benchmark at 156,000 and 1.56M rows)::

    python benchmarks/bench_sharded_nuts.py --products 1000 10000 --chains 4
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import raybayes
from raybayes.backends import RayBackend
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.mcmc.sharded import NUTSShardObjective, NUTSShardWorker
from raybayes.models.elasticity import elasticity_model
from raybayes.plan import plan


class EchoWorker(NUTSShardWorker):
    """A shard worker that also answers with arrays of a gradient's shape."""

    def echo(self, global_batch, local_batch):
        return np.zeros(len(global_batch)), global_batch, local_batch


class EchoObjective(NUTSShardObjective):
    worker_class = EchoWorker

    def echo(self, xs):
        g = np.ascontiguousarray(xs[:, : self.num_global])
        futures = []
        for s in range(self.num_shards):
            lo, hi = self._offsets[s], self._offsets[s + 1]
            local = xs[:, lo:hi].reshape((len(xs), *self.local_shapes[s]))
            futures.append(self.submit(s, "echo", g, local))
        return [self.result(f) for f in futures]


def data(num_products, seed=0, centered="none"):
    """Model arguments (``centered``: ``"auto"`` or ``"none"``) and the truth."""
    df, truth = simulate_elasticity(10, num_products, 156, seed=seed)
    prepared = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    return prepared.model_kwargs(centered=centered != "none" and centered), truth


def median_time(fn, reps):
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def unsharded(kwargs, chains, reps):
    from numpyro.infer.util import initialize_model

    info = initialize_model(
        jax.random.PRNGKey(0), elasticity_model, model_kwargs=kwargs
    )
    z = info.param_info.z
    zs = jax.tree_util.tree_map(lambda a: jnp.stack([a] * chains), z)
    vg = jax.jit(jax.vmap(jax.value_and_grad(info.potential_fn)))

    def run():
        v, g = vg(zs)
        jax.block_until_ready(g)

    return median_time(run, reps)


def products_partition(kwargs, num_shards):
    return next(
        c
        for c in plan(elasticity_model, kwargs, num_shards=num_shards).candidates
        if c.plate == "products"
    ).partition


def sharded(kwargs, num_shards, backend, chains, reps, echo=False):
    part = products_partition(kwargs, num_shards)
    obj = EchoObjective(
        elasticity_model,
        kwargs,
        partition=part,
        num_shards=num_shards,
        backend=backend,
        x64=False,
    )
    try:
        xs = 0.1 * np.random.default_rng(0).standard_normal((chains, obj.size))
        xs = xs.astype(np.float32)
        t = median_time(lambda: obj.batch_value_and_grad(xs), reps)
        t_echo = median_time(lambda: obj.echo(xs), max(reps, 20)) if echo else None
        layout = (obj.num_global, [p * k for p, k in obj.local_shapes])
    finally:
        obj.close()
    return t, t_echo, layout


def gradient_benchmark(args):
    print(
        f"machine: {platform.machine()}, {jax.local_device_count()} JAX CPU device(s); "
        f"jax {jax.__version__}; chains per call: {args.chains}"
    )
    print(
        "| rows | unsharded (s) | S=1 local (s) | S=1 Ray (s) | S=2 Ray (s) | "
        "S=2 / unsharded | echo round trip S=1 / S=2 (ms) | echo S=2 / unsharded |"
    )
    print("|---|---|---|---|---|---|---|---|")
    models = []
    backend = RayBackend(num_cpus=2).start()
    try:
        for products in args.products:
            kwargs, _ = data(products)
            rows = len(kwargs["log_price"])
            reps = args.reps if rows < 10**6 else max(3, args.reps // 3)
            t_full = unsharded(kwargs, args.chains, reps)
            t_local1, _, _ = sharded(kwargs, 1, "local", args.chains, reps)
            t_ray1, t_echo1, _ = sharded(
                kwargs, 1, backend, args.chains, reps, echo=True
            )
            t_ray2, t_echo, (G, locals_) = sharded(
                kwargs, 2, backend, args.chains, reps, echo=True
            )
            print(
                f"| {rows:,} | {t_full:.4f} | {t_local1:.4f} | {t_ray1:.4f} | "
                f"{t_ray2:.4f} | {t_ray2 / t_full:.2f} | {1e3 * t_echo1:.2f} / "
                f"{1e3 * t_echo:.2f} | {t_echo / t_full:.1%} |",
                flush=True,
            )
            models.append((rows, t_full, t_echo1, t_echo, G, sum(locals_)))
    finally:
        backend.shutdown()
    print()
    cost_model(models, args.chains)


def cost_model(models, chains, bytes_per_value=4):
    """Bytes and round trips per leapfrog step; predicted time for W workers.

    Per leapfrog step the driver sends each of the W shards the C chains' G
    globals and that shard's L/W locals, and gets back one value and as many
    gradients: ``2 C (W G + L) b`` bytes in all, in one round trip (every shard
    at once). The driver submits and collects the W calls one after the other,
    so the measured echo round trips give a fixed part and a part per worker:
    ``t_rt(W) = t_rt(1) + (W - 1) (t_rt(2) - t_rt(1))``. With the gradient's
    compute split perfectly, a leapfrog step takes ``t_grad / W + t_rt(W)``.
    """
    print(
        "| rows | G | L | bytes per leapfrog, W=2 | W=16 | W=64 | "
        "predicted step W=16 (ms) | W=64 (ms) | comm share W=16 | W=64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rows, t_full, t_echo1, t_echo2, G, L in models:

        def nbytes(W, G=G, L=L):
            return 2 * chains * (W * G + L) * bytes_per_value

        def step(W, t_full=t_full, t1=t_echo1, t2=t_echo2):
            rt = t1 + (W - 1) * max(t2 - t1, 0.0)
            return t_full / W + rt, rt

        s16, r16 = step(16)
        s64, r64 = step(64)
        print(
            f"| {rows:,} | {G:,} | {L:,} | {nbytes(2) / 1e6:.2f} MB | "
            f"{nbytes(16) / 1e6:.2f} MB | {nbytes(64) / 1e6:.2f} MB | "
            f"{1e3 * s16:.1f} | {1e3 * s64:.1f} | {r16 / s16:.0%} | {r64 / s64:.0%} |"
        )
    print("round trips per leapfrog step: 1 (all chains, all shards at once)")


def scale_benchmark(args):
    """The scale run at ``--products``; its cost predicted at ``--predict-products``.

    Prints what the run measured (wall time, leapfrog steps per draw, round trips per
    warmup and per sampling iteration, seconds per round trip, the sharded gradient
    alone, bulk/tail ESS, ESS per hour, R-hat, coverage of the 90% intervals) and the
    predicted wall time to ESS >= 400 at ``--predict-products`` (see
    :func:`predict_wall_time`).
    """
    products = args.products[0]
    kwargs, truth = data(products, centered=args.centered)
    rows = len(kwargs["log_price"])
    print(
        f"scale run: {products:,} products x 156 weeks = {rows:,} rows, "
        f"centred {args.centered!r}, {args.mass} mass matrix, "
        f"{args.shards} shards, 4 chains, {args.warmup} warmup, target ESS 400, "
        f"R-hat 1.01 on beta (max {args.max_time_s:.0f} s); "
        f"load average before: {load_average()}",
        flush=True,
    )
    with RayBackend(num_cpus=2) as backend:
        t_grad, _, _ = sharded(kwargs, args.shards, backend, 4, args.reps)
        print(
            f"sharded gradient of 4 chains at {rows:,} rows: {1e3 * t_grad:.1f} ms",
            flush=True,
        )
        t = time.perf_counter()
        idata = raybayes.sample(
            elasticity_model,
            model_kwargs=kwargs,
            num_shards=args.shards,
            backend=backend,
            num_chains=4,
            num_warmup=args.warmup,
            num_samples=args.samples,
            target_ess=400,
            target_rhat=1.01,
            target_var_names=["beta"],
            max_time_s=args.max_time_s,
            low_rank_mass=args.mass == "low-rank",
            seed=0,
            progress_bar=False,
        )
        elapsed = time.perf_counter() - t
        t_grad_target = None
        if args.predict_products and args.predict_products != products:
            big, _ = data(args.predict_products, centered=args.centered)
            t_grad_target, _, _ = sharded(
                big, args.shards, backend, 4, max(3, args.reps // 3)
            )
            del big
    beta = idata.posterior["beta"].values.reshape(-1, products)
    lo, hi = np.quantile(beta, [0.05, 0.95], axis=0)
    coverage = float(np.mean((truth["beta"] >= lo) & (truth["beta"] <= hi)))
    steps = idata.sample_stats["n_steps"].values  # (chains, draws)
    attrs = dict(idata.attrs)
    if "ess_bulk_min" not in attrs:  # stopped by max_time_s: diagnose the draws
        import arviz as az

        post = idata.posterior[["beta"]]
        attrs["ess_bulk_min"] = float(az.ess(post, method="bulk")["beta"].min())
        attrs["ess_tail_min"] = float(az.ess(post, method="tail")["beta"].min())
        attrs["r_hat_max"] = float(az.rhat(post)["beta"].max())
    draws = int(steps.shape[1])
    round_trips = int(attrs["num_round_trips"])
    # The chains run vectorised: each iteration takes as many round trips as the
    # longest trajectory among the chains.
    sampling_rt = int(steps.max(axis=0).sum())
    warmup_rt = max(round_trips - sampling_rt, 0)
    t_rt = elapsed / round_trips
    ess_bulk, ess_tail = attrs["ess_bulk_min"], attrs["ess_tail_min"]
    print(
        f"wall time {elapsed:.0f} s (load average after: {load_average()}); "
        f"stop reason {attrs.get('stop_reason')}; draws per chain {draws}\n"
        f"bulk ESS min {ess_bulk:.0f}, tail ESS min {ess_tail:.0f}, "
        f"R-hat max {attrs['r_hat_max']:.3f} (over {products} elasticities); "
        f"bulk ESS per hour {3600 * ess_bulk / elapsed:.0f}\n"
        f"leapfrog steps per draw {steps.mean():.1f} (mean over chains), "
        f"{steps.max(axis=0).mean():.1f} (longest chain, what a vectorised "
        f"iteration waits for); round trips {round_trips:,}: warmup "
        f"{warmup_rt / max(args.warmup, 1):.0f} per iteration, sampling "
        f"{sampling_rt / max(draws, 1):.0f} per draw; {1e3 * t_rt:.1f} ms per round "
        f"trip in the run (the sharded gradient alone: {1e3 * t_grad:.1f} ms)\n"
        f"coverage of the 90% intervals: {coverage:.1%} ({products} products)\n"
        f"divergences {int(idata.sample_stats['diverging'].values.sum())}; step size "
        f"{float(idata.sample_stats['step_size'].values.mean()):.3f} (mean); low-rank "
        f"eigenvectors kept {attrs.get('low_rank_mass_rank', 'n/a')}",
        flush=True,
    )
    if t_grad_target is not None:
        predict_wall_time(
            products=products,
            target_products=args.predict_products,
            num_warmup=args.warmup,
            warmup_rt_per_iteration=warmup_rt / max(args.warmup, 1),
            sampling_rt_per_draw=sampling_rt / max(draws, 1),
            ess_bulk_per_draw=min(ess_bulk, ess_tail) / draws,
            t_round_trip=t_rt,
            t_grad=t_grad,
            t_grad_target=t_grad_target,
        )


def predict_wall_time(
    *,
    products,
    target_products,
    num_warmup,
    warmup_rt_per_iteration,
    sampling_rt_per_draw,
    ess_bulk_per_draw,
    t_round_trip,
    t_grad,
    t_grad_target,
    target_ess=400,
    hour_s=3600.0,
):
    """Wall time to ESS >= ``target_ess`` at ``target_products``, from a smaller run.

    ``T = (num_warmup * r_w + n * r_s) * t_step``: ``r_w`` and ``r_s`` the round
    trips (leapfrog steps of the vectorised chains) per warmup iteration and per
    draw, measured; ``n = target_ess / (ESS per draw)`` the draws per chain;
    ``t_step = t_grad_target + (t_round_trip - t_grad)``, the sharded gradient at the
    target size (measured) plus the per-step overhead of the run (driver NUTS,
    callback, Ray; measured). Two cases for the trajectories: the same steps per
    draw as in the smaller run, and steps growing as ``d^(1/4)`` with the dimension
    ``d`` (the step size of HMC shrinks as ``d^(-1/4)``; Beskos et al. 2013), with
    ``d = 1,577 + 2 P`` for the elasticity model.

    References:
        Beskos, Pillai, Roberts, Sanz-Serna & Stuart (2013). Optimal tuning of the
        hybrid Monte Carlo algorithm. Bernoulli 19(5A), 1501-1534.
    """
    overhead = max(t_round_trip - t_grad, 0.0)
    t_step = t_grad_target + overhead
    draws = int(np.ceil(target_ess / max(ess_bulk_per_draw, 1e-9)))
    growth = ((1577 + 2 * target_products) / (1577 + 2 * products)) ** 0.25
    print(
        f"prediction at {target_products:,} products: sharded gradient of 4 chains "
        f"{1e3 * t_grad_target:.0f} ms + per-step overhead {1e3 * overhead:.1f} ms = "
        f"{1e3 * t_step:.0f} ms per round trip; {draws} draws per chain for ESS "
        f"{target_ess} (at {ess_bulk_per_draw:.2f} ESS per draw, min of bulk and tail)"
    )
    for label, factor in (("same steps per draw", 1.0), ("steps x d^(1/4)", growth)):
        per_chain = num_warmup * warmup_rt_per_iteration + draws * sampling_rt_per_draw
        rt = factor * per_chain
        wall = rt * t_step
        print(
            f"  {label} (x{factor:.2f}): {rt:,.0f} round trips, "
            f"{wall / hour_s:.1f} h (target: 1 h)"
        )


def load_average() -> str:
    try:
        import os

        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--max-time-s", type=float, default=3600.0)
    parser.add_argument(
        "--centered",
        choices=("auto", "none"),
        default="auto",
        help="with --scale: data-informed centring weights, or the non-centred model",
    )
    parser.add_argument(
        "--mass",
        choices=("low-rank", "diagonal"),
        default="low-rank",
        help="with --scale: low-rank plus diagonal, or NumPyro's diagonal",
    )
    parser.add_argument(
        "--predict-products",
        type=int,
        default=10000,
        help="with --scale: predict the wall time to ESS 400 at this size (0: no)",
    )
    args = parser.parse_args()
    if args.scale:
        scale_benchmark(args)
    else:
        gradient_benchmark(args)


if __name__ == "__main__":
    main()
