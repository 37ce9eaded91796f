"""Data-sharded NUTS: the posterior of the conjugate hierarchical normal model, the
same draws in-process and on Ray, the shard budget, bad input, and a killed shard."""

from __future__ import annotations

import arviz as az
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import raybayes
from conjugate_normal import PARTITION, hierarchical_normal_model, posterior, simulate
from interrupted_runs import interrupted_then_resumed
from raybayes.errors import ConfigurationError

S0, TAU, SIGMA = 2.0, 1.0, 1.0
MODEL = hierarchical_normal_model(S0, TAU, SIGMA)
DATA = simulate(6, (3, 8), 0.5, TAU, SIGMA, seed=4)
# One setting for every run, so that the compiled chunk is shared between them.
RUN = dict(
    num_chains=2,
    num_warmup=150,
    num_samples=250,
    chunk_size=100,
    progress_bar=False,
    seed=11,
)


def _run(num_shards, backend="local", **kwargs):
    return raybayes.sample(
        MODEL,
        num_shards=num_shards,
        backend=backend,
        **{"model_kwargs": DATA, **RUN, **kwargs},
    )


def _read(num_shards, source, backend="local", **kwargs):
    """:func:`_run` on the Parquet ``source`` instead of the in-memory data."""
    return _run(
        num_shards,
        backend,
        model_kwargs=None,
        partition=PARTITION,
        source=source,
        **kwargs,
    )


def _draws(idata):
    post = idata.posterior
    return np.concatenate(
        [post["mu"].values[..., None], post["theta"].values], axis=-1
    )  # (chains, draws, 1 + J)


def _mean_and_mcse(idata):
    x = _draws(idata)
    mcse = np.array(
        [float(az.mcse(x[..., j], method="mean")) for j in range(x.shape[-1])]
    )
    return x.mean(axis=(0, 1)), mcse


@pytest.fixture(scope="module")
def two_shards():
    return _run(2)


def test_shard_sum_equals_the_full_potential():
    """The invariant the sampler rests on: summed over shards, the batched
    potential and gradient equal those of one shard holding all the data."""
    from raybayes.mcmc.sharded import NUTSShardObjective
    from raybayes.plan import resolve_split

    rng = np.random.default_rng(0)
    _, kwargs, part, _ = resolve_split(MODEL, (), DATA, 2, None)
    values = []
    xs = rng.standard_normal((4, 1 + DATA["num_groups"]))  # (chains, mu + theta)
    for s in (1, 2):
        with NUTSShardObjective(MODEL, kwargs, partition=part, num_shards=s) as f:
            assert f.size == xs.shape[1]
            values.append(f.batch_value_and_grad(xs))
            assert f.num_round_trips == 1
    np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-10)
    np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-9, atol=1e-12)
    # against NumPyro's own potential of the full model
    import jax
    from numpyro.infer.util import initialize_model

    info = initialize_model(jax.random.PRNGKey(0), MODEL, model_kwargs=DATA)
    pe = info.potential_fn
    with jax.enable_x64():
        for x, v in zip(xs, values[0][0], strict=True):
            params = {"mu": x[0], "theta": x[1:]}
            assert abs(float(pe(params)) - v) < 1e-4 * max(1.0, abs(v))


@pytest.mark.slow
def test_sharded_posterior_matches_the_exact_one_and_one_shard(two_shards):
    exact_mean, prec, _ = posterior(DATA, S0, TAU, SIGMA)
    exact_sd = np.sqrt(np.diag(np.linalg.inv(prec)))
    assert two_shards.attrs["num_shards"] == 2
    assert two_shards.attrs["split_plate"] == "groups"
    mean2, mcse2 = _mean_and_mcse(two_shards)
    # 0.999 normal quantile: 3.29
    assert np.all(np.abs(mean2 - exact_mean) / mcse2 < 3.3), (mean2, exact_mean, mcse2)
    sd2 = _draws(two_shards).std(axis=(0, 1))
    assert np.all(np.abs(sd2 / exact_sd - 1) < 0.2), (sd2, exact_sd)
    one = _run(1)
    mean1, mcse1 = _mean_and_mcse(one)
    z = np.abs(mean1 - mean2) / np.sqrt(mcse1**2 + mcse2**2)
    assert np.all(z < 3.3), z
    # a different split changes the float sums, so the chains differ
    assert not np.array_equal(_draws(one), _draws(two_shards))


