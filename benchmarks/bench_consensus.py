"""Embarrassingly parallel MCMC against full-data NUTS, with NumPyro's rules as peer.

Four cases, each in one run:

* ``logistic``: Bayesian logistic regression on ``--rows`` x ``--dim`` simulated
  rows (the issue asks for 1,000,000 x 20), split into M = ``--shards`` shards.
* ``elasticity``: the hierarchical elasticity model (negative binomial) split by
  product; ``--centered auto`` uses the centring weights of
  ``ElasticityData.centering`` (computed once on the full data, the per-product
  ones split with the products) and ``--low-rank`` gives full NUTS a low-rank mass
  matrix. The measures cover its global parameters in their natural space
  (``beta_global``, ``mu_delta``, the log scales, ``beta_category``, ``gamma``),
  whatever sites each run samples.
* ``banana``: a model whose subposteriors are banana-shaped (``a + b^2`` is all the
  data identify), built so that the Gaussian rules fail; the diagnostics must fire.
* ``pool``: the logistic case on Ray with ``--workers`` workers, timing the
  subposteriors two ways in one run: all shards at once on one pool (what
  ``sample_subposteriors`` does: the pool serves shards x chains) and the shards
  one after another (``raybayes.sample`` on each shard's subposterior with the
  shard's key stream, each on its own pool of the same size); the draws must be
  identical, only the wall time differs.

For every M, ``raybayes.sample_subposteriors`` samples the subposteriors once; the
same draws are then combined by raybayes's rules and by NumPyro's
``numpyro.infer.hmc_util.consensus`` and ``parametric_draws`` (the peer). Each
combination is compared with full-data NUTS (``raybayes.sample``, same settings) in
the unconstrained space of the global sites: the largest error of a posterior mean
in posterior sds, the largest relative error of a posterior sd, the Mahalanobis
distance of the combined mean under the full posterior covariance, and the
2-Wasserstein distance between Gaussian fits of the two sets of draws after
whitening by the full posterior (0 means identical first two moments). Wall time
and the process's CPU time, full NUTS vs all shards (run one after another here)
and the slowest shard: its worker-seconds, the sum of its chunks' times (with the
``local`` backend the chains run one after another, so this is the wall time the
shard would take alone on one core, comparable with full NUTS's wall time there).

Usage:
    python benchmarks/bench_consensus.py --case logistic --rows 1000000 --dim 20
    python benchmarks/bench_consensus.py --case elasticity --products 1000 \\
        --weeks 156 --centered auto --low-rank
    python benchmarks/bench_consensus.py --case banana
    python benchmarks/bench_consensus.py --case pool --rows 100000 --dim 20 \\
        --shards 4 --chains 1 --workers 2 --pool-rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import time
import warnings

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.hmc_util import consensus as np_consensus
from numpyro.infer.hmc_util import parametric_draws as np_parametric_draws

import raybayes
from raybayes.config import derive_key
from raybayes.core.combination import (
    combined_mean_mcse,
    consensus,
    diagnose_combination,
    gaussian_product,
    kernel_product,
)
from raybayes.core.shard_density import trace_latent_sites
from raybayes.io import atomic_path
from raybayes.mcmc.subposterior import _flatten_globals, unconstrained_global_draws

LINES: list[str] = []


def load():
    """The machine's 1-minute load average (the figures depend on it)."""
    return f"load {os.getloadavg()[0]:.1f}"


def say(text=""):
    print(text, flush=True)
    LINES.append(text)


# ------------------------------------------------------------------------- models
def logistic(X, y=None):
    d = X.shape[1]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def banana(y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(a + b**2, 0.5), obs=y)


def elasticity_weighted(
    *args, w_beta_category=None, w_beta=None, w_delta=None, w_gamma=None, **kwargs
):
    """The elasticity model with the centring weights as arguments of their own.

    ``centered="auto"`` passes per-product weights inside a dict, which a split by
    product cannot reach; here ``w_beta`` and ``w_delta`` are split with the
    products, and every shard uses the weights computed on the full data (one
    parameterization, so the subposteriors multiply to the full posterior).
    Without weights the model is all non-centred (its default).
    """
    from raybayes.models.elasticity import elasticity_model

    centered = False
    if w_beta is not None:
        centered = dict(
            beta_category=w_beta_category, beta=w_beta, delta=w_delta, gamma=w_gamma
        )
    return elasticity_model(*args, centered=centered, **kwargs)


