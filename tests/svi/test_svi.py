"""Distributed SVI: exact optimum on a conjugate model, unbiased minibatch gradients,
shard-count invariance, SSP, checkpoints and bad input."""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer.autoguide import AutoDelta, AutoNormal

import raybayes
from conjugate_normal import PARTITION, hierarchical_normal_model, posterior, simulate
from raybayes.backends import Backend
from raybayes.errors import ConfigurationError
from raybayes.svi import GlobalGuide
from raybayes.svi.fit import SVIObjective

S0, TAU, SIGMA = 3.0, 0.8, 1.0
J = 48  # groups


# Every conditional is Gaussian: the optimal mean-field q is known exactly.
hierarchical_normal = hierarchical_normal_model(S0, TAU, SIGMA)



@pytest.fixture(scope="module")
def conjugate():
    """Data, and the optimal mean-field q: exact means, variances 1 / diag(precision).

    For a Gaussian target N(m, Lambda^-1), the mean-field Gaussian that maximises
    the ELBO has mean m and variances 1 / Lambda_ii (Bishop, PRML, section 10.1.2).
    """
    kwargs = simulate(J, (3, 12), 1.5, TAU, SIGMA, shuffle=True)
    mean, prec, _ = posterior(kwargs, S0, TAU, SIGMA)
    mf_sd = 1.0 / np.sqrt(np.diag(prec))
    return kwargs, mean, mf_sd


def _cosine(lr, steps):
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.02))


STEPS = 3000
# Short runs of two shards, 8 groups of each per step.
SHORT = dict(num_shards=2, partition=PARTITION, subsample_size=8, tol=None,
             progress_bar=False, learning_rate=0.05, backend="local")
FIT = dict(num_steps=STEPS, tol=None, progress_bar=False, num_samples=200)
B = 6  # of about 24 groups per shard


@pytest.fixture(scope="module")
def minibatch_fit(conjugate):
    # Each group is in a subsample in about B / 24 of the steps; its own schedule
    # runs on its own count of updates.
    return raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        num_shards=2,
        backend="local",
        partition=PARTITION,
        subsample_size=B,
        optimizer=_cosine(0.05, STEPS),
        local_optimizer=_cosine(0.05, STEPS * B // 24),
        seed=1,
        **FIT,
    )


def test_minibatch_svi_reaches_the_optimal_mean_field_q(conjugate, minibatch_fit):
    _, mean, mf_sd = conjugate
    res = minibatch_fit
    loc = np.concatenate([res.params["loc"], res.local_params["loc"][:, 0]])
    scale = np.concatenate([res.params["scale"], res.local_params["scale"][:, 0]])
    # Tolerances: 0.25 posterior sd for the means and 15% for the sds. With one
    # particle the iterates keep some noise (full-batch runs end within 0.09 sd and
    # 7%); errors in the estimator are far larger: counting the padding rows of
    # the minibatch put the means 2.6 sd off.
    np.testing.assert_array_less(np.abs(loc - mean), 0.25 * mf_sd)
    np.testing.assert_array_less(np.abs(scale / mf_sd - 1.0), 0.15)
    assert res.stop_reason == "max_steps" and res.num_steps == STEPS
    assert res.staleness == {0: 2 * STEPS}
    # The draws in the InferenceData follow q.
    theta = res.idata.posterior["theta"].values.reshape(200, J)
    tol = 4 * mf_sd[1:] / np.sqrt(200) + 0.25 * mf_sd[1:]
    np.testing.assert_array_less(np.abs(theta.mean(0) - mean[1:]), tol)
    assert res.idata.posterior["theta"].dims[-1] == "groups"


def test_minibatch_gradient_is_unbiased(conjugate):
    """E over subsamples of the minibatch gradient = the full-shard gradient.

    At one clock the global draw and every entity's local noise are the same with
    and without subsampling (they are keyed by clock and entity id), so the
    difference is the subsampling error alone; its mean over 400 clocks must be
    within 4 standard errors of 0.
    """
    kwargs = conjugate[0]
    grads = {}
    for B in (None, 5):
        with _configured(kwargs, B) as obj:
            grads[B] = _worker_grads(obj, 0, range(400))
    diff = grads[5] - grads[None]
    se = diff.std(0, ddof=1) / np.sqrt(len(diff))
    assert np.all(np.abs(diff.mean(0)) < 4 * se + 1e-9)
    # And the subsampling error is real (the test would notice a fixed subsample).
    assert np.all(diff.std(0) > 0)


