"""Lost workers, lost nodes and a killed driver change neither the draws nor their number."""

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import raybayes  # noqa: E402
from ray_faults import lose_node  # noqa: E402
from raybayes.backends import RayBackend  # noqa: E402
from raybayes.errors import WorkerLostError  # noqa: E402
from raybayes.mcmc.store import load_draws  # noqa: E402

Y = np.array([28.0, 8, -3, 7, -1, 1, 18, 12])
SIGMA = np.array([15.0, 10, 16, 11, 9, 11, 10, 18])

MODEL_SRC = textwrap.dedent(
    """
    import numpyro, numpyro.distributions as dist

    def eight_schools(y, sigma):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        tau = numpyro.sample("tau", dist.HalfCauchy(5))
        with numpyro.plate("school", len(y)):
            th = numpyro.sample("theta_trans", dist.Normal(0, 1))
            numpyro.deterministic("theta", mu + tau * th)
            numpyro.sample("y", dist.Normal(mu + tau * th, sigma), obs=y)
    """
)
namespace: dict = {"__name__": "eight_schools_model"}
exec(MODEL_SRC, namespace)
eight_schools = namespace["eight_schools"]

KW = dict(num_chains=4, num_warmup=150, num_samples=150, chunk_size=25, seed=3, progress_bar=False)


@pytest.fixture(scope="module")
def reference():
    return raybayes.sample(eight_schools, Y, SIGMA, backend="local", **KW)


def _same(a, b):
    return all(np.array_equal(a.posterior[k].values, b.posterior[k].values) for k in a.posterior)


class _KillOnce:
    """A pool wrapper that kills worker 0 after its first completed chunk."""

    def __init__(self, pool):
        self._pool, self._done = pool, False
        self.size = pool.size

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def result(self, fut):
        out = self._pool.result(fut)
        if not self._done and fut.worker_index == 0 and fut.tag != "__ping__":
            self._done = True
            self._pool.kill(0)
        return out


def test_killed_actor_changes_nothing(reference, monkeypatch):
    from raybayes.mcmc import sampler

    real = sampler._ChainScheduler.__init__
    seen = {}

    def init(self, pool, **kw):
        seen["pool"] = pool = _KillOnce(pool)
        real(self, pool, **kw)

    monkeypatch.setattr(sampler._ChainScheduler, "__init__", init)
    backend = RayBackend(num_cpus=2)
    with backend:
        got = raybayes.sample(eight_schools, Y, SIGMA, backend=backend, num_workers=2, **KW)
    assert seen["pool"]._done
    assert got.attrs["worker_restarts"] >= 1  # the run saw the loss and replaced it
    assert reference.attrs["worker_restarts"] == 0
    assert _same(reference, got)
    assert got.posterior.sizes["draw"] == KW["num_samples"]


@pytest.mark.slow  # a two-node cluster, two cold workers: 45 s to 4 min on 2 busy cores
def test_lost_node_changes_nothing(reference, monkeypatch):
    """A node lost mid-run: its worker's chains resume elsewhere, draws unchanged."""
    pytest.importorskip("psutil")
    from ray.cluster_utils import Cluster

    from raybayes.mcmc import sampler

    # One 1-CPU worker actor per 1-CPU node: the removed node hosts one of them.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    lost_actors, lost_calls = [], []

    class LoseNode(_KillOnce):
        def result(self, fut):
            try:
                out = self._pool.result(fut)
            except WorkerLostError:
                lost_calls.append((fut.worker_index, fut.tag))
                raise
            if not lost_actors and isinstance(out, raybayes.mcmc.ChunkResult):
                lost_actors.append(lose_node(cluster, node))
            return out

    real = sampler._ChainScheduler.__init__
    monkeypatch.setattr(sampler._ChainScheduler, "__init__",
                        lambda self, pool, **kw: real(self, LoseNode(pool), **kw))
    try:
        with RayBackend(address=cluster.address) as backend:
            got = raybayes.sample(eight_schools, Y, SIGMA, backend=backend,
                                  num_workers=2, **KW)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(lost_actors) == 1  # the node was removed once, after a chunk
    assert len(lost_actors[0]) == 1  # it hosted one of the two workers
    # ... which still had work: a chain's call to it failed, and only to it.
    assert len({w for w, _ in lost_calls}) == 1
    assert [tag for _, tag in lost_calls if tag != "__ping__"]
    # One replacement: it cannot be placed (the head's CPU is taken), so the
    # surviving worker runs every chain to the end.
    assert got.attrs["worker_restarts"] == 1
    assert _same(reference, got)
    assert got.posterior.sizes["draw"] == KW["num_samples"]