@pytest.mark.slow
def test_same_draws_in_process_and_on_ray(two_shards, ray_backend):
    got = _run(2, backend=ray_backend)
    assert got.attrs["backend"] == "ray"
    for name in two_shards.posterior:
        np.testing.assert_array_equal(
            got.posterior[name].values, two_shards.posterior[name].values
        )


# -- low-rank plus diagonal mass matrix with shards ----------------------------------

# Few observations per group, noisy ones: mu and the thetas are correlated (scaled
# posterior covariance with eigenvalues 0.31 and 5.5), so the adaptation keeps
# eigenvectors.
LR_SIGMA = 3.0
LR_MODEL = hierarchical_normal_model(S0, TAU, LR_SIGMA)
LR_DATA = simulate(6, (1, 3), 0.5, TAU, LR_SIGMA, seed=4)


def _low_rank_run(num_shards=2, backend="local", **kwargs):
    shards = {} if num_shards is None else {"num_shards": num_shards}
    return raybayes.sample(
        LR_MODEL,
        model_kwargs=LR_DATA,
        backend=backend,
        low_rank_mass=True,
        **shards,
        **RUN,
        **kwargs,
    )


@pytest.fixture(scope="module")
def low_rank_two_shards():
    return _low_rank_run()


@pytest.mark.slow
def test_low_rank_mass_with_shards_gives_the_exact_and_the_unsharded_posterior(
    low_rank_two_shards,
):
    idata = low_rank_two_shards
    assert idata.attrs["low_rank_mass"] == 16
    assert idata.attrs["low_rank_mass_rank"] >= 1, idata.attrs
    exact_mean, prec, _ = posterior(LR_DATA, S0, TAU, LR_SIGMA)
    exact_sd = np.sqrt(np.diag(np.linalg.inv(prec)))
    mean, mcse = _mean_and_mcse(idata)
    assert np.all(np.abs(mean - exact_mean) / mcse < 3.3), (mean, exact_mean, mcse)
    sd = _draws(idata).std(axis=(0, 1))
    assert np.all(np.abs(sd / exact_sd - 1) < 0.2), (sd, exact_sd)
    # chain-parallel NUTS with the same adaptation, all data in one process
    unsharded = _low_rank_run(num_shards=None)
    assert unsharded.attrs["low_rank_mass_rank"] >= 1
    mean1, mcse1 = _mean_and_mcse(unsharded)
    z = np.abs(mean1 - mean) / np.sqrt(mcse1**2 + mcse**2)
    assert np.all(z < 3.3), z


@pytest.mark.slow
def test_low_rank_mass_with_shards_same_draws_in_process_and_on_ray(
    low_rank_two_shards, ray_backend
):
    got = _low_rank_run(backend=ray_backend)
    assert got.attrs["backend"] == "ray"
    assert got.attrs["low_rank_mass_rank"] == low_rank_two_shards.attrs[
        "low_rank_mass_rank"
    ]
    for name in low_rank_two_shards.posterior:
        np.testing.assert_array_equal(
            got.posterior[name].values, low_rank_two_shards.posterior[name].values
        )


