"""The model zoo: NumPyro models written the way their users write them.

Each :class:`ZooModel` holds a model, a function that builds its data, where it
comes from, and what the shard algorithms must do with it: run (``expect`` empty)
or fail before any compute with a clear error (``expect[(method, num_shards)]``, a
regular expression the message must match).

Sources: posteriordb (Stan models translated plainly; data and reference
posteriors in ``tests/data/posteriordb``, see its README), the inference-gym radon
contextual-effects model (``tests/data/radon``), and NumPyro's examples and
tutorials (eight schools, logistic regression, varying intercepts, GLMs, an AR(1)
time series, a Gaussian mixture with an enumerated assignment), on simulated data
with fixed seeds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from numpyro.contrib.funsor import config_enumerate
from numpyro.distributions.transforms import OrderedTransform
from numpyro.infer.reparam import LocScaleReparam

DATA = Path(__file__).parents[1] / "data"
POSTERIORDB = DATA / "posteriordb"


def _posteriordb(name):
    folder = POSTERIORDB / name
    data = json.loads((folder / "data.json").read_text())
    stats = json.loads((folder / "summary.json").read_text())["stats"]
    return data, stats


def _reference(stats):
    """``{site: (mean (shape), sd (shape))}`` from posteriordb's ``beta[1]`` keys."""
    grouped = {}
    for key, s in stats.items():
        m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", key)
        grouped.setdefault(m.group(1), []).append(
            (int(m.group(2) or 0), s["mean"], s["sd"])
        )
    out = {}
    for name, rows in grouped.items():
        rows.sort()
        mean = np.array([r[1] for r in rows])
        sd = np.array([r[2] for r in rows])
        out[name] = (mean, sd) if rows[0][0] else (mean[0], sd[0])
    return out


@dataclass
class ZooModel:
    """One model of the zoo.

    Attributes:
        name: short name.
        model: the NumPyro model.
        data: builds ``model_kwargs``.
        source: where the model and data come from.
        reference: ``{site: (mean, sd)}`` of a reference posterior, or ``None``.
        ref_tol: tolerance of the Laplace and SVI means, in reference sds.
        expect: ``{(method, num_shards): regex}`` for cases that must fail with a
            clear error before compute; every other case must run.
        expect_after_compute: the expected errors come after compute (a model
            without a proper mode); such cases follow the usual slow marks.
    """

    name: str
    model: Callable
    data: Callable[[], dict]
    source: str
    reference: dict | None = None
    ref_tol: float = 0.3
    expect: dict = field(default_factory=dict)
    #: the expected errors come after the MAP (no proper mode), not at plan time
    expect_after_compute: bool = False


# ----------------------------------------------------------------- posteriordb
def eight_schools_noncentered(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0, 1))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _eight_schools():
    data, _ = _posteriordb("eight_schools-eight_schools_noncentered")
    return dict(
        J=int(data["J"]), sigma=np.array(data["sigma"], float), y=np.array(data["y"])
    )


def linear_regression(X, y=None):
    """Stan's ``y ~ normal(beta[1] + X * beta[2:], sigma)`` (posteriordb's ARM
    chapter 4 models); Stan's flat priors become priors far wider than the
    posterior, and the predictors are built outside the model, as Stan's
    ``transformed data``."""
    beta = numpyro.sample(
        "beta", dist.Normal(jnp.zeros(X.shape[1] + 1), 1000.0).to_event(1)
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(1000.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(beta[0] + X @ beta[1:], sigma), obs=y)


def _kidiq():
    d, _ = _posteriordb("kidiq_with_mom_work-kidscore_interaction_c")
    hs = np.array(d["mom_hs"], float) - np.mean(d["mom_hs"])
    iq = np.array(d["mom_iq"], float) - np.mean(d["mom_iq"])
    return dict(X=np.stack([hs, iq, hs * iq], 1), y=np.array(d["kid_score"], float))


def _mesquite():
    d, _ = _posteriordb("mesquite-logmesquite")
    cols = ["diam1", "diam2", "canopy_height", "total_height", "density"]
    X = np.stack([np.log(d[c]) for c in cols] + [np.array(d["group"], float)], 1)
    return dict(X=X, y=np.log(np.array(d["weight"], float)))


def _nes():
    d, _ = _posteriordb("nes1972-nes")
    age = np.array(d["age_discrete"])
    X = np.stack(
        [np.array(d["real_ideo"], float), np.array(d["race_adj"], float)]
        + [(age == k).astype(float) for k in (2, 3, 4)]
        + [np.array(d[c], float) for c in ("educ1", "gender", "income")],
        1,
    )
    return dict(X=X, y=np.array(d["partyid7"], float))


def _earnings():
    d, _ = _posteriordb("earnings-logearn_interaction_z")
    h = np.array(d["height"], float)
    z = (h - h.mean()) / h.std(ddof=1)
    male = np.array(d["male"], float)
    return dict(
        X=np.stack([z, male, z * male], 1), y=np.log(np.array(d["earn"], float))
    )


def gauss_mix(y):
    """posteriordb low_dim_gauss_mix: the assignment marginalised with log_mix,
    written as a ``numpyro.factor`` inside the data plate."""
    mu = numpyro.sample(
        "mu",
        dist.TransformedDistribution(
            dist.Normal(0, 2).expand([2]).to_event(1),
            dist.transforms.OrderedTransform(),
        ),
    )
    sigma = numpyro.sample("sigma", dist.HalfNormal(2).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5, 5))
    with numpyro.plate("data", y.shape[0]):
        lp = jnp.logaddexp(
            jnp.log(theta) + dist.Normal(mu[0], sigma[0]).log_prob(y),
            jnp.log1p(-theta) + dist.Normal(mu[1], sigma[1]).log_prob(y),
        )
        numpyro.factor("y", lp)