def test_killed_driver_resumes(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "run.py"
    # The driver SIGKILLs itself right after its third sampling chunk is on
    # disk: a real abrupt death at a known point, with no timing race.
    script.write_text(
        MODEL_SRC
        + textwrap.dedent(
            f"""
            import os, signal, numpy as np, raybayes
            from raybayes.mcmc.store import DrawStore
            real_write = DrawStore.write_chunk
            written = []
            def write_then_die(self, *a, **k):
                real_write(self, *a, **k)
                written.append(1)
                if len(written) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
            DrawStore.write_chunk = write_then_die
            y = np.array({Y.tolist()}); s = np.array({SIGMA.tolist()})
            raybayes.sample(eight_schools, y, s, backend="local",
                            checkpoint_dir={str(ckpt)!r}, **{KW!r})
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    partial = load_draws(ckpt)
    assert partial is not None and partial.posterior.sizes["draw"] < KW["num_samples"]
    # The same call again resumes and ends with the uninterrupted draws.
    got = raybayes.sample(eight_schools, Y, SIGMA, backend="local", checkpoint_dir=ckpt, **KW)
    assert _same(reference, got)


class _PlantedPickle:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(folder, marker):
    import pickle

    (folder / "chain-000").mkdir(parents=True, exist_ok=True)
    with open(folder / "chain-000" / "state.pkl", "wb") as f:
        pickle.dump({"state": _PlantedPickle(marker), "num_chunks": 1}, f)


SMALL = dict(num_chains=1, num_warmup=20, num_samples=20, chunk_size=10, seed=0,
             progress_bar=False)


def test_old_pickle_checkpoint_is_refused_not_loaded(tmp_path):
    """Probe 2: a crafted state.pkl ran code when load_draws(folder) was called."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    raybayes.sample(eight_schools, Y, SIGMA, backend="local", checkpoint_dir=ckpt, **SMALL)
    (ckpt / "chain-000" / "state.npz").unlink()  # a folder of the old format
    _plant_pickle(ckpt, marker)
    with pytest.raises(raybayes.ConfigurationError, match="old pickle format") as info:
        load_draws(ckpt)
    assert "state.pkl" in str(info.value)
    with pytest.raises(raybayes.ConfigurationError, match="old pickle format"):
        raybayes.sample(eight_schools, Y, SIGMA, backend="local", checkpoint_dir=ckpt,
                        **SMALL)
    assert not marker.exists()


def test_planted_pickle_next_to_a_checkpoint_is_ignored(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    first = raybayes.sample(eight_schools, Y, SIGMA, backend="local", checkpoint_dir=ckpt,
                            **SMALL)
    _plant_pickle(ckpt, marker)
    assert _same(first, load_draws(ckpt))
    again = raybayes.sample(eight_schools, Y, SIGMA, backend="local", checkpoint_dir=ckpt,
                            **SMALL)
    assert _same(first, again)
    assert not marker.exists()
    assert not list(ckpt.rglob("*.pkl"))[1:]  # only the planted file; nothing pickled


def _atomic_path_respects_umask():
    import os
    import tempfile

    from raybayes.io import atomic_path

    old = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory() as d:
            with atomic_path(os.path.join(d, "f")) as tmp:
                tmp.write_text("x")
            return os.stat(os.path.join(d, "f")).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.mark.xfail(not _atomic_path_respects_umask(), strict=True,
                   reason="raybayes.io.atomic_path itself ignores the umask (issue 21, 8)")
def test_checkpoint_files_respect_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        raybayes.sample(eight_schools, Y, SIGMA, backend="local",
                        checkpoint_dir=tmp_path / "ckpt", **SMALL)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "state.npz", "draws-000000.parquet"}
    assert not [p for p in files if p.name.startswith(".")]
    # Group and others may read: 0644 under umask 022 (was 0600 through mkstemp).
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
