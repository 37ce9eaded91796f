"""The InferenceData that raybayes.sample returns, and the summary."""

from __future__ import annotations

import json
import re
import warnings

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import potential_energy

import raybayes

SIGMA = np.array([15, 10, 16, 11, 9, 11, 10, 18], dtype=np.float32)
Y = np.array([28, 8, -3, 7, -1, 1, 18, 12], dtype=np.float32)
NUM_CHAINS, NUM_DRAWS, MAX_TREE_DEPTH = 2, 200, 10
Z = 3.29  # 0.999 quantile of the standard normal


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", theta_trans * tau + mu)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


@pytest.fixture(scope="module")
def idata():
    return raybayes.sample(
        eight_schools,
        SIGMA,
        model_kwargs={"y": Y},
        num_chains=NUM_CHAINS,
        num_warmup=200,
        num_samples=NUM_DRAWS,
        seed=0,
        max_tree_depth=MAX_TREE_DEPTH,
        backend="local",
        progress_bar=False,
    )


def test_groups(idata):
    groups = set(idata.groups())
    assert {"posterior", "sample_stats", "observed_data"} <= groups


def test_posterior_dims_are_named_after_plates(idata):
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "tau", "theta_trans", "theta"}
    assert post["mu"].dims == ("chain", "draw")
    assert post["tau"].dims == ("chain", "draw")
    for name in ("theta_trans", "theta"):
        assert post[name].dims == ("chain", "draw", "school")
        assert post[name].shape == (NUM_CHAINS, NUM_DRAWS, 8)
    np.testing.assert_array_equal(post["school"].values, np.arange(8))
    assert (post["tau"].values > 0).all()
    # The deterministic site is computed from the draws of the same iteration.
    expected = post["theta_trans"] * post["tau"] + post["mu"]
    np.testing.assert_allclose(
        post["theta"].values, expected.values, rtol=1e-5, atol=1e-5
    )


def test_observed_data(idata):
    obs = idata.observed_data
    assert set(obs.data_vars) == {"y"}
    assert obs["y"].dims == ("school",)
    np.testing.assert_array_equal(obs["y"].values, Y)


def test_sample_stats(idata):
    stats = idata.sample_stats
    for name in (
        "diverging",
        "tree_depth",
        "step_size",
        "energy",
        "acceptance_rate",
        "lp",
    ):
        assert name in stats, name
        assert stats[name].dims == ("chain", "draw"), name
        assert stats[name].shape == (NUM_CHAINS, NUM_DRAWS), name
    assert stats["diverging"].dtype == bool
    depth = stats["tree_depth"].values
    assert np.issubdtype(depth.dtype, np.integer)
    assert depth.min() >= 1 and depth.max() <= MAX_TREE_DEPTH
    accept = stats["acceptance_rate"].values
    assert ((accept >= 0) & (accept <= 1)).all()
    assert 0.5 < accept.mean() < 1.0  # the target is 0.8
    # Adaptation ends with warmup: one positive step size per chain while sampling.
    step = stats["step_size"].values
    assert (step > 0).all()
    assert (step == step[:, :1]).all()
    lp, energy = stats["lp"].values, stats["energy"].values
    assert np.isfinite(lp).all() and np.isfinite(energy).all()
    # energy = potential (-lp) + kinetic energy (>= 0)
    assert (energy >= -lp - 1e-3 * np.abs(lp)).all()


