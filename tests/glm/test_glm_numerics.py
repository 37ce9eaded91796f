"""Shard loss/gradient/Hessian and the driver-side optimizers (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from raybayes.backends import get_backend
from raybayes.errors import ConfigurationError
from raybayes.glm import (
    GLMShard,
    ShardedGLMObjective,
    logistic_nll,
    minimize_lbfgs,
    minimize_newton,
    minimize_owlqn,
    poisson_nll,
    shard_bounds,
)


def _data(family, n=700, d=5, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(dtype)
    w = rng.normal(scale=0.5, size=d)
    z = X.astype(np.float64) @ w + 0.2
    if family == "logistic":
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float64)
    else:
        y = rng.poisson(np.exp(z)).astype(np.float64)
    return X, y


REFERENCE = {"logistic": logistic_nll, "poisson": poisson_nll}


@pytest.mark.parametrize("family", ["logistic", "poisson"])
def test_shard_loss_grad_hess_match_reference(family):
    X, y = _data(family)
    coef = np.array([0.3, -0.2, 0.1, 0.0, 0.5, -0.1])
    # Small blocks so that the loop over cache blocks is exercised (700 = 6 x 128 - 68).
    terms = GLMShard(X, y, family, block_rows=128).evaluate(coef, need_hess=True)
    ref = REFERENCE[family]
    assert terms.loss == pytest.approx(ref(X, y, coef), rel=1e-12)
    num_grad = approx_fprime(coef, lambda c: ref(X, y, c), 1e-6)
    np.testing.assert_allclose(terms.grad, num_grad, rtol=1e-5, atol=1e-4)
    num_hess = np.array(
        [
            approx_fprime(
                coef, lambda c, i=i: GLMShard(X, y, family).evaluate(c).grad[i]
            )
            for i in range(6)
        ]
    )
    np.testing.assert_allclose(terms.hess, num_hess, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(terms.hess, terms.hess.T)


def test_no_intercept_zeroes_its_entries():
    X, y = _data("logistic")
    coef = np.array([0.3, -0.2, 0.1, 0.0, 0.5, 7.0])
    t = GLMShard(X, y, "logistic").evaluate(coef, need_hess=True, fit_intercept=False)
    assert t.grad[-1] == 0.0 and not t.hess[-1].any() and not t.hess[:, -1].any()
    assert t.loss == pytest.approx(logistic_nll(X, y, coef, fit_intercept=False))


@pytest.mark.parametrize("family", ["logistic", "poisson"])
def test_float32_shard_stays_float32_and_is_accurate(family):
    X, y = _data(family, n=5000, dtype=np.float32)
    shard = GLMShard(X, y, family)
    assert shard.X.dtype == np.float32 and shard.X is X  # no copy of the features
    coef = np.array([0.3, -0.2, 0.1, 0.0, 0.5, -0.1])
    t = shard.evaluate(coef)
    t64 = GLMShard(X.astype(np.float64), y, family).evaluate(coef)
    assert t.loss == pytest.approx(t64.loss, rel=1e-6)
    np.testing.assert_allclose(t.grad, t64.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_sum_over_shards_equals_full_data(num_shards):
    X, y = _data("logistic", n=101)
    coef = np.linspace(-0.5, 0.5, 6)
    full = GLMShard(X, y, "logistic").evaluate(coef, need_hess=True)
    with ShardedGLMObjective(X, y, "logistic", get_backend("local"), num_shards) as obj:
        total = obj.evaluate(coef, need_hess=True)
    assert total.num_rows == 101
    assert total.loss == pytest.approx(full.loss, rel=1e-13)
    np.testing.assert_allclose(total.grad, full.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total.hess, full.hess, rtol=1e-12, atol=1e-12)


def test_shard_bounds_cover_rows_and_reject_too_many_shards():
    b = shard_bounds(10, 4)
    assert b[0] == 0 and b[-1] == 10 and np.all(np.diff(b) >= 2)
    with pytest.raises(ConfigurationError, match="more than the 3 rows"):
        shard_bounds(3, 4)
    with pytest.raises(ConfigurationError, match="positive integer"):
        shard_bounds(3, 0)


def _quadratic(A, b):
    return lambda x: (float(0.5 * x @ A @ x - b @ x), A @ x - b)


def test_lbfgs_and_newton_solve_a_quadratic():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(6, 6))
    A = M @ M.T + np.eye(6)
    b = rng.normal(size=6)
    exact = np.linalg.solve(A, b)
    r1 = minimize_lbfgs(_quadratic(A, b), np.zeros(6), tol=1e-10, max_steps=200)
    assert r1.converged and np.allclose(r1.x, exact, atol=1e-8)
    vg = _quadratic(A, b)
    r2 = minimize_newton(
        lambda x: (*vg(x), A), lambda x: vg(x)[0], np.zeros(6), tol=1e-12
    )
    assert r2.converged and r2.num_iterations == 1
    np.testing.assert_allclose(r2.x, exact, atol=1e-10)


def test_owlqn_matches_the_lasso_soft_threshold():
    # Separable objective: 0.5 * sum a_i (x_i - c_i)^2 + l_i |x_i| has the closed form
    # x_i = sign(c_i) * max(|c_i| - l_i / a_i, 0).
    a = np.array([1.0, 2.0, 0.5, 3.0, 1.0])
    c = np.array([2.0, -1.0, 0.3, 0.1, -4.0])
    lam = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    exact = np.sign(c) * np.maximum(np.abs(c) - lam / a, 0)
    vg = lambda x: (float(0.5 * a @ (x - c) ** 2), a * (x - c))  # noqa: E731
    res = minimize_owlqn(vg, np.zeros(5), lam, tol=1e-10, max_steps=200)
    assert res.converged
    np.testing.assert_allclose(res.x, exact, atol=1e-9)
    assert np.count_nonzero(res.x) == np.count_nonzero(exact) == 3


def test_owlqn_reports_a_failed_line_search_instead_of_raising():
    # A "gradient" that points the wrong way: no step decreases the objective.
    res = minimize_owlqn(
        lambda x: (float(x @ x), -2 * x), np.ones(3), np.zeros(3), max_linesearch=5
    )
    assert not res.converged and "line search" in res.message
    np.testing.assert_array_equal(res.x, np.ones(3))
