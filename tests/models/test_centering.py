"""Data-informed partial centring: the weights, and the sampler with them on a
hierarchical normal model whose posterior is known in closed form."""

from __future__ import annotations

import arviz as az
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.reparam import LocScaleReparam
from tests.conjugate_normal import posterior

import raybayes
from raybayes.datasets import prepare_elasticity_data, simulate_elasticity
from raybayes.models import CENTERING_BLOCKS, centering_weight, elasticity_model

S0, TAU, SIGMA = 3.0, 0.5, 1.0


def centred_hierarchical_normal(group_idx, num_groups, weights, y=None):
    """``tests.conjugate_normal``'s model, theta partially centred by ``weights``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, S0))
    # The reparam handler outside the plate, so that it sees the batched site.
    with numpyro.handlers.reparam(config={"theta": LocScaleReparam(weights)}):
        with numpyro.plate("groups", num_groups):
            theta = numpyro.sample("theta", dist.Normal(mu, TAU))
    with numpyro.plate("obs", group_idx.shape[0]):
        numpyro.sample("y", dist.Normal(theta[group_idx], SIGMA), obs=y)


def test_centering_weight_limits_and_errors():
    w = centering_weight(0.5, np.array([0.0, 4.0, 4e4]))
    np.testing.assert_allclose(w, [0.0, 0.5, 1e4 / (1 + 1e4)], rtol=1e-6)
    with pytest.raises(ValueError, match="data_precision has 1 negative"):
        centering_weight(1.0, [1.0, -2.0])


def test_partially_centred_sampler_matches_the_analytic_posterior():
    # Groups with 1 to 150 observations: weights from 0.2 (near non-centred) to
    # 0.97 (near centred), so every regime is exercised.
    counts = np.array([1, 1, 2, 3, 5, 10, 20, 40, 80, 150])
    rng = np.random.default_rng(3)
    group_idx = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    theta = 1.0 + TAU * rng.standard_normal(len(counts))
    y = theta[group_idx] + SIGMA * rng.standard_normal(len(group_idx))
    kwargs = dict(group_idx=group_idx, num_groups=len(counts), y=y.astype(np.float32))
    weights = centering_weight(TAU, counts / SIGMA**2)
    assert weights.min() < 0.25 and weights.max() > 0.95
    mean, prec, _ = posterior(kwargs, S0, TAU, SIGMA)
    sd = np.sqrt(np.diag(np.linalg.inv(prec)))
    idata = raybayes.sample(
        centred_hierarchical_normal,
        model_kwargs={**kwargs, "weights": weights},
        num_chains=2,
        num_warmup=300,
        num_samples=600,
        seed=0,
        backend="local",
        progress_bar=False,
    )
    post = idata.posterior
    draws = np.concatenate(
        [post["mu"].values[..., None], post["theta"].values], axis=-1
    )  # (chains, draws, 1 + J), in the order of the exact posterior
    flat = draws.reshape(-1, draws.shape[-1])
    ds = az.convert_to_dataset({"z": draws})
    mcse_mean = az.mcse(ds, method="mean")["z"].values
    mcse_sd = az.mcse(ds, method="sd")["z"].values
    assert np.all(np.abs(flat.mean(0) - mean) <= 4 * mcse_mean), (
        flat.mean(0) - mean
    ) / mcse_mean
    assert np.all(np.abs(flat.std(0) - sd) <= 4 * mcse_sd), (flat.std(0) - sd) / mcse_sd
    assert float(az.rhat(ds)["z"].max()) < 1.01
    assert int(idata.sample_stats["diverging"].sum()) == 0


def test_elasticity_centering_follows_the_data():
    df, _ = simulate_elasticity(4, 40, 60, seed=0, concentration=5.0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    w = data.centering()
    assert set(w) == set(CENTERING_BLOCKS)
    # 60 weeks of counts around e^3 identify every intercept: near centred.
    assert w["delta"].min() > 0.9
    # Weights grow with the information: a product seen for 6 weeks instead of 60
    # is less centred.
    short = df[(df["product"] != 0) | (df["week"] < 6)]
    w_short = prepare_elasticity_data(
        short, product_cols=("product",), category_col="category"
    ).centering()
    assert w_short["delta"][0] < w["delta"][0]
    assert w_short["beta"][0] < w["beta"][0]
    # The model accepts the weights; its sites are the decentred blocks.
    import jax
    from numpyro.infer.util import initialize_model

    info = initialize_model(
        jax.random.PRNGKey(0),
        elasticity_model,
        model_kwargs=data.model_kwargs(centered="auto"),
    )
    expected = {"beta_category_decentered", "beta_decentered", "level_decentered",
                "gamma_decentered"}
    assert expected <= set(info.param_info.z)
    with pytest.raises(ValueError, match="outside"):
        elasticity_model(**data.model_kwargs(centered={"beta": 1.5}))
    with pytest.raises(ValueError, match="unknown block"):
        elasticity_model(**data.model_kwargs(centered={"alpha": 0.5}))


def test_elasticity_centering_discounts_category_wide_promotions():
    # Same products, weeks and units; only the prices differ. When a category runs
    # its promotions in every product at once, its period effects absorb them and
    # a product's elasticity is informed only by its price's departure from the
    # category's: its weight must fall (the orange-juice case), while the
    # intercepts' weights, which do not depend on the price, stay.
    df, _ = simulate_elasticity(3, 30, 60, seed=1, concentration=5.0)
    rng = np.random.default_rng(2)
    cut = np.where(rng.random((60, 3)) < 0.3, rng.uniform(0.0, 0.4, (60, 3)), 0.0)
    wide = df.copy()
    wide["price"] = (
        np.exp(np.log(df.groupby("product")["price"].transform("mean")))
        * (1.0 - cut[df["week"].to_numpy(), df["category"].to_numpy()])
        * np.exp(0.01 * rng.standard_normal(len(df)))
    )
    kw = dict(product_cols=("product",), category_col="category")
    w_own = prepare_elasticity_data(df, **kw).centering()
    w_wide = prepare_elasticity_data(wide, **kw).centering()
    assert np.median(w_own["beta"]) > 0.5
    assert np.median(w_wide["beta"]) < 0.2 * np.median(w_own["beta"])
    # (only through the moment estimate of the concentration)
    np.testing.assert_allclose(w_wide["delta"], w_own["delta"], atol=0.01)
