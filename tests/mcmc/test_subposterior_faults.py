"""A machine lost while ``raybayes.sample_subposteriors`` runs changes no draw.

Two one-CPU Ray nodes, one worker actor on each; after the first chunk of any
shard's chain comes back, the second node is switched off (its Ray services and its
worker process killed). The chains that worker held resume from their last completed
chunk on the surviving worker, and every shard's draws, and so the combined draws,
equal those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("psutil")

import raybayes  # noqa: E402
from ray_faults import lose_node  # noqa: E402
from raybayes.errors import WorkerLostError  # noqa: E402

N, D = 120, 2
# Two shards x two chains on two workers: each worker holds chains of both shards.
RUN = dict(
    num_shards=2,
    num_chains=2,
    num_warmup=100,
    num_samples=100,
    chunk_size=25,
    seed=7,
    progress_bar=False,
)


def regression(X, y=None):
    prior = dist.Normal(0.0, 2.0).expand([X.shape[1]]).to_event(1)
    beta = numpyro.sample("beta", prior)
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X @ np.array([0.7, -1.2]) + rng.normal(size=N)).astype(np.float32)
    return {"X": X, "y": y}


def _run(backend, **kwargs):
    with warnings.catch_warnings():
        # 200 draws per shard: the combined mean's Monte Carlo error is flagged.
        warnings.simplefilter("ignore", raybayes.RaybayesWarning)
        return raybayes.sample_subposteriors(
            regression, model_kwargs=_data(), backend=backend, **RUN, **kwargs
        )


@pytest.mark.slow  # a two-node cluster, two cold workers: 1-4 min on 2 busy cores
def test_lost_node_changes_no_draw(monkeypatch):
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    from raybayes.backends import RayBackend
    from raybayes.mcmc import ChunkResult, subposterior

    reference = _run("local")  # uninterrupted, in process: the same keys
    assert reference.attrs["worker_restarts"] == 0

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    lost_actors, lost_calls = [], []
    real = subposterior._ShardPoolView.result

    def result(self, fut):
        try:
            out = real(self, fut)
        except WorkerLostError:
            lost_calls.append((fut.worker_index, fut.tag))
            raise
        if not lost_actors and isinstance(out, ChunkResult):
            lost_actors.append(lose_node(cluster, node))
        return out

    monkeypatch.setattr(subposterior._ShardPoolView, "result", result)
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the model, for the workers
    try:
        with RayBackend(address=cluster.address) as backend:
            got = _run(backend, num_workers=2)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        ray.shutdown()
        cluster.shutdown()
    assert len(lost_actors) == 1 and len(lost_actors[0]) == 1  # one worker, once
    # ... which still had work: a chain's call to it failed, and only to it.
    assert len({w for w, _ in lost_calls}) == 1
    assert [tag for _, tag in lost_calls if tag != "__ping__"]
    assert got.attrs["worker_restarts"] >= 1  # the run saw the loss
    for group in ("posterior", "shard_0", "shard_1"):
        a, b = reference[group]["beta"].values, got[group]["beta"].values
        assert a.shape == (2, RUN["num_samples"], D), group
        assert a.tobytes() == b.tobytes(), group
