"""NaN/inf in observed data are refused before compute, naming site, count and index.

Probe 3 of issue 21: NaN in the data surfaced in ``sample`` as "Cannot find valid
initial parameters" and in ``fit_svi`` as a Gamma rate error after 28.6 s.
"""

from __future__ import annotations

import time

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes import DataValidationError
from raybayes.core.validation import check_observed_data


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def poisson_model(counts, x):
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", counts.shape[0]):
        numpyro.sample("counts", dist.Poisson(np.exp(b * x)), obs=counts)


def masked_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]), numpyro.handlers.mask(mask=~np.isnan(y)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def obs_mask_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=~np.isnan(y))


Y_NAN = np.array([0.1, 0.2, np.nan, 0.4, np.nan])


def test_nan_names_site_count_and_first_index():
    with pytest.raises(DataValidationError) as info:
        check_observed_data(normal_model, (Y_NAN,))
    message = str(info.value)
    assert "'y'" in message and "2 NaN" in message and "index (2,)" in message
    assert "obs_mask" in message  # how to mask
    assert info.value.column == "y" and info.value.num_bad_rows == 2


def test_inf_is_an_error_and_kwargs_are_checked():
    x = np.ones(4)
    counts = np.array([1.0, np.inf, 2.0, -np.inf])
    with pytest.raises(
        DataValidationError, match=r"'counts' holds 2 infinite .*index \(1,\)"
    ):
        check_observed_data(poisson_model, (), {"counts": counts, "x": x})


def test_finite_integer_and_masked_data_pass():
    check_observed_data(normal_model, (np.array([0.1, 0.2]),))
    check_observed_data(poisson_model, (np.array([1, 2]), np.ones(2)))
    check_observed_data(masked_model, (Y_NAN,))
    check_observed_data(obs_mask_model, (Y_NAN,))


def test_a_nan_outside_the_mask_is_still_reported():
    def partly_masked(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", y.shape[0]):
            with numpyro.handlers.mask(mask=np.array([True, True, False, True, True])):
                numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(DataValidationError, match=r"1 NaN .*index \(4,\)"):
        check_observed_data(partly_masked, (Y_NAN,))


def test_a_model_that_raises_is_left_to_the_entry_point():
    def broken(y):
        raise RuntimeError("boom")

    check_observed_data(broken, (Y_NAN,))


@pytest.mark.parametrize(
    "entry_point",
    [
        lambda: raybayes.sample(
            normal_model,
            Y_NAN,
            num_chains=1,
            num_warmup=10,
            num_samples=10,
            backend="local",
            progress_bar=False,
        ),
        lambda: raybayes.optim.fit_map(normal_model, model_kwargs={"y": Y_NAN}),
        lambda: raybayes.laplace_approximation(
            normal_model, model_kwargs={"y": Y_NAN}, num_samples=10, progress_bar=False
        ),
        lambda: raybayes.fit_svi(normal_model, model_kwargs={"y": Y_NAN}, num_steps=10),
    ],
    ids=["sample", "fit_map", "laplace_approximation", "fit_svi"],
)
def test_every_entry_point_refuses_nan_before_compute(entry_point):
    start = time.perf_counter()
    with pytest.raises(DataValidationError, match=r"'y' holds 2 NaN .*index \(2,\)"):
        entry_point()
    assert time.perf_counter() - start < 30  # before compiling anything