def test_minibatch_updates_each_sampled_group_with_its_exact_gradient(conjugate):
    """One step from the same state: the subsampled groups move exactly as in a
    full-shard step (the same noise, their own unscaled terms), the others not."""
    kwargs = conjugate[0]
    phis, idx = {}, None
    for b in (None, 5):
        with _configured(kwargs, b) as obj:
            old = obj.call(1, "local_params")["loc"]
            trial = obj.call(1, "trial_step", _theta(obj), 7)
            phis[b] = trial["local_loc"], old
            if b is not None:
                idx = trial["subsample"]
    new_full, _ = phis[None]
    new_mb, old = phis[5]
    assert len(idx) == 5
    np.testing.assert_allclose(new_mb[idx], new_full[idx], rtol=1e-12)
    rest = np.setdiff1d(np.arange(len(old)), idx)
    np.testing.assert_array_equal(new_mb[rest], old[rest])


def _configured(kwargs, subsample_size):
    """Two in-process shard workers, configured for SVI (float64)."""
    obj = SVIObjective(hierarchical_normal, kwargs, partition=PARTITION,
                        num_shards=2, backend="local", x64=True)
    cfg = dict(family="normal", rank=None, init_scale=0.5,
               subsample_size=subsample_size, num_particles=1, seed=0,
               local_optimizer=optax.adam(0.1), checkpoint_dir=None, init_params={})
    obj.call_all("configure_svi", cfg)
    return obj


def _theta(obj):
    """Global variational parameters with every mean at 0.3 (float64)."""
    init = GlobalGuide(obj.num_global, "normal", None, 0.5).init(
        np.full(obj.num_global, 0.3)
    )
    return {k: np.asarray(v, np.float64) for k, v in init.items()}


def _worker_grads(obj, shard, clocks):
    """Global gradients of one shard's steps at ``clocks`` from the same state."""
    theta = _theta(obj)
    rows = []
    for c in clocks:
        g = obj.call(shard, "trial_step", theta, c)["grad_theta"]
        rows.append(np.concatenate([np.ravel(np.asarray(v)) for v in g.values()]))
    return np.array(rows)


def test_full_batch_fit_does_not_depend_on_the_number_of_shards(conjugate):
    kwargs = conjugate[0]
    fits = [
        raybayes.fit_svi(
            hierarchical_normal,
            model_kwargs=kwargs,
            num_shards=s,
            backend="local",
            partition=PARTITION,
            num_steps=150,
            tol=None,
            progress_bar=False,
            num_samples=10,
            learning_rate=0.05,
            x64=True,
        )
        for s in (1, 2)
    ]
    # Equal up to the order of the float64 sums over shards.
    np.testing.assert_allclose(fits[0].params["loc"], fits[1].params["loc"], rtol=1e-7)
    np.testing.assert_allclose(
        fits[0].local_params["loc"], fits[1].local_params["loc"], rtol=1e-7, atol=1e-10
    )
    np.testing.assert_allclose(fits[0].losses, fits[1].losses, rtol=1e-7)


def test_checkpoint_resume_equals_an_uninterrupted_run(conjugate, tmp_path):
    kwargs = conjugate[0]
    common = dict(
        num_shards=2,
        backend="local",
        partition=PARTITION,
        subsample_size=8,
        tol=None,
        progress_bar=False,
        num_samples=10,
        learning_rate=0.05,
        seed=3,
        checkpoint_every=50,
    )
    whole = raybayes.fit_svi(
        hierarchical_normal, model_kwargs=kwargs, num_steps=200, **common
    )
    first = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=kwargs,
        num_steps=100,
        checkpoint_dir=tmp_path,
        **common,
    )
    assert first.num_steps == 100 and (tmp_path / "global.npz").exists()
    assert sorted(p.name for p in tmp_path.glob("shard-*.npz")) == [
        "shard-0000.npz",
        "shard-0001.npz",
    ]
    resumed = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=kwargs,
        num_steps=200,
        checkpoint_dir=tmp_path,
        **common,
    )
    assert resumed.num_steps == 200 and len(resumed.losses) == 200
    np.testing.assert_array_equal(resumed.params["loc"], whole.params["loc"])
    np.testing.assert_array_equal(
        resumed.local_params["loc"], whole.local_params["loc"]
    )
    np.testing.assert_array_equal(resumed.losses, whole.losses)


def test_convergence_stops_early(conjugate):
    res = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        num_shards=1,
        partition=PARTITION,
        num_steps=5000,
        tol=1e-3,
        window=50,
        learning_rate=0.05,
        progress_bar=False,
        num_samples=10,
    )
    assert res.stop_reason == "converged" and res.num_steps < 5000


