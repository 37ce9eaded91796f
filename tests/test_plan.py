"""raybayes.plan: candidate plates, communication and memory estimates, errors."""

from __future__ import annotations

import warnings

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.errors import ConfigurationError
from raybayes.models.elasticity import elasticity_model
from raybayes.plan import plan

C, P, T = 4, 40, 12


@pytest.fixture(scope="module")
def elasticity_kwargs():
    df, _ = simulate_elasticity(num_categories=C, num_products=P, num_weeks=T, seed=3)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    return data.model_kwargs()


def test_elasticity_is_split_by_product(elasticity_kwargs):
    result = plan(elasticity_model, elasticity_kwargs, num_shards=2)
    chosen = result.chosen
    assert chosen.plate == "products"
    part = result.partition
    assert part.index_arg == "product_idx" and part.obs_plate == "obs"
    assert part.entity_args == ("category_of_product",)
    # Globals: 6 scalars, z_category (C), z_gamma (T x C), concentration.
    num_global = 6 + C + T * C + 1
    num_local = 2 * P
    assert (chosen.num_global, chosen.num_local) == (num_global, num_local)
    assert chosen.bytes_per_iteration == 2 * num_global * 4 * 2
    by_obs = next(c for c in result.candidates if c.plate == "obs")
    assert by_obs.feasible and by_obs.num_global == num_global + num_local
    # Product split beats observation split by the ratio of all to global parameters.
    ratio = by_obs.bytes_per_iteration / chosen.bytes_per_iteration
    assert ratio == pytest.approx(1 + num_local / num_global)
    text = str(result)
    assert "chosen: split plate 'products'" in text and "more" in text


def test_candidates_report_why_a_plate_cannot_be_split(elasticity_kwargs):
    result = plan(elasticity_model, elasticity_kwargs, num_shards=2)
    by_plate = {c.plate: c for c in result.candidates}
    assert set(by_plate) == {"products", "obs", "times", "categories"}
    # Weeks can be split too (time_idx links observations, num_times sizes it).
    assert (
        by_plate["times"].feasible
        and by_plate["times"].partition.size_arg == "num_times"
    )
    assert by_plate["times"].num_global == 6 + C + 2 * P + 1
    assert not by_plate["categories"].feasible
    # category_of_product maps products to categories, but the observations
    # (units) do not follow it.
    assert "reaches 'units'" in by_plate["categories"].reason
    # Memory per shard: the products split holds half the per-observation data.
    assert (
        by_plate["products"].memory_per_shard_bytes
        < by_plate["times"].memory_per_shard_bytes * 2
    )


def test_plate_size_argument_is_found_when_two_sizes_coincide():
    # As many weeks as products: num_times == num_products == 12.
    df, _ = simulate_elasticity(num_categories=C, num_products=12, num_weeks=12, seed=4)
    kwargs = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category").model_kwargs()
    assert len(kwargs["category_of_product"]) == kwargs["num_times"] == 12
    result = plan(elasticity_model, kwargs, num_shards=2)
    by_plate = {c.plate: c for c in result.candidates}
    # The products plate is sized by category_of_product, not by num_times.
    assert by_plate["products"].feasible
    assert by_plate["products"].partition.size_arg is None
    assert by_plate["times"].partition.size_arg == "num_times"


def test_more_shards_than_plate_entries_is_a_clear_error():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1), obs=y)

    with pytest.raises(
        ConfigurationError, match="num_shards=6 is more than.*'obs' has 5"
    ):
        plan(model, {"y": np.zeros(5)}, num_shards=6)
    with pytest.raises(ConfigurationError, match="num_shards=0"):
        plan(model, {"y": np.zeros(5)}, num_shards=0)


def test_model_without_plate_is_a_clear_error_on_two_shards_and_runs_on_one():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu, 1).expand([3]).to_event(1), obs=y)

    with pytest.raises(
        ConfigurationError, match="no plate that can be split.*num_shards=1"
    ):
        plan(model, {"y": np.zeros(3)}, num_shards=4)
    result = plan(model, {"y": np.zeros(3)}, num_shards=1)
    assert result.num_shards == 1 and result.partition is None
    assert "no plate can be split" in str(result)


def test_row_split_for_logistic_regression():
    def model(X, y):
        coef = numpyro.sample("coef", dist.Normal(np.zeros(3), 1.0).to_event(1))
        with numpyro.plate("obs", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ coef), obs=y)

    X, y = np.ones((10, 3), np.float32), np.ones(10, np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = plan(model, {"X": X, "y": y}, num_shards=3)
    assert result.partition.plate == "obs" and set(result.partition.entity_args) == {
        "X",
        "y",
    }
    assert result.chosen.bytes_per_iteration == 2 * 3 * 4 * 3