def test_lp_is_the_log_density_of_the_draw(idata):
    post, lp = idata.posterior, idata.sample_stats["lp"].values
    for chain, draw in [(0, 0), (0, NUM_DRAWS - 1), (1, NUM_DRAWS // 2)]:
        unconstrained = {
            "mu": jnp.asarray(post["mu"].values[chain, draw]),
            "tau": jnp.log(post["tau"].values[chain, draw]),
            "theta_trans": jnp.asarray(post["theta_trans"].values[chain, draw]),
        }
        expected = -potential_energy(eight_schools, (SIGMA,), {"y": Y}, unconstrained)
        np.testing.assert_allclose(
            lp[chain, draw], float(expected), rtol=1e-4, atol=1e-3
        )


def test_summary_columns_come_from_arviz(idata):
    table = raybayes.summary(idata)
    for column in (
        "mean",
        "sd",
        "r_hat",
        "ess_bulk",
        "ess_tail",
        "mcse_mean",
        "mcse_sd",
    ):
        assert column in table.columns, column
    assert {"mu", "tau", "theta[0]", "theta[7]", "theta_trans[0]"} <= set(table.index)
    az = _arviz()
    mu = idata.posterior["mu"].values
    assert table.loc["mu", "r_hat"] == pytest.approx(float(az.rhat(mu)), abs=0.01)
    assert table.loc["mu", "ess_bulk"] == pytest.approx(
        float(az.ess(mu)), rel=0.01, abs=1
    )
    assert table.loc["mu", "ess_tail"] == pytest.approx(
        float(az.ess(mu, method="tail")), rel=0.01, abs=1
    )
    assert table.loc["mu", "mcse_mean"] == pytest.approx(float(az.mcse(mu)), abs=0.01)
    assert table.loc["mu", "mean"] == pytest.approx(float(mu.mean()), abs=0.01)


def test_summary_matches_the_reference_posterior(idata, data_dir):
    """Posterior means against posteriordb's reference (10 x 1,000 Stan draws of
    the same model and data), within z = 3.29 (the 0.999 normal quantile) times the
    combined Monte Carlo error: the table's MCSE and the reference's ``sd / 100``.
    Efficiency and mixing: every parameter has at least a quarter of the 400 draws
    as bulk and tail ESS (NUTS gives 176 to 824 here; a stuck or badly adapted
    chain gives a handful) and R-hat at most 1.01 (as rounded by the table).
    """
    folder = data_dir / "posteriordb" / "eight_schools-eight_schools_noncentered"
    data = json.loads((folder / "data.json").read_text())
    np.testing.assert_array_equal(data["y"], Y)
    np.testing.assert_array_equal(data["sigma"], SIGMA)
    reference = json.loads((folder / "summary.json").read_text())["stats"]
    table = raybayes.summary(idata)
    num_draws = NUM_CHAINS * NUM_DRAWS
    for param, ref in reference.items():  # theta[1] .. theta[8] (1-based), mu, tau
        match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", param)
        row_name = match.group(1)
        if match.group(2) is not None:
            row_name += f"[{int(match.group(2)) - 1}]"
        row = table.loc[row_name]
        tolerance = Z * np.hypot(row["mcse_mean"], ref["sd"] / 100)
        assert abs(row["mean"] - ref["mean"]) <= tolerance, (param, row["mean"], ref)
        assert row["ess_bulk"] >= num_draws / 4, (param, row["ess_bulk"])
        assert row["ess_tail"] >= num_draws / 4, (param, row["ess_tail"])
        assert row["r_hat"] <= 1.01, (param, row["r_hat"])
    # The MCSE of the mean is sd / sqrt(ESS) (the table rounds to 2 decimals): a
    # table that mixed up its columns would break this.
    az = _arviz()
    for name in ("mu", "tau"):
        draws = idata.posterior[name].values
        ess_mean = float(az.ess(draws, method="mean"))
        assert table.loc[name, "mcse_mean"] == pytest.approx(
            draws.std(ddof=1) / np.sqrt(ess_mean), abs=0.006
        )


def test_summary_of_selected_sites(idata):
    table = raybayes.summary(idata, var_names=["tau"])
    assert list(table.index) == ["tau"]


def test_print_summary_reports_divergences(idata, capsys):
    raybayes.print_summary(idata, var_names=["mu", "tau"])
    out = capsys.readouterr().out
    divergences = int(idata.sample_stats["diverging"].sum())
    assert f"Number of divergences: {divergences}" in out
    assert "r_hat" in out and "tau" in out


def test_user_coords_override_plate_indices():
    names = np.array(list("ABCDEFGH"))
    idata = raybayes.sample(
        eight_schools,
        SIGMA,
        model_kwargs={"y": Y},
        num_chains=1,
        num_warmup=20,
        num_samples=10,
        coords={"school": names},
        backend="local",
        progress_bar=False,
    )
    np.testing.assert_array_equal(idata.posterior["school"].values, names)
    assert idata.posterior["theta"].sel(school="C").shape == (1, 10)
