"""Distributed SVI with one slow worker: BSP (s = 0) against SSP (s = 1, 4).

Simulates ``--categories x --products x --weeks`` rows of the elasticity model
(:func:`raybayes.datasets.simulate_elasticity`) and fits it with
:func:`raybayes.fit_svi` on ``--workers`` Ray workers, minibatching
``--subsample-size`` products per shard per step, with ``--slow-workers`` slowed:
each of their steps takes ``--slow-factor`` times its compute time with probability
``--slow-prob``, independently (a noisy neighbour or a throttled spot machine). For each staleness
bound s it records the RMSE of the posterior-mean product elasticities against
the truth every ``--eval-every`` steps (evaluation time excluded), the steps per
second, and the staleness of the gradients, and prints the time each s needs to
reach ``--target`` and its ratio to BSP's. BSP is the baseline (the peer) of this
comparison; the same seed and data are used for every s.

Usage:
    python benchmarks/bench_svi_ssp.py --products 2000 --budget-s 120
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
import numpyro
import ray

import raybayes
from raybayes.backends import RayBackend
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.models.elasticity import elasticity_model
from raybayes.plan import plan


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def run(kwargs, partition, true_beta, staleness, backend, args):
    trajectory = []

    def callback(info):
        beta = info.sample_posterior(args.draws, var_names=["beta"])["beta"].mean(0)
        trajectory.append((info.elapsed_s, info.step, rmse(beta, true_beta)))
        return info.elapsed_s >= args.budget_s or (
            args.target is not None
            and trajectory[-1][2] <= args.target
            and not args.full_budget
        )

    res = raybayes.fit_svi(
        elasticity_model,
        model_kwargs=kwargs,
        num_shards=args.workers,
        partition=partition,
        backend=backend,
        subsample_size=args.subsample_size,
        learning_rate=args.lr,
        num_steps=args.max_steps,
        tol=None,
        staleness=staleness,
        seed=0,
        num_samples=10,
        progress_bar=False,
        callback=callback,
        callback_every=args.eval_every,
        _worker_slowdown={w: (args.slow_factor, args.slow_prob) for w in args.slow_workers},
    )
    return res, trajectory


def time_to(trajectory, target):
    for elapsed, step, r in trajectory:
        if r <= target:
            return elapsed, step
    return None, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--weeks", type=int, default=156)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subsample-size", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--slow-workers", type=int, nargs="+", default=[0],
                        help="workers that are slowed (each independently)")
    parser.add_argument("--slow-factor", type=float, default=4.0)
    parser.add_argument("--slow-prob", type=float, default=0.3)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument(
        "--full-budget",
        action="store_true",
        help="run every s for the whole budget (no stop at target)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="RMSE target (default: 1.05 x the best RMSE BSP reached)",
    )
    parser.add_argument("--draws", type=int, default=50)
    args = parser.parse_args()

    df, truth = simulate_elasticity(args.categories, args.products, args.weeks, seed=0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    kwargs = data.model_kwargs()
    true_beta = truth["beta"][data.products["product"].to_numpy()]
    chosen = plan(elasticity_model, kwargs, num_shards=args.workers)
    partition = next(c for c in chosen.candidates if c.plate == "products").partition
    print(
        f"data: {args.categories} x {args.products} products x {args.weeks} weeks = "
        f"{data.num_obs:,} rows; {args.workers} Ray workers on "
        f"{platform.machine()}; jax {jax.__version__}, numpyro {numpyro.__version__}, "
        f"ray {ray.__version__}; worker(s) {args.slow_workers} {args.slow_factor}x "
        f"slower on {args.slow_prob:.0%} of their steps (independently); "
        f"B = {args.subsample_size} per shard"
    )
    backend = RayBackend(num_cpus=args.workers).start()
    results = {}
    try:
        for s in args.staleness:
            t0 = time.perf_counter()
            res, traj = run(kwargs, partition, true_beta, s, backend, args)
            results[s] = (res, traj)
            print(
                f"s={s}: {res.num_steps} steps in {res.time_s:.1f} s "
                f"({res.num_steps / res.time_s:.1f} steps/s), final RMSE "
                f"{traj[-1][2]:.4f}, staleness {res.staleness}; "
                f"wall incl. set-up and evaluations {time.perf_counter() - t0:.0f} s"
            )
    finally:
        backend.shutdown()
    target = args.target
    if target is None:
        target = 1.05 * min(r for _, _, r in results[args.staleness[0]][1])
    print(f"\ntarget RMSE {target:.4f}")
    base = time_to(results[args.staleness[0]][1], target)[0]
    print(
        "| s | steps/s | max staleness seen | time to target (s) | steps | "
        "ratio to BSP |"
    )
    print("|---|---|---|---|---|---|")
    for s, (res, traj) in results.items():
        t, step = time_to(traj, target)
        ratio = f"{t / base:.2f}" if (t is not None and base) else "-"
        shown = f"{t:.1f}" if t is not None else f"not reached in {traj[-1][0]:.0f}"
        print(
            f"| {s} | {res.num_steps / res.time_s:.1f} | {max(res.staleness)} | "
            f"{shown} | {step if step is not None else '-'} | {ratio} |"
        )
    print("\nRMSE by wall time (s, step, RMSE):")
    for s, (_, traj) in results.items():
        pts = traj[:: max(1, len(traj) // 8)]
        print(f"  s={s}: " + ", ".join(f"({e:.0f}, {st}, {r:.3f})" for e, st, r in pts))


if __name__ == "__main__":
    main()
