"""The public vocabulary of the shard entry points: argument order, deprecated
names (they still work, with a FutureWarning), seeds, scaling settings."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from raybayes.core import Partition
from raybayes.distributed import ShardedObjective
from raybayes.errors import ConfigurationError
from raybayes.optim import find_map, fit_map, laplace, laplace_approximation

OBS = Partition("obs", entity_args=("y",))
Y = np.array([0.5, 1.0, 1.5, 2.0])


def model(scale, y):
    """mu ~ N(0, 1), y_i ~ N(mu, scale): the posterior is N(sum y / (n + s^2), ...)."""
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)


MODE = Y.sum() / (len(Y) + 1.0)  # scale = 1


def test_entry_points_are_exported():
    for name in ("fit_map", "MAPResult", "LaplaceResult", "ScalingConfig"):
        assert name in raybayes.__all__ and hasattr(raybayes, name)
    assert raybayes.fit_map is fit_map


def test_model_args_then_model_kwargs():
    r = fit_map(model, 1.0, model_kwargs={"y": Y}, num_shards=2, partition=OBS,
                backend="local", progress_bar=False)
    assert float(r.params["mu"]) == pytest.approx(MODE, abs=1e-5)
    r2 = fit_map(model, 2.0, model_kwargs={"y": Y}, backend="local",
                 progress_bar=False)  # another scale: another mode
    assert float(r2.params["mu"]) == pytest.approx(Y.sum() / 4 / (1 + 1), abs=1e-5)


def test_old_call_forms_warn_and_give_the_same_result():
    new = fit_map(model, 1.0, model_kwargs={"y": Y}, backend="local",
                  max_steps=50, progress_bar=False)
    with pytest.warns(FutureWarning) as record:
        old = fit_map(model, {"y": Y}, model_args=(1.0,), backend="local",
                      max_iter=50, progress=False)
    text = " ".join(str(w.message) for w in record)
    for name in ("model_kwargs=", "model_args=", "max_steps=", "progress_bar="):
        assert name in text
    np.testing.assert_array_equal(old.x, new.x)


def test_seed_and_deprecated_rng_key_give_the_same_draws():
    common = dict(model_kwargs={"y": Y}, backend="local", progress_bar=False)
    a = laplace_approximation(model, 1.0, num_samples=50, seed=3, **common)
    with pytest.warns(FutureWarning) as record:
        b = laplace_approximation(model, 1.0, num_draws=50,
                                  rng_key=jax.random.PRNGKey(3), **common)
    assert {str(w.message).split("=")[0] for w in record} == {"num_draws", "rng_key"}
    c = laplace_approximation(model, 1.0, num_samples=50, seed=4, **common)
    mu = [r.idata.posterior["mu"].values for r in (a, b, c)]
    assert mu[0].shape == (1, 50)
    np.testing.assert_array_equal(mu[0], mu[1])
    assert not np.allclose(mu[0], mu[2])
    # the Laplace approximation of a Gaussian posterior is exact: var = 1 / 5
    assert a.global_covariance[0, 0] == pytest.approx(0.2, rel=1e-6)


def test_laplace_on_an_objective_takes_the_same_names():
    with ShardedObjective(model, {"y": Y}, partition=OBS, num_shards=2,
                          model_args=(1.0,)) as objective:
        m = find_map(objective, progress_bar=False)
        r = laplace(objective, m, num_samples=20, seed=1)
        with pytest.warns(FutureWarning):
            r_old = laplace(objective, m, num_draws=20, rng_key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(
        r.idata.posterior["mu"].values, r_old.idata.posterior["mu"].values
    )


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ConfigurationError, match="one worker per shard"):
        fit_map(model, 1.0, model_kwargs={"y": Y}, num_shards=2, num_workers=3)
    with pytest.raises(ConfigurationError, match="num_workers=0"):
        laplace_approximation(model, 1.0, model_kwargs={"y": Y}, num_workers=0)
    with pytest.raises(ConfigurationError, match="unknown argument max_iterations="):
        fit_map(model, 1.0, model_kwargs={"y": Y}, backend="local",
                max_iterations=3)
    with pytest.raises(ConfigurationError, match="given twice"), pytest.warns(
        FutureWarning
    ):
        fit_map(model, {"y": Y}, model_kwargs={"y": Y}, backend="local")
    with pytest.raises(ConfigurationError, match="backend='spark'"):
        fit_map(model, 1.0, model_kwargs={"y": Y}, backend="spark")


def test_fit_svi_takes_the_same_vocabulary():
    common = dict(num_steps=3, tol=None, progress_bar=False, backend="local")
    new = raybayes.fit_svi(model, 1.0, model_kwargs={"y": Y}, num_samples=7, **common)
    with pytest.warns(FutureWarning) as record:
        old = raybayes.fit_svi(model, {"y": Y}, model_args=(1.0,), num_draws=7,
                               **common)
    assert len(record) == 3
    assert new.idata.posterior["mu"].shape == (1, 7)
    np.testing.assert_array_equal(old.losses, new.losses)
    np.testing.assert_array_equal(
        old.idata.posterior["mu"].values, new.idata.posterior["mu"].values
    )


def test_fit_svi_takes_its_settings_grouped_or_as_keywords(tmp_path):
    """``stopping=StoppingConfig(...)`` and ``checkpoint=CheckpointConfig(...)`` give
    the same fit as the flat keywords; both forms at once are refused."""
    flat = raybayes.fit_svi(
        model, 1.0, model_kwargs={"y": Y}, num_steps=4, tol=None, window=2,
        checkpoint_dir=tmp_path / "a", checkpoint_every=2, num_samples=5,
        progress_bar=False, backend="local",
    )
    grouped = raybayes.fit_svi(
        model, 1.0, model_kwargs={"y": Y}, num_samples=5, progress_bar=False,
        backend="local",
        stopping=raybayes.StoppingConfig(num_steps=4, tol=None, window=2),
        checkpoint=raybayes.CheckpointConfig(tmp_path / "b", every=2),
    )
    assert grouped.num_steps == flat.num_steps == 4
    np.testing.assert_array_equal(grouped.losses, flat.losses)
    assert (tmp_path / "b" / "run.json").exists()
    with pytest.raises(ConfigurationError, match="both stopping= and num_steps="):
        raybayes.fit_svi(model, 1.0, model_kwargs={"y": Y}, num_steps=5,
                         stopping=raybayes.StoppingConfig(num_steps=4))
    with pytest.raises(ConfigurationError, match="both checkpoint= and overwrite="):
        raybayes.fit_svi(model, 1.0, model_kwargs={"y": Y}, overwrite=True,
                         checkpoint=raybayes.CheckpointConfig(tmp_path / "c"))
    with pytest.raises(ConfigurationError, match="window=0"):
        raybayes.StoppingConfig(window=0)
    with pytest.raises(ConfigurationError, match="every=0"):
        raybayes.CheckpointConfig(tmp_path, every=0)
