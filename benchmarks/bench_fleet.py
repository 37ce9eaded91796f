"""Fleet throughput: CPU-seconds per 2-state Poisson HMM, ours vs NumPyro one at a time.

Workload: synthetic 2-state Poisson HMMs (raybayes.datasets.fleet), T hourly points.
Ours: fit_many (NUTS, 4 chains, dense inverse mass matrix from the Laplace
approximation at each model's MAP, draws extended until bulk ESS >= 400 and R-hat <=
1.01), in-process backend so that process CPU time covers all the work.
``--mass-matrix adapt`` runs NumPyro's diagonal adaptation instead (300 warmup).
Peer: NumPyro MCMC on the same model, one model at a time, 4 chains sequential,
500 warmup + 500 draws, one MCMC object reused so that it compiles once. Both
sides report compilation apart (ours: a first fleet of one batch; the peer: its
first model) and CPU-seconds per model after it; the ratio compares the latter.

    python benchmarks/bench_fleet.py --num-models 8 --num-steps 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import jax
import numpy as np
import pandas as pd

from raybayes.datasets.fleet import simulate_fleet
from raybayes.fleet import connect_results, fit_many
from raybayes.models.hmm import poisson_hmm


def peer(ys, num_warmup=500, num_samples=500):
    """NumPyro, one model at a time; one MCMC object, so it compiles once.

    Returns (CPU-s of the first model, CPU-s per model after it, share meeting
    the target)."""
    import arviz as az
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(poisson_hmm), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=4, chain_method="sequential", progress_bar=False)
    times, ok = [], 0
    for i, y in enumerate(ys):
        cpu0 = time.process_time()
        mcmc.run(jax.random.PRNGKey(i), jax.numpy.asarray(y, jax.numpy.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = az.summary(az.from_numpyro(mcmc))
        times.append(time.process_time() - cpu0)
        ok += bool((s["ess_bulk"] >= 400).all() and (s["r_hat"] <= 1.01).all())
    rest = times[1:] or times
    return times[0], float(np.mean(rest)), ok / len(ys)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-models", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=10_000)
    ap.add_argument("--peer-models", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--mass-matrix", default="laplace", choices=["laplace", "adapt"])
    ap.add_argument("--num-warmup", type=int, default=None)
    ap.add_argument("--num-samples", type=int, default=250)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    truth = simulate_fleet(tmp, 1, 1, args.num_models, num_steps=args.num_steps, seed=11)
    settings = dict(backend="local", batch_size=args.batch_size, num_predictive_draws=100,
                    mass_matrix=args.mass_matrix, num_warmup=args.num_warmup,
                    num_samples=args.num_samples)
    # Compilation, once per worker process: a first small fleet of one batch.
    simulate_fleet(f"{tmp}/warm", 1, 1, args.batch_size, num_steps=args.num_steps, seed=12)
    cpu0 = time.process_time()
    fit_many(f"{tmp}/warm/data", ["region", "demographic", "network"], f"{tmp}/warm/out",
             progress_bar=False, **settings)
    warm_cpu = time.process_time() - cpu0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    res = fit_many(f"{tmp}/data", ["region", "demographic", "network"], f"{tmp}/out",
                   progress_bar=True, **settings)
    ours_cpu = (time.process_time() - cpu0) / args.num_models
    wall = time.perf_counter() - t0
    man = res.manifest
    met = ((man["min_ess_bulk"] >= 400) & (man["max_r_hat"] <= 1.01)).mean()
    con = connect_results(f"{tmp}/out")
    s = con.execute("SELECT demographic, network, parameter, q05, q95 FROM summary").df()
    t = truth.melt(id_vars=["demographic", "network"], value_vars=["rate_0", "rate_1"],
                   var_name="p", value_name="true")
    t["parameter"] = t["p"].str.replace("rate_", "rate[") + "]"
    m = s.merge(t, on=["demographic", "network", "parameter"])
    coverage = ((m["q05"] <= m["true"]) & (m["true"] <= m["q95"])).mean()
    ys = [pd.read_parquet(f"{tmp}/data/region=r0/demographic=d0/network=n{i}")["count"].to_numpy()
          for i in range(min(args.peer_models, args.num_models))]
    peer_first, peer_cpu, peer_met = peer(ys)
    print(f"models {args.num_models}, T {args.num_steps}")
    print(f"ours: first batch of {args.batch_size} (with compilation) {warm_cpu:.1f} CPU-s; "
          f"then {ours_cpu:.1f} CPU-s/model (wall {wall:.0f} s), target met in {met:.0%}, "
          f"90% coverage of true rates {coverage:.0%}")
    print(f"ours: gradients per model median {man['num_gradients'].median():.0f}, "
          f"draws per chain median {man['num_draws'].median() / 4:.0f}, "
          f"divergences {int(man['num_divergences'].sum())}")
    print(f"peer: first model (with compilation) {peer_first:.1f} CPU-s; then "
          f"{peer_cpu:.1f} CPU-s/model, target met in {peer_met:.0%}")
    print(f"ratio (models per CPU-s, ours / peer): {peer_cpu / ours_cpu:.2f}")


if __name__ == "__main__":
    main()
