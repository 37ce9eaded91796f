"""Bad configuration fails before anything runs; a model that raises while sampling
surfaces as a ChainError that names the chain and carries the worker's traceback."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes import ChainError, ConfigurationError

Y = np.array([0.5, 1.5], dtype=np.float32)
CALLS = {"model": 0}


def counting_model(y):
    CALLS["model"] += 1
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def run(model=counting_model, **kwargs):
    options = dict(
        num_chains=2, num_warmup=20, num_samples=20, backend="local", progress_bar=False
    )
    options.update(kwargs)
    return raybayes.sample(model, Y, **options)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"num_chains": 0}, ["num_chains=0", ">= 1"]),
        ({"num_chains": 2.5}, ["num_chains=2.5"]),
        ({"num_samples": -1}, ["num_samples=-1", ">= 1"]),
        ({"num_warmup": -5}, ["num_warmup=-5", ">= 0"]),
        ({"num_workers": 0}, ["num_workers=0"]),
        ({"chunk_size": 0}, ["chunk_size=0"]),
        ({"target_accept_prob": 1.5}, ["target_accept_prob=1.5", "(0, 1)"]),
        ({"target_accept_prob": 0.0}, ["target_accept_prob=0.0", "(0, 1)"]),
    ],
)
def test_bad_configuration_fails_before_the_model_runs(kwargs, names):
    CALLS["model"] = 0
    with pytest.raises(ConfigurationError) as info:
        run(**kwargs)
    for name in names:
        assert name in str(info.value)
    assert CALLS["model"] == 0


def test_configuration_error_is_a_value_error():
    with pytest.raises(ValueError):
        run(num_chains=0)


def test_model_that_is_not_callable():
    with pytest.raises(ConfigurationError, match="not callable"):
        raybayes.sample("model", Y, backend="local", progress_bar=False)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ConfigurationError) as info:
        run(backend="spark")
    message = str(info.value)
    assert "'spark'" in message and "'ray'" in message and "'local'" in message


def test_unknown_backend_fails_before_the_model_runs():
    CALLS["model"] = 0
    with pytest.raises(ConfigurationError):
        run(backend="spark")
    assert CALLS["model"] == 0


def test_address_with_local_backend():
    with pytest.raises(ConfigurationError, match="address="):
        run(backend="local", address="127.0.0.1:6379")


# -- a model that raises while sampling ------------------------------------------------


def model_that_fails_when_traced(y):
    """Runs in the driver's trace (concrete values); raises under jit on the worker."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    if isinstance(mu, jax.core.Tracer):
        raise FloatingPointError("the model failed on purpose")
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _refuse_large(value):
    if abs(float(value)) > 3.0:
        raise FloatingPointError(f"the model refused mu={float(value):.3f}")


def model_that_fails_at_run_time(y):
    """Valid at the initial point (|mu| < 2); raises once a trajectory reaches |mu| > 3.

    The error is raised on the host inside compiled code, not while tracing.
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    jax.debug.callback(_refuse_large, mu)
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


FAILING_MODELS = [
    # (model, its error message, the function that raised)
    (
        model_that_fails_when_traced,
        "the model failed on purpose",
        "model_that_fails_when_traced",
    ),
    (model_that_fails_at_run_time, "the model refused mu=", "_refuse_large"),
]


def check_chain_error(err: ChainError, num_chains: int, message: str, function: str):
    assert isinstance(err, raybayes.RaybayesError)
    assert err.kind == "chain"
    assert err.unit_id in range(num_chains)
    assert f"chain {err.unit_id} failed" in str(err)
    assert message in err.message
    # The worker's traceback reaches the driver, down to the frame that raised.
    assert "Traceback" in err.remote_traceback
    assert function in err.remote_traceback
    assert "Traceback on the worker" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.unit_id, copy.message, copy.remote_traceback) == (
        err.unit_id,
        err.message,
        err.remote_traceback,
    )
    assert str(copy) == str(err)


def model_with_no_valid_point(y):
    """The observations are outside the likelihood's support for every ``rate``."""
    rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
    numpyro.sample("y", dist.Exponential(rate), obs=-y)


def test_no_valid_initial_point_names_the_chain():
    with pytest.raises(ChainError) as info:
        run(model_with_no_valid_point)
    assert info.value.unit_id == 0
    assert "Cannot find valid initial parameters" in info.value.message


@pytest.mark.parametrize(("model", "message", "function"), FAILING_MODELS)
def test_model_error_names_the_chain_in_process(model, message, function):
    with pytest.raises(ChainError) as info:
        run(model, num_chains=3, num_warmup=50, num_samples=50)
    check_chain_error(info.value, 3, message, function)
    # In-process, chains start in order, so the first chain is the one that fails.
    assert info.value.unit_id == 0


@pytest.mark.parametrize(("model", "message", "function"), FAILING_MODELS)
def test_model_error_names_the_chain_on_ray(model, message, function, ray_backend):
    import ray

    with pytest.raises(ChainError) as info:
        run(
            model,
            num_chains=3,
            num_warmup=50,
            num_samples=50,
            backend=ray_backend,
            num_workers=2,
        )
    check_chain_error(info.value, 3, message, function)
    assert ray.is_initialized()  # the failure leaves the given backend running
