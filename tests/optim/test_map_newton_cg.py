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
from raybayes.optim import NewtonObjective, find_map_newton_cg, fit_map, laplace

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


def _dense_hessian(objective, x, step=1e-5):
    """Central differences of the exact gradient: ``(n, n)``."""
    cols = []
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = step
        cols.append(
            (objective.value_and_grad(x + e)[1] - objective.value_and_grad(x - e)[1])
            / (2 * step)
        )
    h = np.stack(cols, axis=1)
    return 0.5 * (h + h.T)


def test_laplace_reuses_the_kept_newton_cg_hessian_only_near_the_mode():
    with NewtonObjective(
        eight_schools_noncentred, SCHOOLS, partition=SCHOOLS_SPLIT, num_shards=2
    ) as objective:
        mode = find_map_newton_cg(
            objective, warmup_steps=200, gtol=1e-9, progress_bar=False
        ).x
        # a start a few thousandths of a posterior sd from the mode: the one
        # Hessian Newton-CG builds there (no profile steps: at the start itself)
        # is the Laplace precision at the mode
        start = mode + 1e-3 * np.linspace(-1, 1, mode.size)
        r = find_map_newton_cg(
            objective, init=start, warmup_steps=0, profile_steps=0, gtol=1e-9,
            progress_bar=False,
        )
        assert r.status == "converged" and r.num_hessians == 1, r.message
        np.testing.assert_allclose(r.kept_hessian_globals, start[:2])
        # the distance reported bounds the true one, |x* - x_h| in H(x_h)'s norm
        d = r.x - start
        true = float(np.sqrt(d @ _dense_hessian(objective, start) @ d))
        assert true <= r.kept_hessian_distance * (1 + 1e-6) + 1e-9
        assert r.kept_hessian_distance < 0.05
        reused = laplace(objective, r, num_samples=10, seed=3)
        assert reused.hessian_reused and reused.hessian_vector_products == 0
        fresh = laplace(objective, r, num_samples=10, seed=3, hessian_reuse_tol=0)
        assert not fresh.hessian_reused and fresh.hessian_vector_products > 0
        # the precision moved by O(distance): the covariance and log p(y) agree
        np.testing.assert_allclose(
            reused.global_covariance, fresh.global_covariance, rtol=5e-3, atol=1e-8
        )
        gap = reused.log_marginal_likelihood - fresh.log_marginal_likelihood
        assert abs(gap) < 0.01
        # and the exact covariance of the globals at the mode is the fresh one
        cov = np.linalg.inv(_dense_hessian(objective, r.x))[:2, :2]
        np.testing.assert_allclose(fresh.global_covariance, cov, rtol=1e-4)
        # from the indefinite start the one Hessian is far from the mode: rebuilt
        far = find_map_newton_cg(
            objective, init=np.r_[0.0, 3.0, np.full(8, 2.0)], warmup_steps=0,
            gtol=1e-8, progress_bar=False,
        )
        assert far.kept_hessian_distance > 0.05
        lap = laplace(objective, far, num_samples=10)
        assert not lap.hessian_reused and lap.hessian_vector_products > 0
        with pytest.raises(ConfigurationError, match="hessian_reuse_tol=-1"):
            laplace(objective, far, hessian_reuse_tol=-1.0)
