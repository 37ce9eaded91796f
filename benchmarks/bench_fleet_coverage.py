"""A fleet end to end: 1,000 synthetic 2-state Poisson HMMs, and the coverage of the
true parameters by the 90% posterior intervals.

The fleet generator (``raybayes.datasets.simulate_fleet``) draws every group's rates
and switching probabilities, so the truth is known. ``fit_many`` runs on the Ray
backend (one worker per core); the script reports, per parameter, the share of the
groups whose 90% interval covers the truth (with the 99% binomial range of a
correctly calibrated fit), the share meeting bulk ESS >= 400 and R-hat <= 1.01, and
the throughput (core-seconds = wall time x workers, an upper bound on CPU time).
The peer comparison is ``bench_fleet.py``; this run is about calibration at scale.

    python benchmarks/bench_fleet_coverage.py --num-models 1000 --num-steps 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from scipy import stats

from raybayes.datasets.fleet import simulate_fleet
from raybayes.fleet import connect_results, fit_many

KEYS = ["region", "demographic", "network"]
TRUE = {"rate[0]": "rate_0", "rate[1]": "rate_1",
        "transition[0,1]": "p01", "transition[1,0]": "p10"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-models", type=int, default=1000)
    ap.add_argument("--num-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--output", default=None, help="keep the outputs here")
    args = ap.parse_args()
    tmp = args.output or tempfile.mkdtemp()
    networks = max(1, args.num_models // 20)
    truth = simulate_fleet(tmp, 4, 5, networks, num_steps=args.num_steps, seed=2026)
    n = len(truth)
    t0 = time.perf_counter()
    res = fit_many(f"{tmp}/data", KEYS, f"{tmp}/out", backend="ray",
                   num_workers=args.num_workers, batch_size=args.batch_size,
                   num_predictive_draws=100, progress_bar=True)
    wall = time.perf_counter() - t0
    man = res.manifest
    ok = man[man["status"] == "ok"]
    met = ((ok["min_ess_bulk"] >= 400) & (ok["max_r_hat"] <= 1.01)).mean()
    con = connect_results(f"{tmp}/out")
    s = con.execute(
        "SELECT region, demographic, network, parameter, q05, q95 FROM summary").df()
    t = truth.melt(id_vars=KEYS, value_vars=list(TRUE.values()), var_name="col",
                   value_name="true")
    t["parameter"] = t["col"].map({v: k for k, v in TRUE.items()})
    m = s.merge(t, on=KEYS + ["parameter"])
    m["covered"] = (m["q05"] <= m["true"]) & (m["true"] <= m["q95"])
    lo, hi = stats.binom(n, 0.9).ppf([0.005, 0.995]) / n
    print(f"models {n}, T {args.num_steps}, workers {args.num_workers}, "
          f"batch size {args.batch_size}")
    print(f"ok {res.num_ok}, failed {res.num_failed}, invalid {res.num_invalid}; "
          f"wall {wall:.0f} s = {wall * args.num_workers / n:.2f} core-s per model "
          f"({n / wall * 3600:.0f} models per hour on {args.num_workers} cores)")
    print(f"bulk ESS >= 400 and R-hat <= 1.01: {met:.1%} of models; "
          f"median gradients per model {ok['num_gradients'].median():.0f}; "
          f"divergences {int(ok['num_divergences'].sum())}; "
          f"models restarted {int((ok['num_restarts'] > 0).sum())}")
    print(f"90% interval coverage (99% range for a calibrated fit: {lo:.3f}-{hi:.3f}):")
    for p, g in m.groupby("parameter"):
        print(f"  {p:16s} {g['covered'].mean():.3f}  ({int(g['covered'].sum())}/{len(g)})")
    print(f"  all              {m['covered'].mean():.3f}")
    ess = ok["min_ess_bulk"]
    print(f"min bulk ESS per model: 1% {np.quantile(ess, 0.01):.0f}, "
          f"median {ess.median():.0f}; max R-hat 99% {np.quantile(ok['max_r_hat'], 0.99):.4f}")


if __name__ == "__main__":
    main()
