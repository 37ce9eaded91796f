"""Reruns with ``checkpoint_dir``: same settings and data resume, changed ones are
refused before any compute (each change named), ``overwrite=True`` starts fresh."""

from __future__ import annotations

import json

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from conjugate_normal import hierarchical_normal_model, simulate
from raybayes.core import Partition
from raybayes.errors import ConfigurationError


def normal_mean(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = np.array([0.3, 1.2, -0.4, 0.9, 1.7])
MCMC = dict(num_chains=2, num_warmup=30, num_samples=20, seed=1, backend="local",
            progress_bar=False)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sample_rerun_with_the_same_settings_resumes(tmp_path):
    first = raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path, **MCMC)
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["model"].endswith("normal_mean")
    assert set(stored["data"]) == {"y"} and stored["num_warmup"] == 30
    files = _mtimes(tmp_path)
    # Settings that may change on resume: the time limit, the progress bar.
    again = raybayes.sample(
        normal_mean, Y.copy(), checkpoint_dir=tmp_path, max_time_s=600.0,
        **{**MCMC, "progress_bar": True},
    )
    np.testing.assert_array_equal(again.posterior["mu"], first.posterior["mu"])
    assert _mtimes(tmp_path) == files  # resumed a finished run: nothing rewritten


def test_sample_rerun_with_another_num_warmup_is_refused(tmp_path):
    raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path, **MCMC)
    files = _mtimes(tmp_path)
    with pytest.raises(ConfigurationError) as err:
        raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path,
                        **{**MCMC, "num_warmup": 20})
    assert "num_warmup: 30 -> 20" in str(err.value)
    assert "overwrite=True" in str(err.value) and "new checkpoint_dir" in str(err.value)
    assert _mtimes(tmp_path) == files


def test_sample_rerun_with_changed_data_is_refused(tmp_path):
    raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path, **MCMC)
    files = _mtimes(tmp_path)
    changed = Y.copy()
    changed[2] += 1.0
    with pytest.raises(ConfigurationError, match="data: y changed") as err:
        raybayes.sample(normal_mean, changed, checkpoint_dir=tmp_path, **MCMC)
    assert "num_warmup" not in str(err.value)  # only what changed is named
    # The same values in another dtype are other data as well.
    with pytest.raises(ConfigurationError, match="data: y changed"):
        raybayes.sample(normal_mean, Y.astype(np.float32), checkpoint_dir=tmp_path,
                        **MCMC)
    assert _mtimes(tmp_path) == files


def test_sample_overwrite_starts_a_fresh_run(tmp_path):
    raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path / "a", **MCMC)
    new = {**MCMC, "num_warmup": 20, "num_chains": 1}
    fresh = raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path / "b", **new)
    over = raybayes.sample(normal_mean, Y, checkpoint_dir=tmp_path / "a",
                           overwrite=True, **new)
    np.testing.assert_array_equal(over.posterior["mu"], fresh.posterior["mu"])
    stored = json.loads((tmp_path / "a" / "run.json").read_text())
    assert stored["num_warmup"] == 20 and stored["num_chains"] == 1
    assert not (tmp_path / "a" / "chain-001").exists()  # the old run's second chain


# -- fit_svi -----------------------------------------------------------------------
hierarchical_normal = hierarchical_normal_model(3.0, 0.8, 1.0)
PARTITION = Partition("groups", index_arg="group_idx", obs_args=("group_idx", "y"),
                      obs_plate="obs", size_arg="num_groups")
KWARGS = simulate(8, (2, 5), 1.5, 0.8, 1.0)
SVI = dict(num_shards=1, partition=PARTITION, backend="local", tol=None,
           progress_bar=False, num_samples=5, learning_rate=0.05, seed=2,
           checkpoint_every=10)


def test_fit_svi_rerun_with_the_same_settings_resumes(tmp_path):
    first = raybayes.fit_svi(hierarchical_normal, model_kwargs=KWARGS, num_steps=20,
                             checkpoint_dir=tmp_path, **SVI)
    stored = json.loads((tmp_path / "run.json").read_text())
    assert set(stored["data"]) == {"group_idx", "num_groups", "y"}
    assert stored["learning_rate"] == 0.05 and stored["num_shards"] == 1
    # num_steps and num_samples may change: the fit goes on from step 20.
    resumed = raybayes.fit_svi(hierarchical_normal, model_kwargs=dict(KWARGS),
                               num_steps=30, checkpoint_dir=tmp_path,
                               **{**SVI, "num_samples": 7})
    assert resumed.num_steps == 30
    np.testing.assert_array_equal(resumed.losses[:20], first.losses)


def test_fit_svi_rerun_with_other_settings_or_data_is_refused(tmp_path):
    raybayes.fit_svi(hierarchical_normal, model_kwargs=KWARGS, num_steps=10,
                     checkpoint_dir=tmp_path, **SVI)
    files = _mtimes(tmp_path)
    with pytest.raises(ConfigurationError) as err:
        raybayes.fit_svi(hierarchical_normal, model_kwargs=KWARGS, num_steps=20,
                         checkpoint_dir=tmp_path, **{**SVI, "learning_rate": 0.1})
    assert "learning_rate: 0.05 -> 0.1" in str(err.value)
    assert "overwrite=True" in str(err.value)
    y = KWARGS["y"].copy()
    y[0] += 1.0
    with pytest.raises(ConfigurationError, match="data: y changed"):
        raybayes.fit_svi(hierarchical_normal, model_kwargs={**KWARGS, "y": y},
                         num_steps=20, checkpoint_dir=tmp_path, **SVI)
    assert _mtimes(tmp_path) == files


def test_fit_svi_overwrite_starts_a_fresh_fit(tmp_path):
    raybayes.fit_svi(hierarchical_normal, model_kwargs=KWARGS, num_steps=10,
                     checkpoint_dir=tmp_path / "a", **SVI)
    new = {**SVI, "learning_rate": 0.1}
    fresh = raybayes.fit_svi(hierarchical_normal, model_kwargs=KWARGS, num_steps=10,
                             checkpoint_dir=tmp_path / "b", **new)
    over = raybayes.fit_svi(hierarchical_normal, model_kwargs=KWARGS, num_steps=10,
                            checkpoint_dir=tmp_path / "a", overwrite=True, **new)
    assert over.num_steps == 10 and len(over.losses) == 10
    np.testing.assert_array_equal(over.losses, fresh.losses)
    np.testing.assert_array_equal(over.params["loc"], fresh.params["loc"])
    assert json.loads((tmp_path / "a" / "run.json").read_text())["learning_rate"] == 0.1
