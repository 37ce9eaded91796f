"""The model zoo through every shard algorithm, on 1 and 2 shards, default plan.

For each model of :mod:`zoo_models` and each of ``fit_map``,
``laplace_approximation`` and ``fit_svi``:

* cases listed in the model's ``expect`` must raise a ``ConfigurationError`` whose
  message matches, before any compute (plan time), or, for a model without a
  proper mode (a centred hierarchical scale), when the Laplace step finds that;
* every other case must run, and
  - MAP: the 2-shard optimum equals the 1-shard one to optimizer tolerance
    (constrained values, ``rtol = atol = 2e-3``);
  - Laplace: the 2-shard log marginal likelihood equals the 1-shard one (1e-3
    relative), and where a reference posterior exists every compared mean is
    within ``ref_tol`` reference sds plus 4 Monte Carlo errors of the draws;
  - SVI (full batch, float64, same seed, started at the MAP): when both runs
    have the same global parameters (a row split) the variational means on 2
    shards equal those on 1 shard to 1e-4 and the posterior means agree within 5
    Monte Carlo errors; when 2 shards hold a plate's variables as locals (their
    own optimizer and draws), within 0.25 sd more; where a reference exists the
    means are within ``ref_tol`` reference sds plus 4 Monte Carlo errors.

Laplace and SVI cases of the larger models are marked ``slow``.

Every call goes through :func:`run_case`, the one place that knows the entry
points' signatures.
"""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import pytest
from zoo_models import BY_NAME, ZOO

from raybayes.core.tracing import abstract_trace
from raybayes.errors import ConfigurationError
from raybayes.optim import laplace_approximation
from raybayes.optim.map import fit_map
from raybayes.svi import fit_svi

METHODS = ("fit_map", "laplace", "fit_svi")
SHARDS = (1, 2)
NUM_DRAWS = 1000
SVI_STEPS = 200
# Laplace and SVI compile Hessian-vector products and guide steps per shard shape:
# run by default for these models only, the rest with -m slow.
FAST = {"eight_schools_noncentered"}


def _call(zoo, method, num_shards, init_params=None):
    """The entry points, called with keyword arguments only (one place to adapt)."""
    kwargs = zoo.data()
    common = dict(model_kwargs=kwargs, num_shards=num_shards, backend="local")
    if method == "fit_map":
        return fit_map(zoo.model, **common, progress_bar=False, max_steps=500)
    if method == "laplace":
        return laplace_approximation(
            zoo.model,
            **common,
            num_samples=NUM_DRAWS,
            progress_bar=False,
            max_steps=500,
        )
    return fit_svi(
        zoo.model,
        **common,
        num_steps=SVI_STEPS,
        learning_rate=0.01,
        tol=None,
        seed=0,
        num_samples=NUM_DRAWS,
        init_params=init_params,
        progress_bar=False,
        x64=True,
    )


@functools.cache
def run_case(name, method, num_shards):
    """``("ok", result)`` or ``("clear error", message)`` or ``("crash", text)``.

    A ConfigurationError or DataValidationError raised before compute is a clear
    error; anything else is a crash.
    """
    zoo = BY_NAME[name]
    init = None
    if method == "fit_svi":
        status, found = run_case(name, "fit_map", 1)
        if status == "ok":
            init = {
                k: np.asarray(v) for k, v in found.params.items() if k in _latents(zoo)
            }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", _call(zoo, method, num_shards, init)
    except ConfigurationError as err:
        return "clear error", str(err)
    except Exception as err:  # noqa: BLE001 - reported as a crash
        return "crash", f"{type(err).__name__}: {err}"


def _latents(zoo):
    tr = abstract_trace(zoo.model, (), zoo.data())
    return {
        k for k, v in tr.items() if v["type"] == "sample" and not v.get("is_observed")
    }


def _posterior_means(idata):
    post = idata.posterior
    return {
        k: (np.asarray(post[k].mean(("chain", "draw"))), np.asarray(post[k].std()))
        for k in post.data_vars
    }


def _compare_reference(zoo, idata):
    means = _posterior_means(idata)
    sds = {k: np.asarray(idata.posterior[k].std(("chain", "draw"))) for k in means}
    bad = []
    for site, (ref_mean, ref_sd) in zoo.reference.items():
        got = means[site][0]
        mc = 4 * sds[site] / np.sqrt(NUM_DRAWS)
        tol = zoo.ref_tol * np.asarray(ref_sd) + mc
        err = np.abs(got - np.asarray(ref_mean))
        if np.any(err > tol):
            bad.append(f"{site}: {got} vs {ref_mean} (tol {tol})")
    return bad


def _marks(zoo, method, num_shards):
    if (method, num_shards) in zoo.expect and not zoo.expect_after_compute:
        return ()  # raised at plan time: fast
    if zoo.name == "radon_contextual" or (method != "fit_map" and zoo.name not in FAST):
        return (pytest.mark.slow,)
    return ()


CASES = [
    pytest.param(z.name, m, s, marks=_marks(z, m, s), id=f"{z.name}-{m}-{s}")
    for z in ZOO
    for m in METHODS
    for s in SHARDS
]


@pytest.mark.parametrize("name,method,num_shards", CASES)
def test_zoo_case(name, method, num_shards):
    zoo = BY_NAME[name]
    status, result = run_case(name, method, num_shards)
    expected = zoo.expect.get((method, num_shards))
    if expected is not None:
        assert status == "clear error", (status, str(result)[:500])
        assert re.search(expected, result, re.S), result
        return
    assert status == "ok", str(result)[:2000]
    if num_shards == 1:
        if zoo.reference is not None and method != "fit_map":
            idata = result.idata
            bad = _compare_reference(zoo, idata)
            assert not bad, bad
        return
    status1, one = run_case(name, method, 1)
    assert status1 == "ok"
    if method == "fit_map":
        for site, value in one.params.items():
            np.testing.assert_allclose(
                result.params[site], value, rtol=2e-3, atol=2e-3, err_msg=site
            )
    elif method == "laplace":
        assert result.log_marginal_likelihood == pytest.approx(
            one.log_marginal_likelihood, rel=1e-3, abs=1e-3
        )
        _same_means(result.idata, one.idata)
    elif len(result.params["loc"]) == len(one.params["loc"]):
        # The same global parameters on 1 and 2 shards: the same fit.
        np.testing.assert_allclose(
            result.params["loc"], one.params["loc"], rtol=1e-4, atol=1e-4
        )
        _same_means(result.idata, one.idata)
    else:
        # 2 shards hold a plate's variables as locals (their own optimizer and
        # draws), 1 shard as globals: the fits agree up to the optimizer's noise.
        _same_means(result.idata, one.idata, q_sds=0.25)
    if zoo.reference is not None and method != "fit_map":
        bad = _compare_reference(zoo, result.idata)
        assert not bad, bad


def _same_means(a, b, q_sds=0.0):
    """Posterior means within 5 Monte Carlo errors (plus ``q_sds`` sds)."""
    ma, mb = _posterior_means(a), _posterior_means(b)
    for k in mb:
        sd = np.asarray(b.posterior[k].std(("chain", "draw")))
        tol = (5 * np.sqrt(2 / NUM_DRAWS) + q_sds) * sd + 1e-6
        assert np.all(np.abs(ma[k][0] - mb[k][0]) <= tol), k


def test_zoo_has_at_least_twelve_models_and_no_crash_is_expected():
    assert len(ZOO) >= 12
    assert len({z.model.__name__ for z in ZOO}) >= 12
