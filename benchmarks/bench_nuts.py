"""NUTS on the elasticity model: raybayes against NumPyro, in one run.

Three modes (each prints the peer's figure, ours, and their ratio):

- ``density``: ns per row of one potential + gradient evaluation of the elasticity
  model, with NumPyro's ``NegativeBinomial2`` and with raybayes'
  ``NegativeBinomialLogMean`` (the model's default), on the orange-juice data.
- ``orange-juice``: the quickstart job (``--stores`` stores, all by default):
  NumPyro NUTS (``chain_method="parallel"``, default diagonal adaptation, the
  model's default non-centred form) against ``raybayes.sample`` with the
  data-informed centring (``centered="auto"``), with NumPyro's diagonal mass
  matrix and with the low-rank plus diagonal one (``low_rank_mass=True``;
  ``--variants`` picks), same chains, warmup and draws.
  Wall time, leapfrog steps per draw, min bulk/tail ESS, ESS per gradient and per
  second, max R-hat over the brand and product elasticities and hyperparameters.
- ``simulation``: the same on simulated data with known truth (``--products``
  products x 156 weeks, 10 categories), plus the coverage of the 90% intervals of
  the product elasticities.

NumPyro's parallel method needs one XLA host device per chain, set before JAX is
imported, so the peer runs in its own subprocess.

    python benchmarks/bench_nuts.py density
    python benchmarks/bench_nuts.py orange-juice [--stores 83] [--chains 4] [--warmup 500] [--samples 500] [--variants diagonal,low-rank]
    python benchmarks/bench_nuts.py simulation [--products 1000]
    python benchmarks/bench_nuts.py gaussian [--warmup 300 --samples 300]

``--out NAME`` (``orange-juice`` and ``simulation``) also writes
``benchmarks/results/NAME.json`` (every run's figures, with the minimum ESS and
maximum R-hat of each site) and ``benchmarks/results/NAME_<variant>.csv`` (mean, sd,
bulk and tail ESS and R-hat of every brand and product elasticity and every
hyperparameter), and prints the hyperparameters and every product elasticity.

``gaussian``: a correlated Gaussian (d = 20), NumPyro's diagonal adaptation against
the low-rank plus diagonal mass matrix (``low_rank_mass=True``): steps per draw,
ESS per gradient, moments against the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPORT_SITES = ("beta", "beta_category", "beta_global", "sigma_category", "sigma_beta",
                "sigma_delta", "sigma_gamma", "mu_delta", "concentration")

HYPER_SITES = ("beta_global", "sigma_category", "sigma_beta", "sigma_delta",
               "sigma_gamma", "mu_delta", "concentration")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

PEER = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
import numpyro
numpyro.set_host_device_count(cfg["chains"])
import jax, numpy as np
from numpyro.infer import MCMC, NUTS
sys.path.insert(0, cfg["bench_dir"])
from bench_nuts import load_data, report
from raybayes.models import elasticity_model
data, truth = load_data(cfg)
t = time.perf_counter()
m = MCMC(NUTS(elasticity_model), num_warmup=cfg["warmup"], num_samples=cfg["samples"],
         num_chains=cfg["chains"], chain_method="parallel", progress_bar=False)
m.run(jax.random.PRNGKey(cfg["seed"]), extra_fields=("num_steps",), **data.model_kwargs())
draws = {k: np.asarray(v) for k, v in m.get_samples(group_by_chain=True).items()}
wall = time.perf_counter() - t
steps = np.asarray(m.get_extra_fields(group_by_chain=True)["num_steps"])
print(json.dumps(report(draws, steps, wall, truth)))
"""


def load_data(cfg):
    from raybayes.datasets import load_orange_juice, prepare_elasticity_data, simulate_elasticity

    if cfg["mode"] == "orange-juice":
        stores = None if cfg["stores"] >= 83 else cfg["stores"]
        return prepare_elasticity_data(load_orange_juice(stores=stores)), None
    df, truth = simulate_elasticity(10, cfg["products"], 156, seed=cfg["seed"])
    data = prepare_elasticity_data(df, product_cols=("product",), category_col="category")
    return data, {"beta": truth["beta"].tolist()}


