"""Newton-CG (``find_map_newton_cg``): the SciPy L-BFGS-B optimum from an
indefinite start on 1 and 2 shards, with one full Hessian (the kept
preconditioner), and its settings checked before any work."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import optimize

from raybayes.core import Partition
from raybayes.errors import ConfigurationError
from raybayes.optim import NewtonObjective, find_map_newton_cg, fit_map

SCHOOLS = dict(
    sigma=np.array([15.0, 10, 16, 11, 9, 11, 10, 18]),
    y=np.array([28.0, 8, -3, 7, -1, 1, 18, 12]),
)
SCHOOLS_SPLIT = Partition("schools", entity_args=("sigma", "y"))


def eight_schools_noncentred(sigma, y=None):
    """Non-centred eight schools (Rubin 1981): a curved ridge in (tau, theta_tilde)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", sigma.shape[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_newton_cg_from_an_indefinite_start_reaches_the_lbfgs_b_mode(num_shards):
    # mu = 0, log tau = 3, theta_tilde = 2: up the ridge; no L-BFGS warm-up
    start = np.r_[0.0, 3.0, np.full(8, 2.0)]
    with NewtonObjective(
        eight_schools_noncentred,
        SCHOOLS,
        partition=SCHOOLS_SPLIT,
        num_shards=num_shards,
    ) as objective:
        r = find_map_newton_cg(
            objective, init=start, warmup_steps=0, gtol=1e-8, progress_bar=False
        )
        ref = optimize.minimize(
            objective.value_and_grad,
            start,
            jac=True,
            method="L-BFGS-B",
            options=dict(maxiter=20_000, ftol=1e-15, gtol=1e-9, maxcor=30),
        )
    assert r.status == "converged" and r.grad_norm <= 1e-8, r.message
    assert r.loss <= ref.fun + 1e-9
    # at gtol = 1e-8 and curvature >= 1e-3 the points agree to ~1e-5
    np.testing.assert_allclose(r.x, ref.x, atol=1e-4)
    # the claim: one full Hessian (the preconditioner), the rest in CG
    assert r.num_hessians == 1, r.message
    assert r.num_cg_steps == sum(r.cg_steps) >= r.num_iterations
    assert r.round_trips > 0 and r.timings_s["hvp"] > 0


def test_newton_cg_validates_its_settings_before_any_work():
    with pytest.raises(ConfigurationError, match="'newton-cg'"):
        fit_map(
            eight_schools_noncentred, model_kwargs=SCHOOLS, method="cg", backend="local"
        )
    with NewtonObjective(
        eight_schools_noncentred, SCHOOLS, partition=SCHOOLS_SPLIT, num_shards=1
    ) as f:
        evaluations = f.num_evaluations
        with pytest.raises(ConfigurationError, match="max_hessians=0"):
            find_map_newton_cg(f, max_hessians=0)
        with pytest.raises(ConfigurationError, match="radius=-1"):
            find_map_newton_cg(f, radius=-1.0)
        with pytest.raises(ConfigurationError, match="init has shape"):
            find_map_newton_cg(f, init=np.zeros(3))
        with pytest.raises(ConfigurationError, match="unknown"):
            find_map_newton_cg(f, max_iter=3)
        assert f.num_evaluations == evaluations