@pytest.mark.slow
@pytest.mark.parametrize("where", ["warmup", "sampling"])
def test_low_rank_mass_with_shards_resumes_to_the_same_draws(
    low_rank_two_shards, where, tmp_path, monkeypatch
):
    # warmup: stopped in the second phase, its kept points and the first estimate
    # on disk; sampling: stopped after a chain's first sampling chunk
    if where == "warmup":

        def stop_after(rec):
            return rec["phase"] == 1 and len(rec["points"]) > 0

    else:

        def stop_after(rec):
            return rec["num_chunks"] == 1

    rec, got = interrupted_then_resumed(
        monkeypatch, lambda: _low_rank_run(checkpoint_dir=tmp_path), stop_after
    )
    assert rec["masses"][1] is not None
    assert (rec["masses"][2] is None) == (where == "warmup")
    for name in low_rank_two_shards.posterior:
        np.testing.assert_array_equal(
            got.posterior[name].values, low_rank_two_shards.posterior[name].values
        )


BUDGET = sum(np.asarray(v).nbytes for v in DATA.values() if np.ndim(v)) // 2


def test_shard_budget_refuses_one_shard():
    # the data are twice the budget: refused before any worker starts
    with pytest.raises(ConfigurationError, match=r"use at least num_shards=(3|4)\b"):
        _run(1, max_shard_bytes=BUDGET)


@pytest.mark.slow
def test_shard_budget_samples_on_four_shards():
    budget = BUDGET
    idata = _run(4, max_shard_bytes=budget)
    assert idata.posterior["theta"].shape == (2, RUN["num_samples"], 6)
    assert idata.attrs["num_shards"] == 4


