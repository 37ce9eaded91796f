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
simulation truth. The full run (10,000 products x 156 weeks, 1.56M rows) is::

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


def data(num_products, seed=0):
    df, truth = simulate_elasticity(10, num_products, 156, seed=seed)
    prepared = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    return prepared.model_kwargs(), truth


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
    products = args.products[0]
    kwargs, truth = data(products)
    rows = len(kwargs["log_price"])
    print(
        f"scale run: {products:,} products x 156 weeks = {rows:,} rows, "
        f"{args.shards} shards, 4 chains, target ESS 400, R-hat 1.01 on beta"
    )
    t = time.perf_counter()
    with RayBackend(num_cpus=2) as backend:
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
            seed=0,
            progress_bar=False,
        )
    elapsed = time.perf_counter() - t
    beta = idata.posterior["beta"].values.reshape(-1, products)
    lo, hi = np.quantile(beta, [0.05, 0.95], axis=0)
    coverage = float(np.mean((truth["beta"] >= lo) & (truth["beta"] <= hi)))
    steps = idata.sample_stats["n_steps"].values
    attrs = dict(idata.attrs)
    if "ess_bulk_min" not in attrs:  # stopped by max_time_s: diagnose the draws
        import arviz as az

        post = idata.posterior[["beta"]]
        attrs["ess_bulk_min"] = float(az.ess(post, method="bulk")["beta"].min())
        attrs["ess_tail_min"] = float(az.ess(post, method="tail")["beta"].min())
        attrs["r_hat_max"] = float(az.rhat(post)["beta"].max())
    print(
        f"wall time {elapsed:.0f} s; stop reason {attrs.get('stop_reason')}; "
        f"draws per chain {attrs.get('draws_per_chain')}; "
        f"bulk ESS min {attrs.get('ess_bulk_min', float('nan')):.0f}, "
        f"tail ESS min {attrs.get('ess_tail_min', float('nan')):.0f}, "
        f"R-hat max {attrs.get('r_hat_max', float('nan')):.3f}; "
        f"leapfrog steps per draw {steps.mean():.1f}; "
        f"round trips {attrs.get('num_round_trips')}; "
        f"coverage of 90% intervals {coverage:.1%} ({products} products)"
    )


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
    args = parser.parse_args()
    if args.scale:
        scale_benchmark(args)
    else:
        gradient_benchmark(args)


if __name__ == "__main__":
    main()
