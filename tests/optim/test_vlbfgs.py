"""Vector-free L-BFGS: the dot-product two-loop recursion, exact MAPs, and agreement
with the full-vector L-BFGS of find_map, in process and on Ray."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import reparam
from numpyro.infer.reparam import LocScaleReparam

from conjugate_normal import hierarchical_normal_model, posterior, simulate
from raybayes.core.partition import Partition
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.distributed import ShardedObjective
from raybayes.errors import ConfigurationError
from raybayes.models.elasticity import elasticity_model as _centred_elasticity_model
from raybayes.optim import find_map, find_map_vector_free, fit_map
from raybayes.optim.vlbfgs import (
    VectorFreeMAPResult,
    VectorFreeObjective,
    two_loop_coefficients,
)

# As in test_map_laplace.py: the MAP is taken in the non-centred parameterization.
elasticity_model = reparam(
    _centred_elasticity_model,
    config={"gamma": LocScaleReparam(0), "delta": LocScaleReparam(0)},
)

S0, TAU, SIGMA = 2.0, 0.7, 1.3
GROUPS = Partition(
    "groups",
    index_arg="group_idx",
    obs_args=("y",),
    obs_plate="obs",
    size_arg="num_groups",
)
PRODUCTS = Partition(
    "products",
    entity_args=("category_of_product",),
    index_arg="product_idx",
    obs_args=("log_price", "time_idx", "units"),
    obs_plate="obs",
)


# Conjugate: the posterior is Gaussian, its mode is its mean.
hierarchical_normal = hierarchical_normal_model(S0, TAU, SIGMA)


@pytest.fixture(scope="module")
def conjugate():
    kwargs = simulate(7, (2, 9), 1.0, TAU, SIGMA)
    return kwargs, posterior(kwargs, S0, TAU, SIGMA)[0]


CONJUGATE_OPTS = dict(tol=1e-14, gtol=1e-9, max_steps=200, progress_bar=False)


@pytest.fixture(scope="module")
def conjugate_runs(conjugate):
    kwargs = conjugate[0]
    with VectorFreeObjective(
        hierarchical_normal, kwargs, partition=GROUPS, num_shards=1
    ) as objective:
        one = find_map_vector_free(objective, **CONJUGATE_OPTS)
    three = fit_map(  # through fit_map's switch, without assembling the sites
        hierarchical_normal,
        model_kwargs=kwargs,
        num_shards=3,
        backend="local",
        partition=GROUPS,
        vector_free=True,
        assemble=False,
        **CONJUGATE_OPTS,
    )
    return {1: one, 3: three}


def _two_loop(s, y, g):
    """The textbook two-loop recursion on full vectors (Nocedal & Wright, Alg. 7.4)."""
    q = g.copy()
    alpha = np.zeros(len(s))
    for i in reversed(range(len(s))):
        alpha[i] = s[i] @ q / (s[i] @ y[i])
        q -= alpha[i] * y[i]
    r = q * (s[-1] @ y[-1]) / (y[-1] @ y[-1]) if len(s) else q
    for i in range(len(s)):
        beta = y[i] @ r / (s[i] @ y[i])
        r += s[i] * (alpha[i] - beta)
    return -r


@pytest.mark.parametrize("num_pairs", [0, 1, 3, 5])
def test_dot_product_direction_is_the_two_loop_direction(num_pairs):
    rng = np.random.default_rng(num_pairs)
    n = 40
    L = rng.standard_normal((n, n))
    hess = L @ L.T / n + 0.1 * np.eye(n)  # SPD, so s . y > 0
    s = rng.standard_normal((num_pairs, n))
    y = s @ hess + 0.01 * rng.standard_normal((num_pairs, n))
    assert np.all(np.einsum("ij,ij->i", s, y) > 0)
    g = rng.standard_normal(n)
    basis = np.vstack([s, y, g[None]])
    delta = two_loop_coefficients(basis @ basis.T)
    assert delta.shape == (2 * num_pairs + 1,)
    np.testing.assert_allclose(delta @ basis, _two_loop(s, y, g), rtol=1e-10)


def test_map_is_the_analytic_mode_for_one_and_three_shards(conjugate, conjugate_runs):
    _, mean = conjugate
    for r in conjugate_runs.values():
        assert r.converged, r.message
        assert r.grad_norm < 1e-6
        # Normal sites: unconstrained = constrained; x is (mu, theta in plate order).
        np.testing.assert_allclose(r.x, mean, atol=1e-6)
        assert len(r.bytes_sent) == len(r.bytes_received) == r.num_iterations
    params = conjugate_runs[1].params
    np.testing.assert_allclose(float(params["mu"]), mean[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["theta"]), mean[1:], atol=1e-6)
    assert conjugate_runs[3].params == {}  # assemble=False
    assert isinstance(conjugate_runs[3], VectorFreeMAPResult)
    # The driver holds x, g, d and the m pairs' global slices (G = 1) and the
    # Gram blocks: 8 (3 G + 2 m G + 3 m^2 + 2 m + 1) bytes once the memory is full,
    # whatever the shards.
    m, num_global = 10, 1
    expected = 8 * (3 * num_global + 2 * m * num_global + 3 * m**2 + 2 * m + 1)
    assert conjugate_runs[1].num_iterations > m
    assert conjugate_runs[1].driver_state_bytes == expected
    assert conjugate_runs[3].driver_state_bytes == expected


def test_bad_input_is_refused_before_any_work(conjugate):
    kwargs = conjugate[0]
    with VectorFreeObjective(
        hierarchical_normal, kwargs, partition=GROUPS, num_shards=2
    ) as objective:
        before = (objective.num_evaluations, objective.bytes_sent)
        for bad in (
            dict(init=np.zeros(objective.size + 1)),
            dict(tol=0.0),
            dict(history_size=0),
            dict(max_steps=0),
        ):
            with pytest.raises(ConfigurationError):
                find_map_vector_free(objective, progress_bar=False, **bad)
        assert (objective.num_evaluations, objective.bytes_sent) == before
    with ShardedObjective(
        hierarchical_normal, kwargs, partition=GROUPS, num_shards=1
    ) as plain:
        with pytest.raises(ConfigurationError, match="VectorFreeObjective"):
            find_map_vector_free(plain, progress_bar=False)


def test_line_search_failure_is_reported_not_raised():
    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        # The log density turns NaN past mu = 1, before the optimum at 3.
        numpyro.factor("f", jnp.where(mu < 1.0, -((mu - 3.0) ** 2), jnp.nan))

    with VectorFreeObjective(model, {}, partition=None, num_shards=1) as objective:
        r = find_map_vector_free(objective, progress_bar=False, max_steps=50)
    assert not r.converged
    assert r.status in ("non_finite", "line_search_failed")
    assert float(r.params["mu"]) < 1.0


@pytest.fixture(scope="module")
def elasticity_kwargs():
    df, _ = simulate_elasticity(num_categories=2, num_products=8, num_weeks=8, seed=2)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    return data.model_kwargs()


def test_elasticity_map_equals_find_map_and_does_not_depend_on_shards(
    elasticity_kwargs,
):
    opts = dict(tol=1e-14, gtol=1e-7, max_steps=2000, progress_bar=False)
    # A VectorFreeObjective is a ShardedObjective: find_map runs on the same workers.
    with VectorFreeObjective(
        elasticity_model, elasticity_kwargs, partition=PRODUCTS, num_shards=1
    ) as objective:
        ref = find_map(objective, **opts)
        one = find_map_vector_free(objective, **opts)
    with VectorFreeObjective(
        elasticity_model, elasticity_kwargs, partition=PRODUCTS, num_shards=2
    ) as objective:
        two = find_map_vector_free(objective, assemble=False, **opts)
    assert ref.converged and one.converged and two.converged, two.message
    size = ref.x.shape[0]  # 25 globals + 8 products x 2 locals
    assert size == 41
    # Near the mode, |x_a - x_b|_2 <= |g_a - g_b|_2 / lambda_min(H), and
    # |g|_2 <= sqrt(size) |g|_max. The Hessian of this problem at the mode has
    # lambda_min = 0.72 (finite differences of the gradient); 0.5 leaves a margin.
    lam_min = 0.5
    for r in (one, two):
        assert abs(r.loss - ref.loss) < 1e-7 * abs(ref.loss)
        bound = np.sqrt(size) * (r.grad_norm + ref.grad_norm) / lam_min
        assert bound < 1e-3
        assert np.max(np.abs(r.x - ref.x)) < bound
    for site in ("beta", "beta_global", "sigma_beta", "gamma"):
        np.testing.assert_allclose(
            np.asarray(one.params[site]), np.asarray(ref.params[site]), atol=1e-4
        )
    # Splitting the sums over two shards changes only their rounding: the same
    # iterates until it grows along this ill-conditioned path (condition number
    # ~1000) ...
    np.testing.assert_allclose(one.history[:30], two.history[:30], rtol=1e-12)
    # ... and the same mode, within the gradient bound, at the end.
    assert abs(one.loss - two.loss) < 1e-12 * abs(one.loss)
    bound = np.sqrt(size) * (one.grad_norm + two.grad_norm) / lam_min
    assert np.max(np.abs(one.x - two.x)) < bound


def test_ray_workers_give_the_in_process_result(ray_backend, conjugate):
    kwargs = conjugate[0]
    results = []
    for backend in ("local", ray_backend):
        with VectorFreeObjective(
            hierarchical_normal,
            kwargs,
            partition=GROUPS,
            num_shards=2,
            backend=backend,
        ) as objective:
            results.append(
                find_map_vector_free(objective, assemble=False, **CONJUGATE_OPTS)
            )
    local, remote = results
    assert remote.converged and remote.num_iterations == local.num_iterations
    np.testing.assert_allclose(remote.history, local.history, rtol=1e-12)
    np.testing.assert_allclose(remote.x, local.x, rtol=0, atol=1e-10)
    assert remote.bytes_sent == local.bytes_sent
