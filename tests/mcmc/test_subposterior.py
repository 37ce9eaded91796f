"""Embarrassingly parallel MCMC (``raybayes.sample_subposteriors``).

The conjugate case: Bayesian linear regression with known noise, ``beta ~ N(0, s0^2
I)``, ``y ~ N(X beta, sigma^2)``. The posterior and every shard's subposterior
``p(beta)^(1/M) p(y_m | beta)`` are Gaussian and known in closed form, so consensus
Monte Carlo is exact and the draws must match them within Monte Carlo error.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats

import raybayes
from raybayes import ConfigurationError, Partition, RaybayesWarning

S0, SIGMA, N, D = 2.0, 1.0, 240, 2
Z = stats.norm.ppf(1 - 0.001 / 2)  # two-sided 0.999 quantile
# Each shard runs until its R-hat is at most 1.01 (checked every 300 draws).
RUN = dict(
    num_chains=2,
    num_warmup=300,
    num_samples=600,
    chunk_size=300,
    target_rhat=1.01,
    max_samples=2400,
    progress_bar=False,
    seed=3,
)
SLOW = pytest.mark.slow  # about 20-60 s each on a loaded 2-core machine


def regression(X, y=None):
    beta = numpyro.sample("beta", dist.Normal(0.0, S0).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ beta, SIGMA), obs=y)


def banana(y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(a + b**2, 0.5), obs=y)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D)).astype(np.float32)
    X[:, 1] += 0.6 * X[:, 0]  # correlated coefficients
    y = (X @ np.array([0.7, -1.2]) + SIGMA * rng.normal(size=N)).astype(np.float32)
    return X, y


X, Y = _data()


def analytic(X, y, prior_scale=1.0):
    """Mean and covariance of ``N(0, S0^2 I)^prior_scale * N(y | X beta, SIGMA^2)``."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    prec = prior_scale * np.eye(X.shape[1]) / S0**2 + X.T @ X / SIGMA**2
    cov = np.linalg.inv(prec)
    return cov @ X.T @ y / SIGMA**2, cov


def assert_gaussian_matches(draws, mean, cov):
    """Draws ``(chain, draw, D)`` match N(mean, cov) within Monte Carlo error."""
    flat = draws.reshape(-1, draws.shape[-1])
    ess = np.array([az.ess(np.ascontiguousarray(draws[..., j])) for j in range(D)])
    sd = np.sqrt(np.diag(cov))
    z = (flat.mean(0) - mean) / (sd / np.sqrt(ess))
    assert np.all(np.abs(z) < Z), (flat.mean(0), mean, z, ess)
    # Whitened sample covariance ~ I; entries have sd about sqrt(2/ESS).
    L = np.linalg.cholesky(cov)
    w = np.linalg.solve(L, (flat - flat.mean(0)).T)
    white = np.cov(w)
    tol = Z * np.sqrt(2.0 / ess.min())
    assert np.all(np.abs(white - np.eye(D)) < tol), (white, tol)


class _Runs(dict):
    """In-process runs for M shards, computed on first use."""

    def __missing__(self, m):
        if m == 1:
            with pytest.warns(RaybayesWarning, match="num_shards=1"):
                self[m] = raybayes.sample_subposteriors(
                    regression,
                    model_kwargs={"X": X, "y": Y},
                    num_shards=1,
                    backend="local",
                    **RUN,
                )
        else:
            self[m] = raybayes.sample_subposteriors(
                regression,
                model_kwargs={"X": X, "y": Y},
                num_shards=m,
                backend="local",
                **RUN,
            )
        return self[m]


@pytest.fixture(scope="module")
def runs():
    return _Runs()


@pytest.mark.parametrize(
    "num_shards", [pytest.param(1, marks=SLOW), 2, pytest.param(4, marks=SLOW)]
)
def test_consensus_is_exact_for_gaussian_subposteriors(runs, num_shards):
    idata = runs[num_shards]
    mean, cov = analytic(X, Y)
    assert idata.posterior["beta"].shape[:2] == (2, idata.attrs["draws_per_chain"])
    assert idata.attrs["draws_per_chain"] >= 600
    assert_gaussian_matches(idata.posterior["beta"].values, mean, cov)
    if num_shards > 1:
        assert idata.attrs["combination_summary"] == "combination reliable"
        assert idata.attrs["num_shards"] == num_shards
        assert int(idata.sample_stats["diverging"].sum()) == 0
    else:
        assert "ordinary NUTS" in idata.attrs["note"]