def _gauss_mix():
    d, _ = _posteriordb("low_dim_gauss_mix-low_dim_gauss_mix")
    return dict(y=np.array(d["y"], float))


def gp_pois_regr(x, k):
    """posteriordb gp_pois_regr: a latent GP (non-centred) with a Poisson link."""
    N = x.shape[0]
    rho = numpyro.sample("rho", dist.Gamma(25, 4))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2))
    f_tilde = numpyro.sample("f_tilde", dist.Normal(jnp.zeros(N), 1).to_event(1))
    cov = alpha**2 * jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / rho**2)
    L = jnp.linalg.cholesky(cov + 1e-10 * jnp.eye(N))
    f = numpyro.deterministic("f", L @ f_tilde)
    numpyro.sample("k", dist.Poisson(jnp.exp(f)).to_event(1), obs=k)


def _gp():
    d, _ = _posteriordb("gp_pois_regr-gp_pois_regr")
    return dict(x=np.array(d["x"], float), k=np.array(d["k"]))


# --------------------------------------------------------------- inference gym
def radon_contextual(county_idx, floor, floor_by_county, log_uranium, log_radon=None):
    """inference-gym "radon contextual effects" (Minnesota, HalfNormal scales),
    with the number of counties taken from the data, non-centred."""
    num_counties = int(np.max(county_idx)) + 1
    mean = numpyro.sample("county_effect_mean", dist.Normal(0.0, 1.0))
    scale = numpyro.sample("county_effect_scale", dist.HalfNormal(1.0))
    # Non-centred, as NumPyro users write hierarchical models for MAP and SVI: the
    # centred joint density is unbounded as the scale goes to 0 (no MAP).
    with (
        numpyro.plate("counties", num_counties),
        numpyro.handlers.reparam(config={"county_effect": LocScaleReparam(0.0)}),
    ):
        county_effect = numpyro.sample("county_effect", dist.Normal(mean, scale))
    weight = numpyro.sample("weight", dist.Normal(jnp.zeros(3), 1.0).to_event(1))
    sigma = numpyro.sample("log_radon_scale", dist.HalfNormal(1.0))
    loc = (
        weight[0] * log_uranium
        + weight[1] * floor
        + weight[2] * floor_by_county
        + county_effect[county_idx]
    )
    with numpyro.plate("houses", county_idx.shape[0]):
        numpyro.sample("log_radon", dist.Normal(loc, sigma), obs=log_radon)


def _radon():
    df = pd.read_csv(DATA / "radon" / "radon_MN_inference_gym.csv")
    return dict(
        county_idx=df.county_idx.to_numpy(),
        floor=df.floor.to_numpy(float),
        floor_by_county=df.floor_by_county.to_numpy(float),
        log_uranium=df.log_uranium.to_numpy(float),
        log_radon=df.log_radon.to_numpy(float),
    )


def _radon_reference():
    gt = json.loads(
        (
            DATA / "radon" / "radon_contextual_effects_minnesota_halfnormal"
            ".ground_truth.json"
        ).read_text()
    )["arrays"]
    if isinstance(gt, str):
        import ast

        gt = ast.literal_eval(gt)

    def pick(key):
        return (
            np.asarray(gt[f"IDENTITY_{key}_MEAN"]),
            np.asarray(gt[f"IDENTITY_{key}_STANDARD_DEVIATION"]),
        )

    return {
        "weight": pick("WEIGHT"),
        "county_effect_mean": pick("COUNTY_EFFECT_MEAN"),
        "log_radon_scale": pick("LOG_RADON_SCALE"),
    }


