"""Driver-held against vector-free L-BFGS as the number of local parameters grows.

``find_map`` runs SciPy's L-BFGS-B on the driver over the full vector (globals and
every product's locals): the driver holds the L-BFGS memory, and every evaluation
sends each shard its locals and receives their gradient. ``find_map_vector_free``
(Chen, Wang & Zhou 2014) keeps all of that on the shard workers; the driver holds
only global slices and a Gram matrix. For each number of products, the script runs
both for the same number of iterations on the elasticity model and prints:

* the driver's optimizer state in bytes: L-BFGS-B's documented workspace
  ``(2m + 5) n + 11 m^2 + 8 m`` doubles plus x and g, against the measured state
  of the vector-free driver;
* the bytes the driver sends and receives per iteration (for the driver-held
  method: the shards' locals out and their gradients back, per evaluation);
* wall time per iteration, and the loss reached.

    python benchmarks/bench_vlbfgs.py --products 10000 100000 --weeks 4 --iters 15
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
import ray
import scipy
from numpyro.handlers import reparam
from numpyro.infer.reparam import LocScaleReparam

from raybayes.backends import RayBackend
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.distributed import ShardedObjective
from raybayes.models.elasticity import elasticity_model
from raybayes.optim import find_map, find_map_vector_free
from raybayes.optim.vlbfgs import VectorFreeObjective
from raybayes.plan import plan

MODEL = reparam(
    elasticity_model, config={"gamma": LocScaleReparam(0), "delta": LocScaleReparam(0)}
)


def mib(n):
    return n / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--categories", type=int, default=10)
    ap.add_argument("--weeks", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--history", type=int, default=10)
    args = ap.parse_args()
    m = args.history
    print(f"{platform.machine()}, jax {jax.__version__}, scipy {scipy.__version__}, "
          f"ray {ray.__version__}; {args.workers} Ray workers, m = {m}, "
          f"{args.iters} iterations each")
    backend = RayBackend(num_cpus=args.workers).start()
    try:
        for p in args.products:
            df, _ = simulate_elasticity(args.categories, p, args.weeks, seed=0)
            data = prepare_elasticity_data(
                df, product_cols=("product",), category_col="category")
            kwargs = data.model_kwargs()
            part = plan(MODEL, kwargs, num_shards=args.workers).partition
            rows = {}
            for name, cls in (("driver-held L-BFGS-B", ShardedObjective),
                              ("vector-free L-BFGS", VectorFreeObjective)):
                with cls(MODEL, kwargs, partition=part, num_shards=args.workers,
                         backend=backend) as f:
                    n, g = f.size, f.num_global
                    t0 = time.perf_counter()
                    if cls is ShardedObjective:
                        r = find_map(f, max_steps=args.iters, tol=1e-30, gtol=0.0,
                                     history_size=m, progress_bar=False, assemble=False)
                        per_eval = 2 * 8 * (n - g) + 2 * 8 * g * args.workers
                        comm = per_eval * r.num_evaluations / max(r.num_iterations, 1)
                        state = 8 * ((2 * m + 5) * n + 11 * m * m + 8 * m + 2 * n)
                    else:
                        r = find_map_vector_free(f, max_steps=args.iters, tol=1e-30,
                                                 gtol=0.0, history_size=m,
                                                 progress_bar=False, assemble=False)
                        comm = float(np.mean(np.add(r.bytes_sent, r.bytes_received)))
                        state = r.driver_state_bytes
                    wall = time.perf_counter() - t0
                rows[name] = (r, wall, comm, state)
            print(f"\nproducts {p:,}: rows {data.num_obs:,}, parameters n = {n:,} "
                  f"(globals G = {g})")
            for name, (r, wall, comm, state) in rows.items():
                print(f"  {name:22s} loss {r.loss:.6e} after {r.num_iterations} it "
                      f"({r.num_evaluations} evals) | {wall / max(r.num_iterations, 1):.3f}"
                      f" s/it | driver state {mib(state):9.3f} MiB | traffic "
                      f"{mib(comm):9.3f} MiB/it")
            (a, wa, ca, sa), (b, wb, cb, sb) = rows.values()
            print(f"  ratios driver-held / vector-free: time per iteration "
                  f"{(wa / max(a.num_iterations, 1)) / (wb / max(b.num_iterations, 1)):.2f}, "
                  f"driver state {sa / sb:.0f}x, traffic {ca / cb:.0f}x")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
