"""Zoo models through ``fit_map(method="newton")`` and ``fit_map(method="newton-cg")``:
the same MAP as L-BFGS, and the same on 1 and 2 shards."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from zoo_models import BY_NAME

from raybayes.optim.map import fit_map


@functools.cache
def _lbfgs_map(name):
    """SciPy's L-BFGS-B (``find_map``) to a tight tolerance, on one shard."""
    zoo = BY_NAME[name]
    return fit_map(
        zoo.model,
        model_kwargs=zoo.data(),
        backend="local",
        progress_bar=False,
        num_shards=1,
        tol=1e-15,
        gtol=1e-8,
        max_steps=5000,
    )


@pytest.mark.parametrize(
    "name, method",
    [
        ("varying_intercepts", "newton"),
        ("varying_intercepts", "newton-cg"),
        pytest.param("radon_contextual", "newton", marks=pytest.mark.slow),
        pytest.param("radon_contextual", "newton-cg", marks=pytest.mark.slow),
    ],
)
def test_newton_map_equals_lbfgs_map_on_1_and_2_shards(name, method):
    zoo = BY_NAME[name]
    common = dict(model_kwargs=zoo.data(), backend="local", progress_bar=False)
    lbfgs = _lbfgs_map(name)
    for num_shards in (1, 2):
        newton = fit_map(
            zoo.model, **common, num_shards=num_shards, method=method, gtol=1e-8
        )
        assert newton.status == "converged", newton.message
        assert newton.loss <= lbfgs.loss + 1e-9 * max(abs(lbfgs.loss), 1.0)
        for site, value in lbfgs.params.items():
            np.testing.assert_allclose(
                newton.params[site], value, atol=1e-4, rtol=1e-4, err_msg=site
            )
        if method == "newton-cg":  # one full Hessian: the kept preconditioner
            assert newton.num_hessians == 1, newton.message
            assert newton.num_cg_steps >= newton.num_iterations - newton.warmup_steps
