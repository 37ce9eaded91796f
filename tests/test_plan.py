"""raybayes.plan: candidate plates, communication and memory estimates, errors."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
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
        df, product_cols=("product",), category_col="category"
    ).model_kwargs()
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


# ------------------------------------------------ models as their users write them
def varying_intercepts(g, x, y=None):
    G = int(np.max(g)) + 1  # the number of groups taken from the data
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    s = numpyro.sample("s", dist.HalfNormal(1))
    with numpyro.plate("groups", G):
        a = numpyro.sample("a", dist.Normal(mu, s))
    with numpyro.plate("data", len(g)):
        numpyro.sample("y", dist.Normal(a[g] + x, 1), obs=y)


def eight_schools(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    with numpyro.plate("J", J):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0, 1))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_index_is_found_from_the_jaxpr_and_explained_in_words():
    g = np.repeat(np.arange(50), 100)
    kwargs = {"g": g, "x": np.zeros(5000), "y": np.zeros(5000)}
    result = plan(varying_intercepts, kwargs, num_shards=2)
    part = result.partition
    assert (part.plate, part.index_arg, part.obs_plate) == ("groups", "g", "data")
    assert set(part.obs_args) == {"x", "y"} and part.size == 50
    assert result.explanation == (
        "observations follow `data` (`x`, `y`); `g` indexes `groups`; split `groups` "
        "into 2 shards: 25 groups and 2,500 rows each"
    )
    # the rows cannot be split: the number of groups would follow them
    rows = next(c for c in result.candidates if c.plate == "data")
    assert not rows.feasible and "`groups` has" in rows.reason


def test_index_is_found_whatever_its_name():
    g = np.repeat(np.arange(6), 2)
    renamed = {"q": g, "x": np.zeros(12), "y": np.zeros(12)}

    def model(q, x, y):
        varying_intercepts(q, x, y)

    assert plan(model, renamed, num_shards=3).partition.index_arg == "q"


def test_positional_arguments_are_bound_and_split():
    y = np.array([28.0, 8, -3, 7, -1, 1, 18, 12])
    sigma = np.array([15.0, 10, 16, 11, 9, 11, 10, 18])
    result = plan(eight_schools, None, num_shards=2, model_args=(8, sigma, y))
    assert result.model_args == () and result.model_kwargs["J"] == 8
    part = result.partition
    assert part.plate == "J" and set(part.entity_args) == {"sigma", "y"}
    assert part.size_arg == "J"
    assert "split `J` into 2 shards: 4 rows each" in result.explanation


def test_plate_of_fixed_size_is_an_impossible_split_that_says_why():
    def fixed(sigma, y):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        with numpyro.plate("J", 8):
            numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    # the crash of the issue ("Incompatible shapes") is now a reason, at plan time
    with pytest.raises(
        ConfigurationError, match="(?s)shard 0's data.*Incompatible shapes.*size plate"
    ):
        plan(fixed, {"sigma": np.ones(8), "y": np.zeros(8)}, num_shards=2)


def test_data_reduced_inside_the_model_is_not_split():
    def centred(x, y):
        b = numpyro.sample("b", dist.Normal(0, 1))
        s = numpyro.sample("s", dist.HalfNormal(1.0 + jnp.std(y)))
        with numpyro.plate("data", len(y)):
            numpyro.sample("y", dist.Normal(b * x, s), obs=y)

    with pytest.raises(ConfigurationError, match="'y' follows this plate but also"):
        plan(centred, {"x": np.zeros(10), "y": np.zeros(10)}, num_shards=2)


def test_enumerated_local_site_splits_and_other_discrete_latents_are_clear_errors():
    def mixture(y, enumerate="parallel"):
        locs = numpyro.sample("locs", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample(
                "z", dist.Categorical(jnp.ones(2) / 2), infer={"enumerate": enumerate}
            )
            numpyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)

    # One z per row: summed out within its shard, the split is the data plate.
    p = plan(mixture, {"y": np.zeros(10)}, num_shards=2)
    assert p.partition.plate == "data"
    with pytest.raises(
        ConfigurationError, match="'z'.*not enumerated.*config_enumerate"
    ):
        plan(mixture, {"y": np.zeros(10), "enumerate": None}, num_shards=2)

    def shared_switch(y):
        # One z for all rows: summing it out couples every shard.
        locs = numpyro.sample("locs", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
        z = numpyro.sample(
            "z", dist.Categorical(jnp.ones(2) / 2), infer={"enumerate": "parallel"}
        )
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)

    with pytest.raises(ConfigurationError, match="'z' is outside the split plate"):
        plan(shared_switch, {"y": np.zeros(10)}, num_shards=2)


def test_nested_plates_split_the_data_along_the_plate_axis():
    def repeated(y):
        mu = numpyro.sample("mu", dist.Normal(0, 10))
        with numpyro.plate("reps", y.shape[0], dim=-2):
            with numpyro.plate("groups", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    result = plan(repeated, {"y": np.zeros((4, 6))}, num_shards=3)
    by_plate = {c.plate: c for c in result.candidates}
    assert by_plate["groups"].partition.arg_axes == (("y", 1),)
    assert by_plate["reps"].partition.arg_axes == ()


def test_one_shard_needs_no_plan():
    from raybayes.plan import resolve_split

    def no_plate(y):
        mu = numpyro.sample("mu", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(mu, 1).expand([3]).to_event(1), obs=y)

    args, kwargs, part, shards = resolve_split(no_plate, (np.zeros(3),), None, 1, None)
    assert (args, part, shards) == ((), None, 1) and "y" in kwargs

    # a plate that cannot be split (its size is fixed) is no obstacle on one shard
    def fixed(y):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        with numpyro.plate("J", 4):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    assert resolve_split(fixed, (), {"y": np.zeros(4)}, 1, None)[2:] == (None, 1)
    # a plate that can be split is kept on one shard (local blocks for Laplace)
    g = np.repeat(np.arange(4), 3)
    part = resolve_split(
        varying_intercepts, (g, np.zeros(12), np.zeros(12)), None, 1, None
    )[2]
    assert part.plate == "groups"


def test_an_explicit_partition_is_checked_against_shard_traces():
    """A user's Partition is verified like the planned split, before any compute."""
    from raybayes.core import Partition
    from raybayes.plan import resolve_split

    def regression(x, y):
        b = numpyro.sample("b", dist.Normal(0, 1))
        with numpyro.plate("data", len(y)):
            numpyro.sample("y", dist.Normal(b * x, 1), obs=y)

    kw = {"x": np.ones(6), "y": np.ones(6)}
    good = Partition("data", entity_args=("x", "y"))
    assert resolve_split(regression, (), kw, 2, good)[2] is good
    # x follows the plate but is not split: shard 0 sees 6 x and 3 y
    with pytest.raises(
        ConfigurationError,
        match=r"(?s)entity_args=\('y',\)\) does not fit the model: the model does "
        r"not run on shard 0's data.*entity_args",
    ):
        resolve_split(regression, (), kw, 2, Partition("data", entity_args=("y",)))
    # checked on one shard too (the partition decides the local blocks)
    with pytest.raises(ConfigurationError, match="does not fit the model"):
        resolve_split(regression, (), kw, 1, Partition("data", entity_args=("y",)))
    with pytest.raises(
        ConfigurationError, match=r"names plate `rows`.*its plates: `data`"
    ):
        resolve_split(regression, (), kw, 2, Partition("rows", entity_args=("x", "y")))

    # an index that is not given: every shard would still see all the groups' rows
    g = np.repeat(np.arange(4), 3)
    kw = {"g": g, "x": np.zeros(12), "y": np.zeros(12)}
    with pytest.raises(ConfigurationError, match="does not fit the model"):
        resolve_split(varying_intercepts, (), kw, 2, Partition("groups", size=4))
    right = Partition(
        "groups", index_arg="g", obs_args=("x", "y"), obs_plate="data", size=4
    )
    assert resolve_split(varying_intercepts, (), kw, 2, right)[2] is right
