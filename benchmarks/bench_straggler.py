"""Time to reach an ESS target with a straggler: dynamic chunks vs static chains.

Two Ray workers, worker 0 slowed 3x (each of its chunks is made to take 3x its
compute time). The peer is the static scheme NumPyro uses: chains split evenly
over the workers up front, each of fixed length. For a fair comparison it gets the
number of draws per chain that the dynamic run needed to meet the target, so both
produce the same draws; the static run must then wait for the slow worker.

    python benchmarks/bench_straggler.py [--chains 8] [--target-ess 400]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import numpyro
import numpyro.distributions as dist

import raybayes
from raybayes.backends import RayBackend


def logistic(X, y):
    w = numpyro.sample("w", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0, 5))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--target-ess", type=float, default=400)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--slowdown", type=float, default=3.0)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(a.rows, 10)).astype(np.float32)
    y = (rng.random(a.rows) < 1 / (1 + np.exp(-(X @ rng.normal(size=10))))).astype(np.int32)
    common = dict(num_chains=a.chains, num_warmup=200, seed=0, chunk_size=25,
                  progress_bar=False, num_workers=2, _worker_slowdown={0: a.slowdown})
    with RayBackend(num_cpus=2) as backend:
        # Warm the workers' imports once (not timed for either scheme).
        raybayes.sample(logistic, X[:100], y[:100], backend=backend, num_samples=25,
                        **{**common, "num_warmup": 25, "_worker_slowdown": None})
        t = time.perf_counter()
        dyn = raybayes.sample(logistic, X, y, backend=backend, num_samples=100,
                              target_ess=a.target_ess, target_rhat=1.01,
                              max_samples=4000, **common)
        t_dyn = time.perf_counter() - t
        n = int(dyn.attrs["draws_per_chain"])
        t = time.perf_counter()
        sta = raybayes.sample(logistic, X, y, backend=backend, num_samples=n,
                              _scheduling="static", **common)
        t_sta = time.perf_counter() - t
    same = all(np.array_equal(dyn.posterior[k], sta.posterior[k]) for k in dyn.posterior)
    print(f"chains={a.chains} workers=2 slowdown(worker 0)={a.slowdown}x "
          f"target: bulk/tail ESS >= {a.target_ess}, R-hat <= 1.01")
    print(f"dynamic (raybayes): {t_dyn:7.1f} s  stop={dyn.attrs['stop_reason']} "
          f"draws/chain={n} ess_bulk_min={dyn.attrs['ess_bulk_min']:.0f} "
          f"ess_tail_min={dyn.attrs['ess_tail_min']:.0f} r_hat_max={dyn.attrs['r_hat_max']:.4f}")
    print(f"static  (NumPyro-style equal fixed chains, same draws): {t_sta:7.1f} s")
    print(f"ratio dynamic/static: {t_dyn / t_sta:.2f} (target <= 0.75); identical draws: {same}")


if __name__ == "__main__":
    main()