def test_callback_sees_draws_and_can_stop(conjugate):
    seen = []

    def cb(info):
        draws = info.sample_posterior(20, var_names=["theta"])
        seen.append((info.step, draws["theta"].shape, info.elapsed_s))
        return info.step >= 60

    res = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        num_shards=2,
        backend="local",
        partition=PARTITION,
        num_steps=1000,
        tol=None,
        callback=cb,
        callback_every=30,
        progress_bar=False,
        num_samples=10,
    )
    assert res.stop_reason == "callback" and res.num_steps == 60
    assert [s[:2] for s in seen] == [(30, (20, J)), (60, (20, J))]
    assert seen[1][2] >= seen[0][2] > 0


def test_lowrank_guide_runs_and_reports_its_factor(conjugate):
    res = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        num_shards=2,
        backend="local",
        partition=PARTITION,
        guide="lowrank",
        num_steps=30,
        tol=None,
        learning_rate=0.05,
        progress_bar=False,
        num_samples=10,
    )
    assert res.family == "lowrank" and res.params["cov_factor"].shape == (1, 1)


def test_max_shard_bytes(conjugate):
    kwargs = conjugate[0]
    total = sum(np.asarray(v).nbytes for v in kwargs.values() if np.ndim(v))
    budget = int(0.6 * total)
    with pytest.raises(ConfigurationError, match="max_shard_bytes"):
        raybayes.fit_svi(
            hierarchical_normal,
            model_kwargs=kwargs,
            num_shards=1,
            partition=PARTITION,
            num_steps=5,
            max_shard_bytes=budget,
            progress_bar=False,
        )
    # Split in two, the same data fit the same budget.
    res = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=kwargs,
        num_shards=2,
        backend="local",
        partition=PARTITION,
        num_steps=5,
        max_shard_bytes=budget,
        tol=None,
        progress_bar=False,
        num_samples=5,
    )
    assert max(res.data_bytes) <= budget
    assert sum(res.data_bytes) >= total


def other_model(y):
    numpyro.sample("m", dist.Normal(0, 1))


def positive_model(y):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Exponential(rate), obs=y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), "learning_rate=0.0"),
        (dict(learning_rate=-1e-3), "learning rate must be"),
        (dict(subsample_size=40), "subsample_size=40 but shard"),
        (dict(guide=AutoNormal(other_model)), "was built for model 'other_model'"),
        (dict(guide=AutoDelta), "not supported by distributed SVI"),
        (dict(init_params={"mu": 0.0, "tau": 1.0}), r"site\(s\) \['tau'\]"),
        (dict(staleness=-1), "staleness=-1"),
    ],
)
def test_bad_input_is_refused_before_any_step(conjugate, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        raybayes.fit_svi(
            hierarchical_normal,
            model_kwargs=conjugate[0],
            num_shards=2,
            backend="local",
            partition=PARTITION,
            num_steps=10,
            progress_bar=False,
            **kwargs,
        )


def test_non_finite_elbo_at_the_start_names_the_site():
    y = np.array([0.5, 1.0, -2.0, 0.3], np.float32)  # Exponential needs y >= 0
    with pytest.raises(
        ConfigurationError, match="site 'y' has a non-finite log density"
    ):
        raybayes.fit_svi(
            positive_model,
            model_kwargs=dict(y=y),
            num_shards=1,
            num_steps=10,
            progress_bar=False,
        )


# ----------------------------------------------------------------------- on Ray
def test_ray_workers_give_the_in_process_fit(conjugate, ray_backend):
    common = dict(SHORT, num_steps=100, num_samples=20, seed=5)
    local = raybayes.fit_svi(hierarchical_normal, model_kwargs=conjugate[0], **common)
    remote = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        **dict(common, backend=ray_backend),
    )
    np.testing.assert_array_equal(local.params["loc"], remote.params["loc"])
    np.testing.assert_array_equal(local.local_params["loc"], remote.local_params["loc"])
    np.testing.assert_array_equal(local.losses, remote.losses)
    np.testing.assert_array_equal(
        local.idata.posterior["theta"].values, remote.idata.posterior["theta"].values
    )


class _PoolKeeper(Backend):
    """A backend (the public interface) that keeps the worker pools it creates,
    so that a test can kill a worker through :meth:`WorkerPool.kill`."""

    def __init__(self, inner):
        self.inner, self.name, self.pools = inner, inner.name, []

    def start(self):
        self.inner.start()
        return self

    def shutdown(self):  # the module's Ray instance is shared
        pass

    def put(self, value):
        return self.inner.put(value)

    def default_num_workers(self):
        return self.inner.default_num_workers()

    def create_pool(self, factory, factory_args=(), *, num_workers, name="worker"):
        pool = self.inner.create_pool(
            factory, factory_args, num_workers=num_workers, name=name
        )
        self.pools.append(pool)
        return pool