def report(draws, steps, wall_s, truth=None):
    """Diagnostics of ``draws`` (site -> (chains, draws, ...)) as a JSON-able dict."""
    import arviz as az

    ds = az.convert_to_dataset({k: v for k, v in draws.items() if k in REPORT_SITES})
    ess_bulk = az.ess(ds, method="bulk")
    ess_tail = az.ess(ds, method="tail")
    rhat = az.rhat(ds)
    by_site = {k: dict(min_ess_bulk=float(ess_bulk[k].min()),
                       min_ess_tail=float(ess_tail[k].min()),
                       max_rhat=float(rhat[k].max()))
               for k in ds.data_vars}
    min_bulk = min(float(ess_bulk[k].min()) for k in ds.data_vars)
    min_tail = min(float(ess_tail[k].min()) for k in ds.data_vars)
    max_rhat = max(float(rhat[k].max()) for k in ds.data_vars)
    grads = float(np.sum(steps))
    out = dict(wall_s=wall_s, steps_per_draw=float(np.mean(steps)), gradients=grads,
               min_ess_bulk=min_bulk, min_ess_tail=min_tail, max_rhat=max_rhat,
               min_ess_bulk_per_s=min_bulk / wall_s,
               min_ess_bulk_per_1000_gradients=1000 * min_bulk / grads, by_site=by_site,
               elements=element_table(draws, ess_bulk, ess_tail, rhat))
    if truth is not None:
        beta = draws["beta"].reshape(-1, draws["beta"].shape[-1])
        lo, hi = np.quantile(beta, [0.05, 0.95], axis=0)
        true = np.asarray(truth["beta"])
        out["coverage_90"] = float(np.mean((lo < true) & (true < hi)))
        out["rmse"] = float(np.sqrt(np.mean((beta.mean(0) - true) ** 2)))
    return out


def element_table(draws, ess_bulk, ess_tail, rhat):
    """Rows ``[site, index, mean, sd, ess_bulk, ess_tail, r_hat]``, one per element."""
    rows = []
    for k in REPORT_SITES:
        if k not in draws:
            continue
        x = np.asarray(draws[k])
        flat = x.reshape(x.shape[0] * x.shape[1], -1)
        eb, et, rh = (np.asarray(d[k]).reshape(-1) for d in (ess_bulk, ess_tail, rhat))
        for i in range(flat.shape[1]):
            rows.append([k, i, float(flat[:, i].mean()), float(flat[:, i].std()),
                         float(eb[i]), float(et[i]), float(rh[i])])
    return rows


def print_elements(r):
    """Print the hyperparameters and every brand and product elasticity of run ``r``."""
    print(f"  {'site':15s} {'index':>5s} {'mean':>8s} {'sd':>7s} {'ess_bulk':>8s} "
          f"{'ess_tail':>8s} {'r_hat':>6s}")
    order = {k: i for i, k in enumerate(HYPER_SITES + ("beta_category", "beta"))}
    for site, i, mean, sd, eb, et, rh in sorted(
            r["elements"], key=lambda row: (order.get(row[0], 99), row[1])):
        print(f"  {site:15s} {i:5d} {mean:8.3f} {sd:7.3f} {eb:8.0f} {et:8.0f} "
              f"{rh:6.3f}")


def save_results(name, header, results):
    """Write ``results`` under ``benchmarks/results/`` (JSON + one CSV per run)."""
    from raybayes.io import atomic_path

    os.makedirs(RESULTS_DIR, exist_ok=True)
    summary = {run: {k: v for k, v in r.items() if k != "elements"}
               for run, r in results.items()}
    with atomic_path(os.path.join(RESULTS_DIR, f"{name}.json")) as tmp:
        tmp.write_text(json.dumps(dict(header=header, runs=summary), indent=1))
    for r in results.values():
        tag = r.get("tag", "run")
        lines = ["site,index,mean,sd,ess_bulk,ess_tail,r_hat"]
        lines += [f"{s},{i},{m:.6g},{sd:.6g},{eb:.1f},{et:.1f},{rh:.4f}"
                  for s, i, m, sd, eb, et, rh in r["elements"]]
        with atomic_path(os.path.join(RESULTS_DIR, f"{name}_{tag}.csv")) as tmp:
            tmp.write_text("\n".join(lines) + "\n")


