"""Cross-chain (pooled) mass-matrix adaptation vs per-chain adaptation: ESS per gradient.

For each model, in one run, with the same number of chains, warmup and draws:

* NumPyro ``MCMC(NUTS)``, chains run one after another (per-chain adaptation; the
  peer);
* raybayes ``sample`` with per-chain adaptation (NumPyro's kernel, chunked);
* raybayes ``sample(cross_chain_adaptation=True)``: at the end of each slow
  adaptation window the chains' covariance estimates are pooled.

Prints the minimum bulk ESS over parameters (ArviZ), the gradient evaluations of
the sampling phase (sum of ``n_steps``), their ratio (ESS per 1,000 gradients), the
wall time, and the ratios to the peer. A short warmup with several chains is where
pooling matters: each chain's own estimate then rests on few draws.

Usage:
    python benchmarks/bench_cross_chain.py --chains 8 --warmup 200 --samples 500
"""

from __future__ import annotations

import argparse
import platform
import time

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS

import raybayes

SCALES = np.logspace(-2, 2, 50)


def ill_conditioned():
    """50 independent normals, scales 0.01 .. 100."""
    numpyro.sample("x", dist.Normal(0.0, SCALES))


Y = np.array([28.0, 8, -3, 7, -1, 1, 18, 12])
SIGMA = np.array([15.0, 10, 16, 11, 9, 11, 10, 18])


def eight_schools():
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("school", 8):
        z = numpyro.sample("theta_trans", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu + tau * z, SIGMA), obs=Y)


def correlated():
    """A 20-d Gaussian with correlation 0.9 and scales 0.1 .. 10 (diagonal mass
    matrices capture the scales only)."""
    d = 20
    scales = np.logspace(-1, 1, d)
    corr = 0.9 * np.ones((d, d)) + 0.1 * np.eye(d)
    numpyro.sample(
        "x", dist.MultivariateNormal(np.zeros(d), corr * np.outer(scales, scales))
    )


MODELS = {
    "ill_conditioned": ill_conditioned,
    "eight_schools": eight_schools,
    "correlated": correlated,
}


def figures(idata, elapsed):
    ess = az.ess(idata, method="bulk")
    min_ess = float(min(ess[v].values.min() for v in ess.data_vars))
    grads = int(idata.sample_stats["n_steps"].values.sum())
    return dict(
        ess=min_ess,
        grads=grads,
        per_k=1000 * min_ess / grads,
        time=elapsed,
        rhat=float(max(az.rhat(idata)[v].values.max() for v in ess.data_vars)),
    )


def peer(model, args):
    start = time.perf_counter()
    mcmc = MCMC(
        NUTS(model),
        num_warmup=args.warmup,
        num_samples=args.samples,
        num_chains=args.chains,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(args.seed), extra_fields=("num_steps",))
    elapsed = time.perf_counter() - start
    idata = az.from_numpyro(mcmc)
    steps = mcmc.get_extra_fields(group_by_chain=True)["num_steps"]
    idata.sample_stats["n_steps"] = (("chain", "draw"), np.asarray(steps))
    return figures(idata, elapsed)


def ours(model, args, cross_chain):
    start = time.perf_counter()
    idata = raybayes.sample(
        model,
        num_chains=args.chains,
        num_warmup=args.warmup,
        num_samples=args.samples,
        seed=args.seed,
        backend=args.backend,
        num_workers=args.workers,
        progress_bar=False,
        cross_chain_adaptation=cross_chain,
    )
    return figures(idata, time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="local")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    print(
        f"{args.chains} chains x ({args.warmup} warmup + {args.samples} draws), "
        f"seed {args.seed}, backend {args.backend}; {platform.machine()}, "
        f"jax {jax.__version__}, numpyro {numpyro.__version__}"
    )
    print(
        "| model | method | min bulk ESS | gradients (sampling) | ESS / 1k grad | "
        "max R-hat | wall s | ESS/grad vs peer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = MODELS[name]
        rows = [
            ("NumPyro MCMC (peer)", peer(model, args)),
            ("raybayes per-chain", ours(model, args, False)),
            ("raybayes cross-chain", ours(model, args, True)),
        ]
        base = rows[0][1]["per_k"]
        for label, f in rows:
            print(
                f"| {name} | {label} | {f['ess']:.0f} | {f['grads']:,} | "
                f"{f['per_k']:.2f} | {f['rhat']:.3f} | {f['time']:.1f} | "
                f"{f['per_k'] / base:.2f} |"
            )


if __name__ == "__main__":
    main()
