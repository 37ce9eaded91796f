"""Memory per SVI worker against the number of shards.

Fits the elasticity simulation with :func:`raybayes.fit_svi` on ``S`` Ray workers
for each ``S`` in ``--shards`` (a few steps; memory, not convergence, is measured)
and prints, per worker, the bytes of data it holds and its peak resident memory.
The data part should fall as 1/S. The peer figure is S = 1 (all data on one
worker, the layout of a single-process NumPyro fit). Then it shows that a data set
twice one worker's budget (``max_shard_bytes``) is refused on one worker and fits
on enough workers.

Usage:
    python benchmarks/bench_svi_memory.py --products 20000 --shards 1 2 4
"""

from __future__ import annotations

import argparse

import numpy as np

import raybayes
from raybayes.backends import RayBackend
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.errors import ConfigurationError
from raybayes.models.elasticity import elasticity_model
from raybayes.plan import plan

MB = 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--weeks", type=int, default=156)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    df, _ = simulate_elasticity(10, args.products, args.weeks, seed=0)
    kwargs = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    ).model_kwargs()
    total = sum(np.asarray(v).nbytes for v in kwargs.values() if np.ndim(v))
    print(f"{args.products:,} products x {args.weeks} weeks; data {total / MB:.0f} MiB")
    print("| shards | data per worker (MiB) | peak RSS per worker (MiB) | data x S / total |")
    print("|---|---|---|---|")
    per_worker = {}
    for S in args.shards:
        part = next(
            c for c in plan(elasticity_model, kwargs, num_shards=S).candidates
            if c.plate == "products"
        ).partition
        # One actor per shard; logical CPUs so that S > physical cores still schedules.
        with RayBackend(num_cpus=max(2, S)) as backend:
            res = raybayes.fit_svi(
                elasticity_model, model_kwargs=kwargs, num_shards=S, partition=part,
                backend=backend,
                subsample_size=100, num_steps=args.steps, tol=None, num_samples=2,
                progress_bar=False,
            )
        data = np.array(res.data_bytes) / MB
        rss = np.array(res.peak_rss_bytes) / MB
        per_worker[S] = max(res.data_bytes)
        print(f"| {S} | {', '.join(f'{d:.0f}' for d in data)} | "
              f"{', '.join(f'{r:.0f}' for r in rss)} | "
              f"{max(res.data_bytes) * S / total:.2f} |")
    budget = total // 2
    try:
        raybayes.fit_svi(elasticity_model, model_kwargs=kwargs, num_shards=1,
                         backend="local",
                         num_steps=1, max_shard_bytes=budget, progress_bar=False)
        print("one worker: accepted (unexpected)")
    except ConfigurationError as err:
        print(f"budget {budget / MB:.0f} MiB per worker, one worker: refused: {err}")
    S = max(args.shards)
    ok = per_worker[S] <= budget
    print(f"budget {budget / MB:.0f} MiB per worker, {S} workers: largest shard "
          f"{per_worker[S] / MB:.0f} MiB -> {'fits' if ok else 'does not fit'}")


if __name__ == "__main__":
    main()