# ------------------------------------------------------ NumPyro examples (sim)
def logistic_regression(X, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(X.shape[1]), 1.0).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ w + b), obs=y)


def _logistic():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(401, 4))  # 401: the plate does not divide by 2
    y = rng.random(401) < 1 / (1 + np.exp(-(X @ [1.0, -0.5, 0.25, 0.0] + 0.3)))
    return dict(X=X, y=y.astype(np.int32))


def varying_intercepts(g, x, y=None):
    """The issue's model: ``G`` is taken from the data."""
    G = int(np.max(g)) + 1
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    s = numpyro.sample("s", dist.HalfNormal(2.0))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    with numpyro.plate("groups", G):
        a = numpyro.sample("a", dist.Normal(mu, s))
    with numpyro.plate("data", len(g)):
        numpyro.sample("y", dist.Normal(a[g] + b * x, 1.0), obs=y)


def _varying():
    rng = np.random.default_rng(2)
    G, n = 25, 8
    g = np.repeat(np.arange(G), n)
    a = 1.0 + 1.5 * rng.normal(size=G)
    x = rng.normal(size=G * n)
    return dict(g=g, x=x, y=a[g] + 0.7 * x + rng.normal(size=G * n))


def poisson_glm_masked(X, counts, observed):
    """A Poisson GLM whose unobserved counts are masked out of the likelihood."""
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(X.shape[1]), 1.0).to_event(1))
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 3.0))
    with numpyro.plate("data", X.shape[0]), numpyro.handlers.mask(mask=observed):
        numpyro.sample(
            "counts", dist.Poisson(jnp.exp(intercept + X @ beta)), obs=counts
        )


def _poisson():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 3)) * 0.5
    counts = rng.poisson(np.exp(1.0 + X @ [0.5, -0.3, 0.2]))
    return dict(X=X, counts=counts, observed=rng.random(300) > 0.2)


def regression_missing(x, y, y_mask):
    """Normal regression with missing responses imputed (``obs_mask``)."""
    a = numpyro.sample("a", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, sigma), obs=y, obs_mask=y_mask)


def _missing():
    rng = np.random.default_rng(4)
    x = rng.normal(size=120)
    y = 0.5 + 1.2 * x + 0.8 * rng.normal(size=120)
    mask = rng.random(120) > 0.1
    return dict(x=x, y=np.where(mask, y, 0.0), y_mask=mask)


def multi_output_regression(X, Y=None):
    """A matrix of global coefficients ``W (D, K)`` and a vector of scales."""
    D, K = X.shape[1], Y.shape[1]
    W = numpyro.sample("W", dist.Normal(jnp.zeros((D, K)), 1.0).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(K)).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("Y", dist.Normal(X @ W, sigma).to_event(1), obs=Y)


def _multi_output():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(150, 3))
    W = rng.normal(size=(3, 2))
    return dict(X=X, Y=X @ W + 0.5 * rng.normal(size=(150, 2)))