def bench_density(a):
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from numpyro.infer.util import initialize_model

    import raybayes.models.elasticity as em
    from raybayes.datasets import load_orange_juice, prepare_elasticity_data

    data = prepare_elasticity_data(load_orange_juice())
    kwargs = data.model_kwargs()
    ours = em.NegativeBinomialLogMean
    forms = {"NumPyro NegativeBinomial2": lambda eta, phi: dist.NegativeBinomial2(
        jnp.exp(eta), phi), "raybayes NegativeBinomialLogMean": ours}
    times = {}
    for name, form in forms.items():
        em.NegativeBinomialLogMean = form
        try:
            info = initialize_model(jax.random.PRNGKey(0), em.elasticity_model,
                                    model_kwargs=kwargs)
            z = {k: 0.1 * jnp.ones_like(v) for k, v in info.param_info.z.items()}
            z["mu_delta"] = jnp.float32(np.log(data.units.mean()))
            z["concentration"] = jnp.float32(np.log(4.0))
            f = jax.jit(jax.value_and_grad(info.potential_fn))
            jax.block_until_ready(f(z))
        finally:
            em.NegativeBinomialLogMean = ours
        best = np.inf
        for _ in range(a.repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(z))
            best = min(best, time.perf_counter() - t)
        times[name] = best / data.num_obs * 1e9
        print(f"{name:34s}: {times[name]:7.0f} ns per row (potential + gradient, "
              f"{data.num_obs:,} rows, best of {a.repeats})")
    peer, mine = times.values()
    print(f"speed-up: {peer / mine:.1f}x")