#: Scalar global sites of the elasticity model; the positive ones are compared
#: on the log scale.
ELASTICITY_SCALARS = ("beta_global", "mu_delta")
ELASTICITY_SCALES = (
    "sigma_category",
    "sigma_beta",
    "sigma_delta",
    "sigma_gamma",
    "concentration",
)


def elasticity_natural(model, kwargs, samples, *, seed):
    """Global parameters of the elasticity model, whatever its parameterization.

    ``(n, 7 + C + T C)``: ``beta_global``, ``mu_delta``, the log scales, then the
    category elasticities ``beta_category`` and the week effects ``gamma``
    (deterministic sites, recomputed from the latent draws where missing). Runs
    and combination rules that sample different sites are compared here.

    Args:
        samples: every latent site, ``(n, *site_shape)``.
    """
    from numpyro.infer import Predictive

    if "beta_category" not in samples or "gamma" not in samples:
        derived = Predictive(
            model,
            posterior_samples={k: jax.numpy.asarray(v) for k, v in samples.items()},
            return_sites=["beta_category", "gamma"],
        )(derive_key(seed, "natural"), **kwargs)
        samples = {**samples, **{k: np.asarray(v) for k, v in derived.items()}}
    n = len(samples["beta_global"])
    cols = [np.asarray(samples[k]).reshape(n, 1) for k in ELASTICITY_SCALARS]
    cols += [np.log(np.asarray(samples[k])).reshape(n, 1) for k in ELASTICITY_SCALES]
    labels = [*ELASTICITY_SCALARS, *(f"log {k}" for k in ELASTICITY_SCALES)]
    for k in ("beta_category", "gamma"):
        v = np.asarray(samples[k]).reshape(n, -1)
        cols.append(v)
        labels += [f"{k}[{j}]" for j in range(v.shape[1])]
    return np.concatenate(cols, axis=1).astype(np.float64), labels


# ------------------------------------------------------------------------ measures
def compare(comb, full):
    """Accuracy of combined draws against full-NUTS draws (unconstrained)."""
    mf, mc = full.mean(0), comb.mean(0)
    cf, cc = np.cov(full.T), np.cov(comb.T)
    sf, sc = np.sqrt(np.diag(cf)), np.sqrt(np.diag(cc))
    L = np.linalg.cholesky(cf)
    dm = np.linalg.solve(L, mc - mf)
    white = np.linalg.solve(L, np.linalg.solve(L, cc).T)  # L^-1 cc L^-T
    ev = np.clip(np.linalg.eigvalsh((white + white.T) / 2), 0, None)
    w2 = float(np.sqrt(dm @ dm + np.sum((np.sqrt(ev) - 1.0) ** 2)))
    return dict(
        worst=int(np.argmax(np.abs(mc - mf) / sf)),
        mean_err_sd=float(np.max(np.abs(mc - mf) / sf)),
        sd_rel_err=float(np.max(np.abs(sc / sf - 1.0))),
        mahalanobis=float(np.sqrt(dm @ dm)),
        w2_white=w2,
    )


def full_flat(idata, model, kwargs):
    sites, _ = trace_latent_sites(model, kwargs, None)
    names = list(idata.attrs.get("global_sites", []))
    n = int(idata.posterior.sizes["draw"])
    return _flatten_globals(idata.posterior, [sites[k] for k in names], n)[0]


