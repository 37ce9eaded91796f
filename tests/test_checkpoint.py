"""Checkpoint files: arrays and plain metadata round-trip exactly; nothing runs code."""

from __future__ import annotations

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer.hmc_util import HMCAdaptState as AdaptState

from raybayes.checkpoint import load_checkpoint, register_state_type, save_checkpoint
from raybayes.errors import ConfigurationError


def _leaves_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_optimizer_and_sampler_states(tmp_path):
    theta = {"loc": jnp.arange(3.0), "scale": {"raw": jnp.ones((2, 2), jnp.float32)}}
    opt_state = optax.adam(0.1).init(theta)
    adapt = AdaptState(
        0.1, {("a", "b"): np.eye(2)}, None, None, (1.0, 2), (), 3, jax.random.PRNGKey(7)
    )
    tree = dict(
        opt=opt_state,
        adapt=adapt,
        losses=np.array([1.5, 2.5]),
        n=3,
        x=0.1,
        name="run",
        flag=True,
        none=None,
        ints={0: np.int32(4)},
        key=jax.random.key(5),
        items=[np.float32(1.0), (2, "b")],
    )
    path = save_checkpoint(tmp_path / "s.npz", tree)
    back = load_checkpoint(path)
    assert type(back["opt"][0]) is type(opt_state[0])
    assert isinstance(back["adapt"], AdaptState)
    assert list(back["adapt"].inverse_mass_matrix) == [("a", "b")]
    assert back["n"] == 3 and back["x"] == 0.1 and back["name"] == "run"
    assert back["flag"] is True and back["none"] is None
    assert back["items"][1] == (2, "b") and list(back["ints"]) == [0]
    assert jax.dtypes.issubdtype(back["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(back["key"]), jax.random.key_data(tree["key"])
    )
    _leaves_equal(back["opt"], opt_state)
    _leaves_equal(back["adapt"], adapt)


def test_the_file_is_a_plain_npz_without_pickles(tmp_path):
    path = save_checkpoint(tmp_path / "s.npz", {"x": np.arange(4)})
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert all(n.endswith(".npy") for n in names)
    with np.load(path, allow_pickle=False) as archive:
        structure = json.loads(archive["__structure__"].tobytes())
        assert archive["a0"].tolist() == [0, 1, 2, 3]
    assert structure["tree"]["t"] == "dict"


def test_unknown_namedtuple_name_in_a_file_is_not_imported(tmp_path):
    from typing import NamedTuple

    class Local(NamedTuple):
        x: int

    with pytest.raises(TypeError, match="register_state_type"):
        save_checkpoint(tmp_path / "s.npz", Local(1))
    register_state_type(Local)
    path = save_checkpoint(tmp_path / "s.npz", Local(1))
    # Rewrite the type name to something importable: loading must refuse, not import.
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    structure = json.loads(arrays["__structure__"].tobytes())
    structure["tree"]["name"] = "os.system"
    arrays["__structure__"] = np.frombuffer(json.dumps(structure).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ConfigurationError, match="not a known state type"):
        load_checkpoint(path)


def test_an_object_array_cannot_be_saved_or_loaded(tmp_path):
    with pytest.raises(TypeError, match="not an array"):
        save_checkpoint(tmp_path / "s.npz", {"x": object()})
    np.savez(tmp_path / "o.npz", __structure__=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigurationError, match="not a raybayes checkpoint"):
        load_checkpoint(tmp_path / "o.npz")


def test_old_pickle_next_to_a_missing_checkpoint_is_refused(tmp_path):
    (tmp_path / "global.pkl").write_bytes(b"not read")
    with pytest.raises(ConfigurationError, match="old pickle format"):
        load_checkpoint(tmp_path / "global.npz")
    assert load_checkpoint(tmp_path / "other.npz") is None


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_fit_svi_does_not_unpickle_an_old_checkpoint(tmp_path):
    """Probe 2 for fit_svi: a crafted global.pkl where the old format kept it."""
    import pickle

    import numpyro
    import numpyro.distributions as dist

    import raybayes

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "global.pkl").write_bytes(pickle.dumps({"theta": _Marker(marker)}))
    with pytest.raises(ConfigurationError, match="old pickle format"):
        raybayes.fit_svi(model, model_kwargs={"y": np.ones(4)}, num_steps=5,
                         checkpoint_dir=ckpt, progress_bar=False, num_samples=5)
    assert not marker.exists()