def bench_sampler(a):
    cfg = dict(mode=a.mode, stores=a.stores, products=a.products, chains=a.chains,
               warmup=a.warmup, samples=a.samples, seed=a.seed,
               bench_dir=os.path.dirname(os.path.abspath(__file__)))
    results = {}
    if not a.skip_peer:
        out = subprocess.run([sys.executable, "-c", PEER, json.dumps(cfg)],
                             capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(1)
        results["NumPyro NUTS (parallel, non-centred, diagonal)"] = dict(
            json.loads(out.stdout.strip().splitlines()[-1]), tag="numpyro")

    import raybayes
    import raybayes.mcmc.sampler as sampler_module
    from raybayes.models import elasticity_model

    if a.first_share is not None:
        sampler_module.LOW_RANK_FIRST_SHARE = a.first_share

    data, truth = load_data(cfg)
    variants = {"diagonal": False, "low-rank": True}
    kernel_kwargs = None
    if a.init == "moments":
        from raybayes.mcmc import init_near_value

        values = data.initial_values(centered="auto")
        kernel_kwargs = {"init_strategy": init_near_value(values=values)}
    if a.init_mass == "information":
        kernel_kwargs = dict(kernel_kwargs or {}, inverse_mass_matrix=(
            data.initial_inverse_mass(centered="auto")))
    for variant in a.variants.split(","):
        t = time.perf_counter()
        idata = raybayes.sample(elasticity_model,
                                model_kwargs=data.model_kwargs(centered="auto"),
                                kernel_kwargs=kernel_kwargs,
                                num_chains=a.chains, num_warmup=a.warmup,
                                num_samples=a.samples, seed=a.seed, backend=a.backend,
                                progress_bar=a.progress_bar,
                                low_rank_mass=variants[variant])
        wall = time.perf_counter() - t
        if a.save_idata:
            idata.to_netcdf(f"{a.save_idata}_{variant}.nc")
        draws = {k: idata.posterior[k].values for k in REPORT_SITES if k in idata.posterior}
        steps = idata.sample_stats["n_steps"].values
        r = report(draws, steps, wall, truth)
        r["tag"] = variant
        if variants[variant]:
            r["low_rank_mass_rank"] = idata.attrs.get("low_rank_mass_rank")
        share = sampler_module.LOW_RANK_FIRST_SHARE
        results[f"raybayes (centered='auto', {variant} mass matrix, init={a.init}, "
                f"init mass {a.init_mass}, first share {share:.2f})"] = r

    header = (f"{a.mode}: {data.num_obs:,} rows, {data.num_products} products; "
              f"{a.chains} chains x ({a.warmup} warmup + {a.samples} draws); backend={a.backend}; "
              f"seed={a.seed}; load average at the end {os.getloadavg()}")
    print(header)
    keys = ["wall_s", "steps_per_draw", "min_ess_bulk", "min_ess_tail", "max_rhat",
            "min_ess_bulk_per_s", "min_ess_bulk_per_1000_gradients"]
    if truth is not None:
        keys += ["coverage_90", "rmse"]
    for name, r in results.items():
        print(name)
        for k in keys:
            print(f"  {k:34s} {r[k]:10.3f}")
        if "low_rank_mass_rank" in r:
            print(f"  {'low_rank_mass_rank':34s} {r['low_rank_mass_rank']:10d}")
        for site, f in r["by_site"].items():
            print(f"  {site:15s} min bulk ESS {f['min_ess_bulk']:7.0f}, min tail ESS "
                  f"{f['min_ess_tail']:7.0f}, max R-hat {f['max_rhat']:.3f}")
        if a.out:
            print_elements(r)
    if a.out:
        save_results(a.out, header, results)
    if not a.skip_peer:
        names = list(results)
        peer = results[names[0]]
        for name in names[1:]:
            mine = results[name]
            print(f"ratios ({name} / NumPyro): wall {mine['wall_s'] / peer['wall_s']:.2f}, "
                  f"steps per draw {mine['steps_per_draw'] / peer['steps_per_draw']:.2f}, "
                  "ESS per gradient "
                  f"{mine['min_ess_bulk_per_1000_gradients'] / peer['min_ess_bulk_per_1000_gradients']:.2f}, "
                  f"ESS per second {mine['min_ess_bulk_per_s'] / peer['min_ess_bulk_per_s']:.2f}")


def bench_gaussian(a):
    """Correlated Gaussian (d = 20, two strong directions): diagonal against low-rank."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    import raybayes

    d = 20
    rng = np.random.default_rng(0)
    a2 = rng.normal(size=(d, 2))
    cov = np.diag(rng.uniform(0.5, 2.0, d) ** 2) + 25.0 * a2 @ a2.T
    chol = jnp.asarray(np.linalg.cholesky(cov), jnp.float32)
    sd = np.sqrt(np.diag(cov))

    def model():
        numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(d), scale_tril=chol))

    print(f"correlated Gaussian, d = {d}; {a.chains} chains x ({a.warmup} warmup + "
          f"{a.samples} draws); local backend")
    for name, low_rank in (("NumPyro diagonal", False), ("low-rank", True)):
        t = time.perf_counter()
        idata = raybayes.sample(model, num_chains=a.chains, num_warmup=a.warmup,
                                num_samples=a.samples, seed=a.seed, backend="local",
                                progress_bar=False, low_rank_mass=low_rank)
        wall = time.perf_counter() - t
        x = idata.posterior["x"].values.reshape(-1, d)
        steps = idata.sample_stats["n_steps"].values
        r = report({"beta": idata.posterior["x"].values}, steps, wall)
        print(f"{name:17s}: {steps.mean():5.1f} steps per draw, min bulk ESS "
              f"{r['min_ess_bulk']:6.0f}, {r['min_ess_bulk_per_1000_gradients']:5.1f} per "
              f"1,000 gradients, max |mean| / sd {np.abs(x.mean(0) / sd).max():.3f}, "
              f"sd / true sd in [{(x.std(0) / sd).min():.3f}, {(x.std(0) / sd).max():.3f}], "
              f"rank {idata.attrs.get('low_rank_mass_rank', '-')}, wall {wall:.0f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["density", "orange-juice", "simulation", "gaussian"])
    ap.add_argument("--stores", type=int, default=83)
    ap.add_argument("--products", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default="local")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--variants", default="diagonal,low-rank",
                    help="raybayes mass matrices to run: diagonal, low-rank or both")
    ap.add_argument("--out", default=None,
                    help="save the figures as benchmarks/results/OUT.json and "
                    "OUT_<run>.csv")
    ap.add_argument("--progress-bar", action="store_true",
                    help="print raybayes' progress (a status line every 30 s in a log)")
    ap.add_argument("--init", choices=["moments", "uniform"], default="moments",
                    help="raybayes' chains start near the data's moment estimates "
                    "(ElasticityData.initial_values, jittered) or, as NumPyro's "
                    "default, uniformly in (-2, 2) unconstrained")
    ap.add_argument("--init-mass", choices=["gradient", "information"],
                    default="gradient",
                    help="low-rank: the first phase's initial diagonal, 1 / |gradient| "
                    "at the start (nutpie's) or ElasticityData.initial_inverse_mass")
    ap.add_argument("--first-share", type=float, default=None,
                    help="share of the warmup in the first low-rank phase "
                    "(raybayes.mcmc.sampler.LOW_RANK_FIRST_SHARE, default 1/3)")
    ap.add_argument("--save-idata", default=None, metavar="PREFIX",
                    help="write each raybayes run's InferenceData to "
                    "PREFIX_<variant>.nc")
    a = ap.parse_args()
    if a.mode == "density":
        bench_density(a)
    elif a.mode == "gaussian":
        bench_gaussian(a)
    else:
        bench_sampler(a)


if __name__ == "__main__":
    main()