def test_a_lost_worker_restarts_from_its_shard_checkpoint(
    conjugate, ray_backend, tmp_path
):
    """Killed right after a checkpoint, the shard reloads exactly the state it had,
    so the fit is the one without the failure."""
    common = dict(SHORT, num_steps=160, num_samples=20, seed=6, checkpoint_every=50)
    del common["backend"]
    keeper = _PoolKeeper(ray_backend)
    killed = []

    def kill_at_100(info):
        if info.step == 100:
            keeper.pools[-1].kill(0)  # the fit's shard pool, worker 0
            killed.append(info.step)

    whole = raybayes.fit_svi(
        hierarchical_normal, model_kwargs=conjugate[0], backend=ray_backend, **common
    )
    hurt = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        backend=keeper,
        callback=kill_at_100,
        callback_every=50,
        checkpoint_dir=tmp_path,
        **common,
    )
    assert killed == [100] and hurt.restarts == 1 and whole.restarts == 0
    np.testing.assert_array_equal(hurt.params["loc"], whole.params["loc"])
    np.testing.assert_array_equal(hurt.local_params["loc"], whole.local_params["loc"])


def test_ssp_runs_ahead_within_its_bound(conjugate, ray_backend):
    """Shard 0 takes twice its time on half of its steps, so shard 1 runs ahead,
    never more than ``staleness`` versions (the convergence under SSP: below)."""
    res = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=conjugate[0],
        **dict(SHORT, backend=ray_backend),
        num_steps=150,
        num_samples=10,
        seed=1,
        staleness=2,
        _worker_slowdown={0: (2.0, 0.5)},
    )
    assert sum(res.staleness.values()) == 2 * 150
    assert max(res.staleness) == 2 and res.staleness.get(1, 0) > 0


@pytest.mark.slow  # the whole schedule; the bound itself is checked above
def test_ssp_runs_ahead_within_its_bound_and_still_converges(conjugate, ray_backend):
    # The whole BSP schedule: with half of it, asynchrony left one run 0.34 sd off.
    # Shard 0 takes twice its time on half of its steps, so shard 1 runs ahead.
    kwargs, mean, mf_sd = conjugate
    res = raybayes.fit_svi(
        hierarchical_normal,
        model_kwargs=kwargs,
        num_shards=2,
        partition=PARTITION,
        subsample_size=B,
        optimizer=_cosine(0.05, STEPS),
        local_optimizer=_cosine(0.05, STEPS * B // 24),
        seed=1,
        staleness=2,
        backend=ray_backend,
        _worker_slowdown={0: (2.0, 0.5)},
        **FIT,
    )
    assert sum(res.staleness.values()) == 2 * STEPS
    assert max(res.staleness) == 2 and res.staleness.get(1, 0) > 0
    loc = np.concatenate([res.params["loc"], res.local_params["loc"][:, 0]])
    np.testing.assert_array_less(np.abs(loc - mean), 0.25 * mf_sd)


@pytest.mark.slow  # the Parquet source itself is tested with MAP (tests/optim)
def test_workers_reading_parquet_fit_as_the_in_memory_data(tmp_path):
    """With ``source=`` each worker reads its own products; the fit is the same."""
    import functools

    import pyarrow as pa
    import pyarrow.dataset as ds

    from raybayes.datasets.elasticity import (
        prepare_elasticity_data,
        simulate_elasticity,
    )
    from raybayes.datasets.parquet import ParquetShards, elasticity_kwargs_from_table
    from raybayes.models.elasticity import elasticity_model
    from raybayes.plan import plan

    C, P, T = 2, 12, 30
    df, _ = simulate_elasticity(num_categories=C, num_products=P, num_weeks=T, seed=2)
    ds.write_dataset(
        pa.Table.from_pandas(df, preserve_index=False),
        tmp_path,
        format="parquet",
        partitioning=ds.partitioning(
            pa.schema([("product", pa.int64())]), flavor="hive"
        ),
    )
    kwargs = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    ).model_kwargs()
    part = next(
        c
        for c in plan(elasticity_model, kwargs, num_shards=2).candidates
        if c.plate == "products"
    ).partition
    common = dict(
        num_shards=2,
        backend="local",
        partition=part,
        num_steps=40,
        tol=None,
        progress_bar=False,
        num_samples=10,
        learning_rate=0.05,
        x64=True,
    )
    memory = raybayes.fit_svi(elasticity_model, model_kwargs=kwargs, **common)
    source = ParquetShards(
        tmp_path,
        functools.partial(elasticity_kwargs_from_table, num_categories=C, num_times=T),
        partition_column="product",
    )
    parquet = raybayes.fit_svi(elasticity_model, source=source, **common)
    assert parquet.data_bytes[0] < sum(memory.data_bytes)
    np.testing.assert_allclose(
        parquet.params["loc"], memory.params["loc"], rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(
        parquet.local_params["loc"], memory.local_params["loc"], rtol=1e-6, atol=1e-9
    )