def _no_plate(y):
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    numpyro.sample("y", dist.Normal(mu, 1), obs=y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_shards=10_000), "more than the entries"),
        (dict(num_shards=0), "num_shards=0"),
        (dict(num_shards=2, num_workers=3), "one worker per shard"),
        (dict(num_shards=2, _scheduling="static"), "_scheduling"),
        (dict(max_shard_bytes=100), "pass num_shards"),
        (dict(num_shards=2, plan="groups"), "raybayes.Plan"),
    ],
)
def test_bad_input_fails_before_compute(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        raybayes.sample(
            MODEL, model_kwargs=DATA, backend="local", progress_bar=False, **kwargs
        )


def test_no_plate_to_split():
    with pytest.raises(ConfigurationError, match="no plate that can be split"):
        raybayes.sample(
            _no_plate, np.zeros(5), num_shards=2, backend="local", progress_bar=False
        )


def test_plan_gives_the_split():
    p = raybayes.plan(MODEL, DATA, num_shards=3)
    with pytest.raises(ConfigurationError, match="made for 3 shards"):
        _run(2, plan=p)


@pytest.mark.slow
def test_killed_shard_worker_changes_nothing(two_shards, ray_backend, monkeypatch):
    from raybayes.mcmc import sharded

    real = sharded.NUTSShardObjective.batch_value_and_grad
    state = {"calls": 0, "killed": False}

    def flaky(self, xs):
        state["calls"] += 1
        if not state["killed"] and state["calls"] == 400:  # mid-chunk, in warmup
            state["killed"] = True
            self.pool.kill(1)
        return real(self, xs)

    monkeypatch.setattr(sharded.NUTSShardObjective, "batch_value_and_grad", flaky)
    got = _run(2, backend=ray_backend)
    assert state["killed"]
    assert got.attrs["worker_restarts"] >= 1
    for name in two_shards.posterior:
        np.testing.assert_array_equal(
            got.posterior[name].values, two_shards.posterior[name].values
        )


def _stopped_then_resumed(monkeypatch, run):
    """``run()`` stopped once the third chunk of draws is on disk (one chain's
    second sampling chunk), then ``run()`` again: the resumed result."""
    from raybayes.mcmc.store import DrawStore

    real = DrawStore.write_chunk
    written = []

    def write_then_stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        written.append(args)
        if len(written) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(DrawStore, "write_chunk", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(DrawStore, "write_chunk", real)
    return run()


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_draws(two_shards, tmp_path, monkeypatch):
    got = _stopped_then_resumed(
        monkeypatch, lambda: _run(2, checkpoint_dir=tmp_path)
    )
    for name in two_shards.posterior:
        np.testing.assert_array_equal(
            got.posterior[name].values, two_shards.posterior[name].values
        )
    with pytest.raises(ConfigurationError, match="num_shards"):
        _run(1, checkpoint_dir=tmp_path)  # another split is refused on resume


@pytest.mark.slow
def test_cross_chain_adaptation_and_targets(two_shards):
    exact_mean, _, _ = posterior(DATA, S0, TAU, SIGMA)
    idata = _run(2, cross_chain_adaptation=True, target_ess=100, target_rhat=1.05)
    assert idata.attrs["cross_chain_adaptation"] == 1
    assert idata.attrs["targets_met"] == 1, idata.attrs
    mean, mcse = _mean_and_mcse(idata)
    assert np.all(np.abs(mean - exact_mean) / mcse < 3.3), (mean, exact_mean, mcse)


# -- init_params ---------------------------------------------------------------------


def test_init_params_set_the_initial_positions():
    """Given sites start where ``init_params`` says (broadcast or one value per
    chain; local sites over the whole plate, each shard taking its entries); the
    others are drawn exactly as without ``init_params``."""
    from raybayes.mcmc.sharded import NUTSShardObjective, ShardedChainPool
    from raybayes.plan import resolve_split

    _, kwargs, part, _ = resolve_split(MODEL, (), DATA, 2, PARTITION)
    theta = np.linspace(-1.0, 1.0, DATA["num_groups"]).astype(np.float32)
    mu = np.array([0.25, -0.5])  # one per chain
    with NUTSShardObjective(MODEL, kwargs, partition=part, num_shards=2) as f:

        def start(init_params):
            pool = ShardedChainPool(
                f,
                num_chains=2,
                num_warmup=10,
                chunk_size=10,
                kernel_kwargs={},
                seed=3,
                init_params=init_params,
            )
            try:
                return pool._initial_positions()[1]
            finally:
                pool.shutdown()

        drawn = start(None)
        both = start({"mu": mu, "theta": theta})
        np.testing.assert_array_equal(both[:, 0], mu)
        np.testing.assert_array_equal(both[:, 1:], np.stack([theta, theta]))
        only_theta = start({"theta": np.stack([theta, -theta])})
        np.testing.assert_array_equal(only_theta[:, 0], drawn[:, 0])
        np.testing.assert_array_equal(only_theta[1, 1:], -theta)
        for bad, message in [
            ({"nu": 0.0}, "not latent sites"),
            ({"theta": np.zeros(5)}, r"takes \(6,\).*\(2, 6\)"),
            ({"mu": np.nan}, "NaN or infinite"),
        ]:
            with pytest.raises(ConfigurationError, match=message):
                start(bad)


# -- Parquet partitions read by the shard workers ------------------------------------


def _groups_from_table(table):
    ids, group_idx = np.unique(table.column("group").to_numpy(), return_inverse=True)
    kwargs = dict(
        group_idx=group_idx.astype(np.int32),
        num_groups=len(ids),
        y=table.column("y").to_numpy().astype(np.float32),
    )
    return kwargs, ids


@pytest.fixture(scope="module")
def parquet_groups(tmp_path_factory):
    """One Parquet file per group of ``DATA``, and a record of the groups each
    ``read_shard`` call read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybayes.datasets.parquet import ParquetShards

    root = tmp_path_factory.mktemp("groups")
    files = []
    for j in range(DATA["num_groups"]):
        rows = DATA["group_idx"] == j
        files.append(root / f"group-{j}.parquet")
        pq.write_table(
            pa.table({"group": np.full(rows.sum(), j), "y": DATA["y"][rows]}),
            files[-1],
        )
    reads = []

    def to_model_kwargs(table):
        kwargs, ids = _groups_from_table(table)
        reads.append(ids.tolist())
        return kwargs, ids

    return ParquetShards(files, to_model_kwargs), reads


SMALL = dict(num_chains=2, num_warmup=60, num_samples=40, chunk_size=50)


def test_parquet_source_gives_the_draws_of_the_same_rows_in_memory(parquet_groups):
    source, reads = parquet_groups
    reads.clear()
    init = {"mu": np.array([0.1, -0.1])}
    read = _read(2, source, init_params=init, **SMALL)
    # each shard's worker read its own three groups, once; the driver none
    assert reads == [[0, 1, 2], [3, 4, 5]]
    held = _run(2, partition=PARTITION, init_params=init, **SMALL)
    for name in ("mu", "theta"):
        a, b = read.posterior[name].values, held.posterior[name].values
        assert a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert read.attrs["split_plate"] == "groups"
    assert "observed_data" not in read.groups()


@pytest.mark.slow
def test_parquet_source_same_draws_on_ray(parquet_groups, ray_backend):
    source, _ = parquet_groups
    local = _read(2, source, **SMALL)
    remote = _read(2, source, backend=ray_backend, **SMALL)
    assert remote.attrs["backend"] == "ray"
    for name in ("mu", "theta"):
        np.testing.assert_array_equal(
            remote.posterior[name].values, local.posterior[name].values
        )


def test_parquet_source_bad_input_fails_before_compute(parquet_groups):
    source, reads = parquet_groups
    reads.clear()
    cases = [
        (dict(num_shards=2, source=source), "needs partition="),
        (
            dict(num_shards=2, partition=PARTITION, source=source, model_kwargs=DATA),
            "pass model_kwargs=None",
        ),
        (dict(num_shards=7, partition=PARTITION, source=source), "only 6 partitions"),
        (dict(partition=PARTITION, source=source), "apply to data-sharded NUTS"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            raybayes.sample(MODEL, backend="local", progress_bar=False, **kwargs)
    assert reads == []  # refused from the partitions' metadata alone
    # the budget is known once the workers have read their rows: before compute
    with pytest.raises(ConfigurationError, match=r"use more shards \(at least"):
        _read(2, source, max_shard_bytes=64)


def test_parquet_shards_balance_rows_from_metadata(tmp_path):
    """Partitions go to shards in contiguous blocks of about equal rows (not equal
    partition counts), read from the footers; the same metadata give the same
    split, for a list of files and for a hive directory alike."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybayes.datasets.parquet import ParquetShards

    rows = [10, 10, 10, 90, 80, 5]
    files = []
    for j, n in enumerate(rows):
        files.append(tmp_path / f"part-{j}.parquet")
        pq.write_table(pa.table({"group": np.full(n, j), "y": np.zeros(n)}), files[-1])
        hive = tmp_path / "hive" / f"group={j}"
        hive.mkdir(parents=True)
        pq.write_table(pa.table({"y": np.zeros(n)}), hive / "part-0.parquet")
    by_files = ParquetShards(files, _groups_from_table)
    by_key = ParquetShards(tmp_path / "hive", None, partition_column="group")
    np.testing.assert_array_equal(by_files.partition_rows(), rows)
    # array_split would give [30, 175]: 1.7x the mean on one shard
    assert by_files.shard_blocks(2) == [(0, 4), (4, 6)]
    assert by_files.shard_rows(2).tolist() == [120, 85]
    assert by_key.shard_blocks(2) == by_files.shard_blocks(2)
    for num_shards in (1, 3, 6):
        blocks = by_files.shard_blocks(num_shards)
        assert blocks == ParquetShards(files, None).shard_blocks(num_shards)
        assert [a for a, _ in blocks[1:]] == [b for _, b in blocks[:-1]]  # contiguous
        assert all(b > a for a, b in blocks)  # none empty
    assert by_files.shard_rows(3).tolist() == [30, 90, 85]  # 90: one partition
    with pytest.raises(ConfigurationError, match="only 6 partitions"):
        by_files.shard_blocks(7)


@pytest.mark.slow
def test_parquet_source_interrupted_run_resumes_to_the_same_draws(
    parquet_groups, tmp_path, monkeypatch
):
    source, _ = parquet_groups
    run = dict(SMALL, num_samples=100)
    whole = _read(2, source, **run)
    got = _stopped_then_resumed(
        monkeypatch, lambda: _read(2, source, checkpoint_dir=tmp_path, **run)
    )
    assert got.attrs["shard_rows"] == source.shard_rows(2).tolist()
    for name in ("mu", "theta"):
        np.testing.assert_array_equal(
            got.posterior[name].values, whole.posterior[name].values
        )


# -- centring weights split with the products ----------------------------------------


def _centred_elasticity_plan():
    from raybayes.datasets.elasticity import (
        prepare_elasticity_data,
        simulate_elasticity,
    )
    from raybayes.models.elasticity import elasticity_model

    df, _ = simulate_elasticity(3, 12, 20, seed=0)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    kwargs = data.model_kwargs(centered="auto")
    return kwargs, raybayes.plan(elasticity_model, kwargs, num_shards=3)


def test_centred_elasticity_model_splits_its_weights_with_the_products():
    """``centered="auto"`` gives per-product weights inside the ``centered``
    mapping: the plan splits them with the products and each shard gets its own
    rows (a copy; the caller's mapping is untouched). Splitting the weeks is
    refused: each product's level uses the mean of all the week effects."""
    from raybayes.core.partition import assign_entities, shard_model_kwargs

    kwargs, p = _centred_elasticity_plan()
    part = p.partition
    assert part.plate == "products"
    assert {"centered.beta", "centered.delta"} <= set(part.entity_args)
    times = next(c for c in p.candidates if c.plate == "times")
    assert not times.feasible and "as a whole" in times.reason
    spec = assign_entities(np.bincount(kwargs["product_idx"]), 3)[1]
    shard = shard_model_kwargs(kwargs, part, spec)
    lo, hi = spec.entity_start, spec.entity_stop
    w = kwargs["centered"]
    np.testing.assert_array_equal(shard["centered"]["beta"], w["beta"][lo:hi])
    np.testing.assert_array_equal(shard["centered"]["delta"], w["delta"][lo:hi])
    assert shard["centered"]["gamma"] is w["gamma"]  # the weeks are not split
    assert w["beta"].shape == (12,)  # the caller's weights are untouched


@pytest.mark.slow
def test_centred_elasticity_shard_potentials_add_up_to_the_full_one():
    """And the constrained draws are those of one shard, site by site: with 4
    shards of 3 products each, the 3 category elasticities (a deterministic site
    of the same length as a shard's products) stay global."""
    from raybayes.distributed.objective import constrained_values
    from raybayes.mcmc.sharded import NUTSShardObjective
    from raybayes.models.elasticity import elasticity_model

    _, p = _centred_elasticity_plan()
    part = p.partition
    xs = np.zeros((2, 0))
    values, sites = [], []
    for num_shards in (1, 4):
        with NUTSShardObjective(
            elasticity_model, p.model_kwargs, partition=part, num_shards=num_shards
        ) as f:
            if not xs.size:
                xs = 0.3 * np.random.default_rng(0).standard_normal((2, f.size))
            values.append(f.batch_value_and_grad(xs))
            sites.append(constrained_values(f, xs)[0])
    np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-10)
    np.testing.assert_allclose(values[0][1], values[1][1], rtol=1e-9, atol=1e-9)
    assert sites[1]["beta_category"].shape == (2, 3)
    assert set(sites[0]) == set(sites[1])
    for name, value in sites[0].items():
        np.testing.assert_allclose(sites[1][name], value, rtol=1e-5, atol=1e-6)