def timed_subposteriors(model, kwargs, num_shards, partition, settings):
    """``(idata, wall_s, cpu_s)`` of one ``sample_subposteriors`` call.

    Its warnings (diagnostics that fire) are silenced: the report prints them.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", raybayes.RaybayesWarning)
        sub = raybayes.sample_subposteriors(
            model,
            model_kwargs=kwargs,
            num_shards=num_shards,
            partition=partition,
            **settings,
        )
    return sub, time.perf_counter() - t0, time.process_time() - c0


def _samples(posterior, names, n=None):
    """``{site: (chains * n, *shape)}`` from an ArviZ group (first ``n`` draws)."""
    out = {}
    for k in names:
        v = np.asarray(posterior[k].values)[:, :n]
        out[k] = v.reshape(-1, *v.shape[2:])
    return out


def _natural_map(natural, model, kwargs, sub):
    """``flat combined draws -> natural-space draws`` for one subposterior run."""
    from raybayes.mcmc.subposterior import _unflatten_globals

    n = int(sub.attrs["draws_per_chain"])
    chains = int(sub.posterior.sizes["chain"])
    names = list(np.atleast_1d(sub.attrs["global_sites"]))
    sites, _ = trace_latent_sites(model, kwargs, None)
    global_sites = [sites[k] for k in names]
    local = _samples(sub.posterior, [k for k in sub.posterior.data_vars
                                     if k not in names], n)

    def to_space(flat):
        values = _unflatten_globals(flat, global_sites, chains, n)
        samples = {k: v.reshape(chains * n, *v.shape[2:]) for k, v in values.items()}
        return natural({**samples, **local})[0]

    return to_space


def run_case(
    name, model, kwargs, args, partition=None, natural=None, full_model=None,
    full_kwargs=None, full_extra=None,
):
    """Full NUTS against the combined subposteriors, for every M.

    With ``natural`` (``samples -> (draws, labels)``, every latent site
    ``(n, *shape)`` in), draws are compared in the space it maps to (the model's
    natural parameters) instead of the unconstrained space of the global sample
    sites, so that full NUTS may run another parameterization of the same
    posterior (``full_model``, ``full_kwargs``, and ``full_extra`` such as
    ``low_rank_mass=True``). The MCSE z-scores are then left out (the bootstrap
    MCSE is in the unconstrained space).
    """
    settings = dict(
        num_chains=args.chains,
        num_warmup=args.warmup,
        num_samples=args.samples,
        seed=args.seed,
        backend=args.backend,
        progress_bar=args.progress,
    )
    say(f"## {name}")
    say(load())
    t0, c0 = time.perf_counter(), time.process_time()
    full = raybayes.sample(
        full_model or model,
        model_kwargs=full_kwargs or kwargs,
        **settings,
        **(full_extra or {}),
    )
    full_wall, full_cpu = time.perf_counter() - t0, time.process_time() - c0
    summ = raybayes.summary(full)
    say(
        f"full NUTS{' ' + str(full_extra) if full_extra else ''}: wall "
        f"{full_wall:.1f} s, CPU {full_cpu:.1f} s; min bulk ESS "
        f"{summ['ess_bulk'].min():.0f}, max R-hat {summ['r_hat'].max():.3f}, "
        f"divergences {int(full.sample_stats['diverging'].sum())}, leapfrog steps "
        f"per draw {float(full.sample_stats['n_steps'].mean()):.1f}; {load()}"
    )
    full_draws = space_labels = None
    if natural is not None:
        full_draws, space_labels = natural(
            _samples(full.posterior, list(full.posterior.data_vars))
        )
        k = len(ELASTICITY_SCALARS) + len(ELASTICITY_SCALES)
        ess = [
            float(az.ess(full_draws[:, j].reshape(args.chains, -1)))
            for j in range(full_draws.shape[1])
        ]
        say(
            f"compared in the natural space: {len(space_labels)} global parameters "
            f"(the first {k} scalar); full NUTS min bulk ESS there {min(ess):.0f}"
        )
    header = (
        f"{'M':>3} {'rule':<26}{'mean err/sd':>12}{'sd rel err':>11}"
        f"{'Mahalanobis':>12}{'W2 (white)':>11}{'combine s':>10}"
    )
    if natural is not None:
        header += f"{'scalars: mean err/sd':>22}{'sd rel err':>11}"
    for m in args.shards:
        sub, wall, cpu = timed_subposteriors(model, kwargs, m, partition, settings)
        draws, comb_ours, labels = unconstrained_global_draws(
            sub, model, model_kwargs=kwargs
        )
        to_space = np.asarray
        if natural is not None:
            to_space = _natural_map(natural, model, kwargs, sub)
        elif full_draws is None:
            full.attrs["global_sites"] = list(sub.attrs["global_sites"])
            full_draws = full_flat(full, model, kwargs)
        per_shard = np.atleast_1d(sub.attrs["worker_s_per_shard"])
        say("")
        say(
            f"M = {m}: {draws.shape[2]} global parameters, {draws.shape[1]} draws per "
            f"shard; all shards wall {wall:.1f} s (CPU {cpu:.1f} s), slowest shard "
            f"{per_shard.max():.1f} s; full NUTS / slowest shard = "
            f"{full_wall / per_shard.max():.2f}x; per-shard max R-hat "
            f"{np.max(sub.attrs['r_hat_max_per_shard']):.3f}, min bulk ESS "
            f"{np.min(sub.attrs['ess_bulk_min_per_shard']):.0f}, leapfrog steps per "
            f"draw {float(sub.sample_stats['n_steps'].mean()):.1f}; {load()}"
        )
        say(f"  diagnostics: {sub.attrs['combination_summary']}")
        for line in str(sub.attrs["combination_report"]).splitlines()[1:]:
            say(f"  {line.strip()}")
        say(header)
        key = derive_key(args.seed, "bench")
        n = draws.shape[1]
        rules = {}
        t = time.perf_counter()
        rules["raybayes consensus"] = (consensus(draws), time.perf_counter() - t)
        t = time.perf_counter()
        rules["raybayes gaussian_product"] = (
            gaussian_product(key, draws, n),
            time.perf_counter() - t,
        )
        if draws.shape[2] <= 10:
            t = time.perf_counter()
            rules["raybayes semiparametric"] = (
                kernel_product(key, draws, n),
                time.perf_counter() - t,
            )
        subs = [{"x": d} for d in draws]
        peers = {
            "numpyro consensus": lambda subs=subs: np_consensus(subs)["x"],
            "numpyro parametric_draws": lambda subs=subs, n=n, key=key: (
                np_parametric_draws(subs, n, rng_key=key)["x"]
            ),
        }
        for rule, fn in peers.items():
            t = time.perf_counter()
            try:
                rules[rule] = (np.asarray(fn()), time.perf_counter() - t)
            except Exception as err:  # noqa: BLE001 - the peer's failure is a result
                say(f"{m:>3} {rule:<26}failed: {type(err).__name__}: {err}")
        for rule, (comb, secs) in rules.items():
            try:
                in_space = to_space(comb)
            except Exception as err:  # noqa: BLE001 - e.g. non-finite peer draws
                say(f"{m:>3} {rule:<26}not comparable: {type(err).__name__}: {err}")
                continue
            r = compare(in_space, full_draws)
            line = (
                f"{m:>3} {rule:<26}{r['mean_err_sd']:>12.3f}{r['sd_rel_err']:>11.3f}"
                f"{r['mahalanobis']:>12.3f}{r['w2_white']:>11.3f}{secs:>10.3f}"
            )
            if natural is not None:
                k = len(ELASTICITY_SCALARS) + len(ELASTICITY_SCALES)
                rs = compare(in_space[:, :k], full_draws[:, :k])
                line += f"{rs['mean_err_sd']:>22.3f}{rs['sd_rel_err']:>11.3f}"
            say(line)
        space_of = labels if natural is None else space_labels
        comb_space = to_space(rules["raybayes consensus"][0])
        r = compare(comb_space, full_draws)
        say(f"  largest mean error of consensus: {space_of[r['worst']]}")
        # Is the error within Monte Carlo error? Full NUTS: sd / sqrt(ESS) per
        # parameter; combined: the bootstrap MCSE of the diagnostics (which includes
        # the error of the estimated weights).
        full_sd = full_draws.std(0)
        ess = np.array(
            [
                float(az.ess(full_draws[:, j].reshape(args.chains, -1)))
                for j in range(full_draws.shape[1])
            ]
        )
        mc_full = full_sd / np.sqrt(ess)
        if natural is None:
            mc_comb = combined_mean_mcse(draws, seed=args.seed) * full_sd
            err = rules["raybayes consensus"][0].mean(0) - full_draws.mean(0)
            z = err / np.sqrt(mc_full**2 + mc_comb**2)
            j = int(np.argmax(np.abs(z)))
            say(
                f"  MCSE of the means (posterior sd): full NUTS at most "
                f"{np.max(mc_full / full_sd):.3f}, combined (bootstrap, weights "
                f"included) at most {np.max(mc_comb / full_sd):.3f}; largest |error| "
                f"/ joint MCSE {abs(z[j]):.2f} ({labels[j]}; |z| > 3.5 in "
                f"{int(np.sum(np.abs(z) > 3.5))} of {len(z)} parameters)"
            )
        else:
            say(
                f"  MCSE of the full-NUTS means: at most "
                f"{np.max(mc_full / full_sd):.3f} posterior sd"
            )
        if "numpyro consensus" in rules:
            d = np.abs(rules["raybayes consensus"][0] - rules["numpyro consensus"][0])
            say(
                "  raybayes vs NumPyro consensus on the same draws: max |diff| "
                f"{d.max():.2e}"
            )
        if name.startswith("banana"):
            dg = diagnose_combination(
                draws, rules["raybayes gaussian_product"][0], labels, seed=args.seed
            )
            say(f"  diagnostics of the Gaussian product: {dg.summary}")
    # Monte Carlo floor: two halves of the full run against each other.
    half = full_draws.shape[0] // 2
    r = compare(full_draws[:half], full_draws[half:])
    say("")
    say(
        f"noise floor (full NUTS, first half vs second half of the draws): mean err/sd "
        f"{r['mean_err_sd']:.3f}, sd rel err {r['sd_rel_err']:.3f}, Mahalanobis "
        f"{r['mahalanobis']:.3f}, W2 {r['w2_white']:.3f}"
    )
    say("")


def run_pool(model, kwargs, args):
    """All shards at once on one pool against the shards one after another."""
    from raybayes.backends import RayBackend
    from raybayes.core.partition import assign_entities, shard_model_kwargs
    from raybayes.mcmc.subposterior import SubposteriorModel

    settings = dict(
        num_chains=args.chains,
        num_warmup=args.warmup,
        num_samples=args.samples,
        seed=args.seed,
        progress_bar=args.progress,
        num_workers=args.workers,
    )
    say(f"## all shards at once vs one after another, Ray, {args.workers} workers")
    for attempt in range(3):  # Ray's node start gives up after 30 s under load
        try:
            engine = RayBackend(num_cpus=args.workers).start()
            break
        except Exception as err:  # noqa: BLE001 - retried, then raised
            say(f"Ray did not start ({type(err).__name__}; {load()}); retrying")
            import ray

            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(20)

    def at_once(m, part):
        together, wall, _ = timed_subposteriors(
            model, kwargs, m, part, {**settings, "backend": engine}
        )
        say(f"  all at once: wall {wall:.1f} s; {load()}")
        sites = together.attrs["global_sites"]
        return wall, [
            {k: together[f"shard_{j}"][k].values for k in sites} for j in range(m)
        ]

    def one_after_another(m, part):
        specs = assign_entities(part.num_entities(kwargs), m, part.plate)
        sub = SubposteriorModel(model, m, part.local_plates)
        t0, walls, draws = time.perf_counter(), [], []
        for spec in specs:
            t1 = time.perf_counter()
            alone = raybayes.sample(
                sub,
                model_kwargs=shard_model_kwargs(kwargs, part, spec),
                backend=engine,
                _key_stream=(spec.shard_id,),
                **settings,
            )
            walls.append(time.perf_counter() - t1)
            draws.append({k: v.values for k, v in alone.posterior.items()})
        wall = time.perf_counter() - t0
        say(
            f"  one after another: wall {wall:.1f} s (shards "
            f"{', '.join(f'{w:.1f}' for w in walls)} s); {load()}"
        )
        return wall, draws

    try:
        for m in args.shards:
            part = raybayes.plan(logistic, kwargs, num_shards=m).partition
            for rnd in range(args.pool_rounds):
                # Odd rounds swap the order: whichever runs first pays for Ray's
                # cold start of worker processes.
                first_at_once = rnd % 2 == 0
                say(f"{load()} before M = {m}, round {rnd + 1}")
                if first_at_once:
                    (t_at_once, a), (t_serial, b) = (
                        at_once(m, part),
                        one_after_another(m, part),
                    )
                else:
                    (t_serial, b), (t_at_once, a) = (
                        one_after_another(m, part),
                        at_once(m, part),
                    )
                same = all(
                    a[j][k].tobytes() == b[j][k].tobytes()
                    for j in range(m)
                    for k in a[j]
                )
                say(
                    f"M = {m}, {args.chains} chain(s) per shard, {args.workers} "
                    f"workers, round {rnd + 1} "
                    f"({'all at once' if first_at_once else 'one after another'} "
                    f"first): one after another {t_serial:.1f} s / all at once "
                    f"{t_at_once:.1f} s = {t_serial / t_at_once:.2f}x; draws "
                    f"identical: {same}"
                )
    finally:
        engine.shutdown()
    say("")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--case",
        choices=["logistic", "elasticity", "banana", "pool"],
        action="append",
    )
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--products", type=int, default=1000)
    p.add_argument("--categories", type=int, default=10)
    p.add_argument("--weeks", type=int, default=156)
    p.add_argument(
        "--shards", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 8]
    )
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="local")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (pool case)")
    p.add_argument(
        "--pool-rounds",
        type=int,
        default=1,
        help="pool case: timing rounds per M; even rounds run the shards one after "
        "another first",
    )
    p.add_argument(
        "--centered",
        choices=["false", "auto"],
        default="false",
        help="elasticity: the parameterization (auto: ElasticityData.centering "
        "weights from the full data, the same in every shard)",
    )
    p.add_argument(
        "--low-rank",
        action="store_true",
        help="elasticity: full NUTS with low_rank_mass=True (the shards keep a "
        "diagonal mass matrix)",
    )
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", help="also write the report to this file (atomically)")
    args = p.parse_args()
    say(
        f"bench_consensus: {platform.processor() or platform.machine()}, jax "
        f"{jax.__version__}, numpyro {numpyro.__version__}; {args.chains} chains x "
        f"({args.warmup} + {args.samples}) per run, backend "
        f"{'ray (pool case)' if args.case == ['pool'] else args.backend}, seed "
        f"{args.seed}"
    )
    for case in args.case or ["logistic", "elasticity", "banana"]:
        rng = np.random.default_rng(args.seed)
        if case in ("logistic", "pool"):
            X = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
            beta = rng.normal(size=args.dim) * 0.5
            p_ = 1 / (1 + np.exp(-(0.3 + X @ beta)))
            y = (rng.random(args.rows) < p_).astype(np.float32)
            if case == "pool":
                run_pool(logistic, {"X": X, "y": y}, args)
                continue
            run_case(
                f"logistic regression, {args.rows:,} x {args.dim}",
                logistic,
                {"X": X, "y": y},
                args,
            )
        elif case == "elasticity":
            from raybayes.datasets.elasticity import (
                prepare_elasticity_data,
                simulate_elasticity,
            )

            df, _ = simulate_elasticity(
                args.categories, args.products, args.weeks, seed=args.seed
            )
            data = prepare_elasticity_data(
                df, product_cols=("product",), category_col="category"
            )
            kwargs = data.model_kwargs()
            model = elasticity_weighted
            if args.centered == "auto":
                weights = data.centering()
                kwargs.update({f"w_{k}": v for k, v in weights.items()})
            split = raybayes.plan(model, kwargs, num_shards=max(args.shards))
            part = next(c.partition for c in split.candidates if c.plate == "products")
            if args.centered == "auto":  # the per-product weights go with products
                part = dataclasses.replace(
                    part, entity_args=(*part.entity_args, "w_beta", "w_delta")
                )
            run_case(
                f"elasticity, {args.categories} categories x {args.products} "
                f"products x {args.weeks} weeks = {data.num_obs:,} rows, split by "
                f"product, centred {args.centered!r}",
                model,
                kwargs,
                args,
                partition=part,
                natural=functools.partial(
                    elasticity_natural, model, kwargs, seed=args.seed
                ),
                full_extra={"low_rank_mass": True} if args.low_rank else None,
            )
        else:
            y = (1.0 + 0.5 * rng.normal(size=400)).astype(np.float32)
            run_case(
                "banana (built to fail): y ~ N(a + b^2, 0.5), 400 rows",
                banana,
                {"y": y},
                args,
            )
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
