"""Distributed MAP/Laplace on Ray workers reading partitioned Parquet == in-process run."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from numpyro.handlers import reparam
from numpyro.infer.reparam import LocScaleReparam

from raybayes.backends import get_backend
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.datasets.parquet import ParquetShards, elasticity_kwargs_from_table
from raybayes.distributed import ShardedObjective
from raybayes.models.elasticity import elasticity_model as _centred_elasticity_model
from raybayes.optim import find_map, laplace
from raybayes.plan import plan

# The joint density of a centred hierarchical model is unbounded as a scale goes to
# zero, so its MAP is taken in the non-centred parameterization (the posterior is
# the same).
elasticity_model = reparam(
    _centred_elasticity_model,
    config={"gamma": LocScaleReparam(0), "delta": LocScaleReparam(0)},
)

C, P, T = 3, 40, 80


@pytest.fixture(scope="module")
def ray_backend():
    backend = get_backend("ray")
    backend.start()
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def sales(tmp_path_factory):
    df, truth = simulate_elasticity(
        num_categories=C, num_products=P, num_weeks=T, seed=4
    )
    root = tmp_path_factory.mktemp("sales")
    ds.write_dataset(
        pa.Table.from_pandas(df, preserve_index=False),
        root,
        format="parquet",
        partitioning=ds.partitioning(
            pa.schema([("product", pa.int64())]), flavor="hive"
        ),
    )
    return df, root


def _fit(objective):
    result = find_map(
        objective, tol=1e-10, gtol=1e-4, max_steps=400, progress_bar=False
    )
    return result, laplace(objective, result, num_samples=200, seed=3)


@pytest.mark.slow
def test_ray_workers_reading_parquet_match_the_in_process_run(ray_backend, sales):
    df, root = sales
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    kwargs = data.model_kwargs()
    # With 80 weeks and 40 products, splitting by week is cheaper (90 globals
    # against 250); the Parquet files are partitioned by product, so use that split.
    chosen = plan(elasticity_model, kwargs, num_shards=2)
    assert chosen.partition.plate == "times"
    by_product = next(c for c in chosen.candidates if c.plate == "products")
    with ShardedObjective(
        elasticity_model,
        kwargs,
        partition=by_product.partition,
        num_shards=2,
        backend="local",
    ) as local:
        map_local, lap_local = _fit(local)

    source = ParquetShards(
        root,
        functools.partial(elasticity_kwargs_from_table, num_categories=C, num_times=T),
        partition_column="product",
    )
    with ShardedObjective(
        elasticity_model,
        partition=by_product.partition,
        num_shards=2,
        backend=ray_backend,
        source=source,
    ) as remote:
        rows = remote.pool.call_all("num_rows")
        map_ray, lap_ray = _fit(remote)
    # Each worker read only its own products' rows.
    assert rows == [P // 2 * T, P // 2 * T]
    assert [list(i["entity_ids"]) for i in remote.shard_info] == [
        list(range(20)),
        list(range(20, 40)),
    ]
    # L-BFGS stops (by tol) at slightly different points; the Newton-polished mode
    # the Laplace approximation is centred on is the same.
    assert lap_ray.map.grad_norm < 1e-4 and lap_local.map.grad_norm < 1e-4
    for site in ("beta_global", "sigma_beta", "sigma_gamma", "beta"):
        np.testing.assert_allclose(
            np.asarray(lap_ray.map.params[site]),
            np.asarray(lap_local.map.params[site]),
            atol=1e-3,
        )
    assert abs(map_ray.loss - map_local.loss) < 1e-6 * abs(map_local.loss)
    np.testing.assert_allclose(
        lap_ray.idata.posterior["beta"].values,
        lap_local.idata.posterior["beta"].values,
        atol=5e-3,
    )
    assert (
        abs(lap_ray.log_marginal_likelihood - lap_local.log_marginal_likelihood) < 1e-2
    )
