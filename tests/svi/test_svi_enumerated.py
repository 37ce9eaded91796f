"""SVI on a model with an enumerated discrete site (summed out of the shard log
density): a minibatch would scale each enumerated term before the sum, so
subsampling is refused before any step."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from raybayes.errors import ConfigurationError
from raybayes.svi import fit_svi


def mixture(y):
    locs = numpyro.sample("locs", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample(
            "z", dist.Categorical(jnp.ones(2) / 2), infer={"enumerate": "parallel"}
        )
        numpyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)


def test_subsampling_an_enumerated_model_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="subsample_size=5 with enumerated"):
        fit_svi(
            mixture,
            model_kwargs={"y": np.linspace(-2.0, 2.0, 20)},
            num_shards=2,
            backend="local",
            subsample_size=5,
            num_steps=5,
            progress_bar=False,
        )
