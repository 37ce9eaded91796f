"""Trust-region Newton on the arrowhead Hessian (``find_map_newton``): the same
optimum as L-BFGS run to a tight tolerance, on 1 and 2 shards, vector-free."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.handlers import reparam
from numpyro.infer.reparam import LocScaleReparam
from scipy import optimize

from raybayes.core import Partition
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.errors import ConfigurationError
from raybayes.models.elasticity import elasticity_model
from raybayes.optim import NewtonObjective, find_map_newton, fit_map

SCHOOLS = dict(
    sigma=np.array([15.0, 10, 16, 11, 9, 11, 10, 18]),
    y=np.array([28.0, 8, -3, 7, -1, 1, 18, 12]),
)
SCHOOLS_SPLIT = Partition("schools", entity_args=("sigma", "y"))


def eight_schools(sigma, y=None):
    """Non-centred eight schools (Rubin 1981): a curved ridge in (tau, theta_tilde)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def _reference(objective, start):
    """The mode by SciPy's L-BFGS-B on the full objective, to a tight tolerance."""
    ref = optimize.minimize(
        objective.value_and_grad,
        start,
        jac=True,
        method="L-BFGS-B",
        options=dict(maxiter=20_000, ftol=1e-15, gtol=1e-9, maxcor=30),
    )
    return ref.x, ref.fun


@pytest.mark.parametrize("num_shards", [1, 2])
def test_newton_from_an_indefinite_start_reaches_the_lbfgs_mode(num_shards):
    # mu = 0, log tau = 3, theta_tilde = 2: far up the ridge, where the Hessian is
    # indefinite; no L-BFGS warm-up, so the trust region does all the work
    start = np.r_[0.0, 3.0, np.full(8, 2.0)]
    with NewtonObjective(
        eight_schools, SCHOOLS, partition=SCHOOLS_SPLIT, num_shards=num_shards
    ) as objective:
        r = find_map_newton(
            objective, init=start, warmup_steps=0, gtol=1e-8, progress_bar=False
        )
        ref_x, ref_loss = _reference(objective, start)
    assert r.status == "converged" and r.grad_norm <= 1e-8
    assert r.loss <= ref_loss + 1e-9
    # at gtol = 1e-8 and curvature >= 1e-3 the points agree to ~1e-5
    np.testing.assert_allclose(r.x, ref_x, atol=1e-4)
    assert r.num_hessians <= r.num_iterations + 1


def _elasticity(num_products=24, num_weeks=10):
    model = reparam(
        elasticity_model,
        config={"gamma": LocScaleReparam(0), "delta": LocScaleReparam(0)},
    )
    df, _ = simulate_elasticity(3, num_products, num_weeks, seed=0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    return model, data.model_kwargs()


ELASTICITY_SPLIT = Partition(
    "products",
    entity_args=("category_of_product",),
    index_arg="product_idx",
    obs_args=("log_price", "time_idx", "units"),
    obs_plate="obs",
)


@pytest.mark.slow  # about 20 s on a quiet machine (Hessian compilation per shard)
def test_newton_on_the_elasticity_model_matches_lbfgs_on_1_and_2_shards():
    model, kwargs = _elasticity()
    results = []
    for num_shards in (1, 2):
        with NewtonObjective(
            model, kwargs, partition=ELASTICITY_SPLIT, num_shards=num_shards
        ) as objective:
            r = find_map_newton(objective, gtol=1e-7, progress_bar=False)
            assert r.status == "converged", r.message
            assert r.warmup_steps > 0 and r.num_hessians >= 1
            if num_shards == 1:
                ref_x, ref_loss = _reference(objective, np.zeros(objective.size))
                assert r.loss <= ref_loss + 1e-8 * abs(ref_loss)
                np.testing.assert_allclose(r.x, ref_x, atol=1e-4)
            results.append(r)
    # the same mode on 1 and 2 shards (driver layout: globals, then products in order)
    np.testing.assert_allclose(results[0].x, results[1].x, atol=1e-6)
    np.testing.assert_allclose(
        results[0].params["beta"], results[1].params["beta"], atol=1e-6
    )


def test_fit_map_newton_validates_its_settings_before_any_work():
    with pytest.raises(ConfigurationError, match="method='bfgs'.*'newton'"):
        fit_map(eight_schools, model_kwargs=SCHOOLS, method="bfgs", backend="local")
    with NewtonObjective(
        eight_schools, SCHOOLS, partition=SCHOOLS_SPLIT, num_shards=1
    ) as f:
        with pytest.raises(ConfigurationError, match="warmup_steps=-1"):
            find_map_newton(f, warmup_steps=-1)
        with pytest.raises(ConfigurationError, match="init has shape"):
            find_map_newton(f, init=np.zeros(3))