def repeated_measures(y):
    """Nested plates: ``y (num_groups, num_reps)`` with a mean per group."""
    G, R = y.shape
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = numpyro.sample("tau", dist.HalfNormal(3.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(3.0))
    with numpyro.plate("groups", G, dim=-2):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        with numpyro.plate("reps", R, dim=-1):
            numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _repeated():
    rng = np.random.default_rng(6)
    theta = 2.0 + 1.0 * rng.normal(size=(9, 1))
    return dict(y=theta + 0.5 * rng.normal(size=(9, 6)))


def ar1(y):
    """AR(1) time series, vectorised over time as in NumPyro's time-series
    tutorials: ``y[t] ~ N(c + phi y[t-1], sigma)``."""
    c = numpyro.sample("c", dist.Normal(0.0, 5.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("time", y.shape[0] - 1):
        numpyro.sample("y", dist.Normal(c + phi * y[:-1], sigma), obs=y[1:])


def _ar1():
    rng = np.random.default_rng(7)
    y = np.zeros(200)
    for t in range(1, 200):
        y[t] = 0.5 + 0.6 * y[t - 1] + 0.5 * rng.normal()
    return dict(y=y)


@config_enumerate
def gaussian_mixture_enumerated(y):
    """NumPyro's Gaussian mixture tutorial: the assignment ``z`` (one per row, in
    the split plate) is enumerated, summed out of each shard's log density."""
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(2)))
    # Ordered locations (Stan's ordered[K]): the labels are identified, and the
    # optimizers' start (0, 1) is off the saddle locs[0] == locs[1].
    locs = numpyro.sample(
        "locs",
        dist.TransformedDistribution(
            dist.Normal(jnp.zeros(2), 10.0).to_event(1), OrderedTransform()
        ),
    )
    scale = numpyro.sample("scale", dist.HalfNormal(2.0))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("y", dist.Normal(locs[z], scale), obs=y)


def _mixture_enum():
    rng = np.random.default_rng(8)
    return dict(y=np.concatenate([rng.normal(-2, 1, 60), rng.normal(3, 1, 40)]))


_NO_PLATE = "no plate that can be split.*num_shards=1"

ZOO = [
    ZooModel(
        "eight_schools_noncentered",
        eight_schools_noncentered,
        _eight_schools,
        "posteriordb eight_schools-eight_schools_noncentered",
        # Only mu: a Gaussian in log(tau) has a far heavier right tail than the
        # posterior of tau (and so of theta); a Laplace limit, not a split's.
        {
            k: v
            for k, v in _reference(
                _posteriordb("eight_schools-eight_schools_noncentered")[1]
            ).items()
            if k == "mu"
        },
        ref_tol=1.0,
    ),
    ZooModel(
        "kidiq_interaction_c",
        linear_regression,
        _kidiq,
        "posteriordb kidiq_with_mom_work-kidscore_interaction_c",
        _reference(_posteriordb("kidiq_with_mom_work-kidscore_interaction_c")[1]),
    ),
    ZooModel(
        "logmesquite",
        linear_regression,
        _mesquite,
        "posteriordb mesquite-logmesquite",
        _reference(_posteriordb("mesquite-logmesquite")[1]),
    ),
    ZooModel(
        "nes",
        linear_regression,
        _nes,
        "posteriordb nes1972-nes",
        _reference(_posteriordb("nes1972-nes")[1]),
    ),
    ZooModel(
        "logearn_interaction_z",
        linear_regression,
        _earnings,
        "posteriordb earnings-logearn_interaction_z",
        _reference(_posteriordb("earnings-logearn_interaction_z")[1]),
    ),
    ZooModel(
        "low_dim_gauss_mix",
        gauss_mix,
        _gauss_mix,
        "posteriordb low_dim_gauss_mix-low_dim_gauss_mix (numpyro.factor)",
        _reference(_posteriordb("low_dim_gauss_mix-low_dim_gauss_mix")[1]),
    ),
    ZooModel(
        "gp_pois_regr",
        gp_pois_regr,
        _gp,
        "posteriordb gp_pois_regr-gp_pois_regr",
        {
            k: v
            for k, v in _reference(_posteriordb("gp_pois_regr-gp_pois_regr")[1]).items()
            if k == "f"
        },
        ref_tol=1.0,
        expect={(m, 2): _NO_PLATE for m in ("fit_map", "laplace", "fit_svi")},
    ),
    ZooModel(
        "radon_contextual",
        radon_contextual,
        _radon,
        "inference-gym radon_contextual_effects_minnesota_halfnormal",
        _radon_reference(),
        ref_tol=0.5,
    ),
    ZooModel(
        "logistic_regression",
        logistic_regression,
        _logistic,
        "NumPyro examples (simulated, 401 rows)",
    ),
    ZooModel(
        "varying_intercepts",
        varying_intercepts,
        _varying,
        "NumPyro tutorials (simulated; G taken from the data)",
    ),
    ZooModel(
        "poisson_glm_masked",
        poisson_glm_masked,
        _poisson,
        "NumPyro examples (simulated; handlers.mask)",
    ),
    ZooModel(
        "regression_missing",
        regression_missing,
        _missing,
        "NumPyro examples (simulated; obs_mask imputation)",
    ),
    ZooModel(
        "multi_output_regression",
        multi_output_regression,
        _multi_output,
        "simulated; matrix global W (3, 2)",
    ),
    ZooModel(
        "repeated_measures",
        repeated_measures,
        _repeated,
        "simulated; nested plates (groups x reps)",
        # Centred: the joint density grows without bound as tau -> 0 (theta = mu),
        # so there is no proper mode; the Laplace step says so after the MAP.
        expect={
            ("laplace", s): "not positive definite in the global parameters.*"
            "LocScaleReparam"
            for s in (1, 2)
        },
        expect_after_compute=True,
    ),
    ZooModel(
        "ar1",
        ar1,
        _ar1,
        "NumPyro time-series tutorial (simulated AR(1))",
        expect={
            (m, 2): "no plate that can be split"
            for m in ("fit_map", "laplace", "fit_svi")
        },
    ),
    ZooModel(
        "gaussian_mixture_enumerated",
        gaussian_mixture_enumerated,
        _mixture_enum,
        "NumPyro Gaussian mixture tutorial (config_enumerate)",
    ),
]

BY_NAME = {z.name: z for z in ZOO}