@pytest.mark.parametrize("num_shards", [2, pytest.param(4, marks=SLOW)])
def test_each_subposterior_matches_its_analytic_form(runs, num_shards):
    idata = runs[num_shards]
    bounds = np.linspace(0, N, num_shards + 1).astype(int)  # equal rows per shard
    for m in range(num_shards):
        group = idata[f"shard_{m}"]
        lo, hi = group.attrs["entity_start"], group.attrs["entity_stop"]
        assert (lo, hi) == (bounds[m], bounds[m + 1])
        mean, cov = analytic(X[lo:hi], Y[lo:hi], prior_scale=1.0 / num_shards)
        assert_gaussian_matches(group["beta"].values, mean, cov)
        assert group.attrs["r_hat_max"] <= 1.01


def test_more_shards_than_entries_fails_before_sampling():
    small = {"X": X[:3], "y": Y[:3]}
    with pytest.raises(ConfigurationError, match="num_shards=4"):
        raybayes.sample_subposteriors(
            regression, model_kwargs=small, num_shards=4, backend="local", **RUN
        )
    part = Partition("obs", entity_args=("X", "y"))
    with pytest.raises(ConfigurationError, match="only 3 entities"):
        raybayes.sample_subposteriors(
            regression,
            model_kwargs=small,
            num_shards=4,
            partition=part,
            backend="local",
            **RUN,
        )
    # a partition that leaves X whole: checked against shard traces, before sampling
    with pytest.raises(ConfigurationError, match="does not fit the model"):
        raybayes.sample_subposteriors(
            regression,
            model_kwargs={"X": X, "y": Y},
            num_shards=2,
            partition=Partition("obs", entity_args=("y",)),
            backend="local",
            **RUN,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_shards": 0}, "num_shards=0"),
        ({"num_shards": 2.0}, "num_shards=2.0"),
        ({"combination": "average"}, "combination='average'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        raybayes.sample_subposteriors(
            regression,
            model_kwargs={"X": X, "y": Y},
            backend="local",
            **{**RUN, **kwargs},
        )


@SLOW
def test_one_shard_is_ordinary_nuts(runs):
    plain = raybayes.sample(
        regression, model_kwargs={"X": X, "y": Y}, backend="local", **RUN
    )
    a, b = runs[1].posterior["beta"].values, plain.posterior["beta"].values
    assert a.tobytes() == b.tobytes()


def test_banana_subposteriors_make_a_diagnostic_fire():
    rng = np.random.default_rng(1)
    y = (1.0 + 0.5 * rng.normal(size=200)).astype(np.float32)  # a + b^2 = 1: a ridge
    with pytest.warns(RaybayesWarning, match="combination unreliable"):
        idata = raybayes.sample_subposteriors(
            banana, model_kwargs={"y": y}, num_shards=2, backend="local", **RUN
        )
    assert idata.attrs["combination_reliable"] == 0
    summary = idata.attrs["combination_summary"]
    assert summary.startswith("combination unreliable: ")
    assert "a:" in summary or "b:" in summary
    assert "not Gaussian" in summary or "negligible density" in summary


def test_same_draws_on_ray_workers_as_in_process(runs, ray_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_ray = raybayes.sample_subposteriors(
            regression,
            model_kwargs={"X": X, "y": Y},
            num_shards=2,
            backend=ray_backend,
            num_workers=2,
            **RUN,
        )
    local = runs[2]
    for group in ("posterior", "shard_0", "shard_1"):
        a, b = local[group]["beta"].values, on_ray[group]["beta"].values
        assert a.tobytes() == b.tobytes(), group
    # Shards draw from their own streams: derive_key(seed, shard, chain).
    assert not np.array_equal(
        local.shard_0["beta"].values[..., 0], local.shard_1["beta"].values[..., 0]
    )


@SLOW
def test_checkpointed_run_resumes_to_the_same_draws(runs, tmp_path):
    kwargs = dict(model_kwargs={"X": X, "y": Y}, num_shards=2, backend="local", **RUN)
    first = raybayes.sample_subposteriors(
        regression, checkpoint_dir=str(tmp_path), **kwargs
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_000", "shard_001"]
    again = raybayes.sample_subposteriors(
        regression, checkpoint_dir=str(tmp_path), **kwargs
    )
    for group in ("posterior", "shard_0", "shard_1"):
        a = runs[2][group]["beta"].values
        assert a.tobytes() == first[group]["beta"].values.tobytes(), group
        assert a.tobytes() == again[group]["beta"].values.tobytes(), group


@SLOW  # the default run covers Ray against in-process in the test above
def test_shards_run_at_once_with_the_draws_of_a_shard_run_alone(ray_backend):
    # One chain per shard and two workers: the two shards' chains run at the same
    # time on the pool; each shard's draws must be those of the shard sampled on
    # its own, in process, with the shard's key stream derive_key(seed, m, chain).
    from raybayes.mcmc.subposterior import SubposteriorModel

    small = dict(
        num_chains=1,
        num_warmup=100,
        num_samples=100,
        chunk_size=50,
        progress_bar=False,
        seed=5,
    )
    with warnings.catch_warnings():
        # 100 draws per shard: the combined mean's Monte Carlo error is flagged.
        warnings.simplefilter("ignore", RaybayesWarning)
        together = raybayes.sample_subposteriors(
            regression,
            model_kwargs={"X": X, "y": Y},
            num_shards=2,
            backend=ray_backend,
            num_workers=2,
            **small,
        )
    assert together.attrs["num_workers"] == 2
    sub = SubposteriorModel(regression, 2, {"obs"})
    for m in range(2):
        rows = slice(m * N // 2, (m + 1) * N // 2)
        alone = raybayes.sample(
            sub,
            model_kwargs={"X": X[rows], "y": Y[rows]},
            backend="local",
            _key_stream=(m,),
            **small,
        )
        a = together[f"shard_{m}"]["beta"].values
        assert a.tobytes() == alone.posterior["beta"].values.tobytes(), m
        assert together[f"shard_{m}"].attrs["worker_s"] > 0


def _regression_kwargs_from_table(table):
    X = np.stack([table.column(f"x{j}").to_numpy() for j in range(D)], axis=1)
    kwargs = {"X": X.astype(np.float32), "y": table.column("y").to_numpy()}
    return kwargs, table.column("row").to_numpy()


def _parquet_source(directory):
    """The rows of ``X, Y`` in four Parquet files of 60 rows each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybayes.datasets.parquet import ParquetShards

    files = []
    for k in range(4):
        rows = slice(60 * k, 60 * (k + 1))
        table = pa.table(
            {
                "row": np.arange(N)[rows],
                **{f"x{j}": X[rows, j] for j in range(D)},
                "y": Y[rows],
            }
        )
        files.append(directory / f"part-{k}.parquet")
        pq.write_table(table, files[-1])
    return ParquetShards(files, _regression_kwargs_from_table)


PARQUET_RUN = dict(
    num_chains=2,
    num_warmup=100,
    num_samples=100,
    chunk_size=50,
    progress_bar=False,
    seed=4,
)


def test_parquet_partitions_are_read_by_the_workers_with_the_same_draws(tmp_path):
    # Four Parquet files of 60 rows, two shards: each shard reads its own two
    # files on its worker; the draws equal those of the same rows in memory.
    source = _parquet_source(tmp_path)
    part = Partition("obs", entity_args=("X", "y"))
    small = dict(**PARQUET_RUN, backend="local")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RaybayesWarning)  # 200 draws: MCSE flagged
        read = raybayes.sample_subposteriors(
            regression, num_shards=2, partition=part, source=source, **small
        )
        held = raybayes.sample_subposteriors(
            regression,
            model_kwargs={"X": X, "y": Y},
            num_shards=2,
            partition=part,
            **small,
        )
    for group in ("posterior", "shard_0", "shard_1"):
        a, b = read[group]["beta"].values, held[group]["beta"].values
        assert a.tobytes() == b.tobytes(), group
    assert (read.shard_1.attrs["entity_start"], read.shard_1.attrs["entity_stop"]) == (
        2,
        4,
    )  # partitions 2..3
    with pytest.raises(ConfigurationError, match="only 4 partitions"):
        raybayes.sample_subposteriors(
            regression, num_shards=5, partition=part, source=source, **small
        )
    with pytest.raises(ConfigurationError, match="needs partition="):
        raybayes.sample_subposteriors(regression, num_shards=2, source=source, **small)


def test_parquet_partitions_on_ray_workers_give_the_in_memory_draws(
    tmp_path, ray_backend
):
    # About 10 s on 2 quiet cores (27 s at load 9), the Ray instance being shared
    # with the module's other Ray test.
    # The Parquet path on Ray: two workers, two shards of two files each, every
    # shard's rows read by the worker that runs its chains (the driver only lists
    # the files). The draws must be those of the same rows held in memory and
    # sampled in process.
    source = _parquet_source(tmp_path)
    part = Partition("obs", entity_args=("X", "y"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RaybayesWarning)  # 200 draws: MCSE flagged
        on_ray = raybayes.sample_subposteriors(
            regression,
            num_shards=2,
            partition=part,
            source=source,
            backend=ray_backend,
            num_workers=2,
            **PARQUET_RUN,
        )
        held = raybayes.sample_subposteriors(
            regression,
            model_kwargs={"X": X, "y": Y},
            num_shards=2,
            partition=part,
            backend="local",
            **PARQUET_RUN,
        )
    assert on_ray.attrs["num_workers"] == 2
    assert "observed_data" not in on_ray.groups()  # no rows passed the driver
    for group in ("posterior", "shard_0", "shard_1"):
        a, b = on_ray[group]["beta"].values, held[group]["beta"].values
        assert a.shape == (2, 100, D), group
        assert a.tobytes() == b.tobytes(), group
    assert [on_ray[f"shard_{m}"].attrs["entity_start"] for m in range(2)] == [0, 2]
