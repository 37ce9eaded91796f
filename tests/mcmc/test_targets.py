"""Run to an ESS/R-hat target; bad targets fail before anything runs."""

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes.errors import ConfigurationError


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    numpyro.sample("y", dist.Normal(mu, 1), obs=y)


Y = np.array([0.3, -0.5, 1.2, 0.8])
KW = dict(num_chains=4, num_warmup=100, chunk_size=25, backend="local", progress_bar=False)


def test_stops_when_target_met_and_matches_analytic_posterior():
    idata = raybayes.sample(normal_model, Y, num_samples=25, target_ess=400,
                            target_rhat=1.01, max_samples=2000, **KW)
    attrs = idata.attrs
    assert attrs["stop_reason"] == "targets_met" and attrs["targets_met"] == 1
    summ = raybayes.summary(idata, var_names=["mu"])
    assert summ["ess_bulk"].iloc[0] >= 400 and summ["ess_tail"].iloc[0] >= 400
    assert summ["r_hat"].iloc[0] <= 1.01
    # It stopped at the first evaluation point that met the target: one chunk fewer
    # would not have (the evaluation points are multiples of the chunk size).
    n = attrs["draws_per_chain"]
    assert n % 25 == 0 and n < 2000
    # Conjugate posterior: N(sum(y)/(n + 1/100), 1/(n + 1/100)).
    prec = len(Y) + 1 / 100
    mean, sd = Y.sum() / prec, prec**-0.5
    draws = idata.posterior["mu"].values.ravel()
    mcse = summ["mcse_mean"].iloc[0]
    assert abs(draws.mean() - mean) < 3.29 * mcse
    assert abs(draws.std() - sd) < 0.1 * sd


def test_reports_unmet_target():
    idata = raybayes.sample(normal_model, Y, num_samples=25, target_ess=1e6,
                            max_samples=50, **KW)
    assert idata.attrs["stop_reason"] == "max_samples"
    assert idata.attrs["targets_met"] == 0
    assert idata.posterior.sizes["draw"] == 50


def test_same_stop_and_draws_with_any_worker_count():
    a = raybayes.sample(normal_model, Y, num_samples=25, target_ess=300, **KW)
    b = raybayes.sample(normal_model, Y, num_samples=25, target_ess=300,
                        **{**KW, "num_workers": 3})
    assert a.attrs["draws_per_chain"] == b.attrs["draws_per_chain"]
    assert np.array_equal(a.posterior["mu"].values, b.posterior["mu"].values)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_ess=0), "target_ess"),
        (dict(target_ess=-5), "target_ess"),
        (dict(target_rhat=0.99), "target_rhat"),
        (dict(max_samples=100), "max_samples only applies"),
        (dict(target_ess=100, max_samples=10), "below num_samples"),
        (dict(target_var_names=["mu"]), "target_var_names only applies"),
        (dict(target_ess=100, target_var_names=["nope"]), "unknown sites"),
        (dict(max_time_s=0), "max_time_s"),
    ],
)
def test_bad_targets_fail_before_running(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        raybayes.sample(normal_model, Y, num_samples=25, **{**KW, **kwargs})


def test_rhat_target_needs_two_chains():
    with pytest.raises(ConfigurationError, match="at least 2 chains"):
        raybayes.sample(normal_model, Y, num_samples=25, target_rhat=1.01,
                        **{**KW, "num_chains": 1})
