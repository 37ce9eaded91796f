"""Partitioned Parquet read by the shard workers, each its own partitions only.

A dataset partitioned by entity (hive-style ``path/product=17/part-0.parquet``, or
one file per partition) is split into ``num_shards`` contiguous blocks of partitions.
Each worker lists the partitions (file metadata only), keeps its block, and reads it
with a ``pyarrow.dataset`` filter, so rows are never read by the driver or by
another worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raybayes.errors import ConfigurationError, DataValidationError

__all__ = ["ParquetShards", "elasticity_kwargs_from_table"]


class ParquetShards:
    """A partitioned Parquet dataset, read shard by shard on the workers.

    Args:
        path: the dataset directory (hive-style) or a list of files (one per
            partition).
        to_model_kwargs: ``f(table) -> (model_kwargs, entity_ids)``: the model
            arguments of one shard, with entities renumbered ``0 .. n - 1``, and the
            global id of each local entity (``(n,)``).
        partition_column: the hive partition key (``"product"``); ``None`` for a
            list of files.
        columns: columns to read (default: all).

    Attributes:
        last_num_rows: rows read by the last :meth:`read_shard` (for checks).

    Raises:
        ConfigurationError: a directory without ``partition_column``, or no
            partitions found.

    Example:
        >>> src = ParquetShards("sales/", elasticity_kwargs_from_table,
        ...                     partition_column="product")  # doctest: +SKIP
        >>> kwargs, ids = src.read_shard(0, num_shards=4)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        to_model_kwargs: Callable[[Any], tuple[dict, np.ndarray]],
        *,
        partition_column: str | None = None,
        columns: Sequence[str] | None = None,
    ):
        self.files = None
        self.path = None
        if isinstance(path, (str, Path)):
            self.path = str(path)
            if partition_column is None:
                raise ConfigurationError(
                    f"path={self.path!r} is a directory; pass partition_column= (the hive "
                    "key, e.g. 'product'), or a list of files, one per partition."
                )
        else:
            self.files = sorted(str(p) for p in path)
            if not self.files:
                raise ConfigurationError("an empty list of Parquet files was given.")
        self.to_model_kwargs = to_model_kwargs
        self.partition_column = partition_column
        self.columns = list(columns) if columns is not None else None
        self.last_num_rows = 0

    def partition_values(self) -> list:
        """Sorted partition keys (hive) or files; reads metadata only."""
        if self.files is not None:
            return list(self.files)
        import pyarrow.dataset as ds

        dataset = ds.dataset(self.path, format="parquet", partitioning="hive")
        values = set()
        for fragment in dataset.get_fragments():
            keys = ds.get_partition_keys(fragment.partition_expression)
            if self.partition_column not in keys:
                raise ConfigurationError(
                    f"file {fragment.path!r} has no hive key {self.partition_column!r} "
                    f"(keys: {sorted(keys)}); check partition_column=."
                )
            values.add(keys[self.partition_column])
        if not values:
            raise ConfigurationError(
                f"no Parquet partitions found under {self.path!r}."
            )
        return sorted(values)

    def shard_values(self, shard_id: int, num_shards: int) -> list:
        """The partitions of shard ``shard_id``: a contiguous block of the sorted keys.

        Raises:
            ConfigurationError: more shards than partitions.
        """
        values = self.partition_values()
        if num_shards > len(values):
            raise ConfigurationError(
                f"num_shards={num_shards} but the dataset has only {len(values)} "
                f"partitions; use num_shards <= {len(values)}."
            )
        blocks = np.array_split(np.arange(len(values)), num_shards)
        return [values[i] for i in blocks[shard_id]]

    def read_table(self, shard_id: int, num_shards: int):
        """The rows of shard ``shard_id`` as a ``pyarrow.Table`` (filtered read)."""
        import pyarrow.dataset as ds

        mine = self.shard_values(shard_id, num_shards)
        if self.files is not None:
            table = ds.dataset(mine, format="parquet").to_table(columns=self.columns)
        else:
            dataset = ds.dataset(self.path, format="parquet", partitioning="hive")
            table = dataset.to_table(
                columns=self.columns, filter=ds.field(self.partition_column).isin(mine)
            )
        self.last_num_rows = table.num_rows
        return table

    def read_shard(self, shard_id: int, num_shards: int) -> tuple[dict, np.ndarray]:
        """Model arguments and global entity ids of shard ``shard_id``."""
        table = self.read_table(shard_id, num_shards)
        if table.num_rows == 0:
            raise DataValidationError(
                f"shard {shard_id} of {num_shards} read 0 rows; its partitions are empty.",
            )
        return self.to_model_kwargs(table)


def elasticity_kwargs_from_table(
    table,
    *,
    num_categories: int,
    num_times: int,
    product_column: str = "product",
    category_column: str = "category",
    time_column: str = "week",
    price_column: str = "price",
    units_column: str = "units",
    likelihood: str = "negbin",
) -> tuple[dict, np.ndarray]:
    """Arguments of :func:`raybayes.models.elasticity_model` for one shard's rows.

    Products are renumbered locally (sorted by id); categories and weeks must already
    be integer codes ``0 .. num_categories - 1`` and ``0 .. num_times - 1`` shared
    by every shard. Log price is centred within product, as in
    :func:`~raybayes.datasets.prepare_elasticity_data`.

    Args:
        table: a ``pyarrow.Table`` (or anything with ``column(name)``).
        num_categories, num_times: global sizes.

    Returns:
        ``(model_kwargs, product_ids)``, ``product_ids`` ``(num_local_products,)``.

    Raises:
        DataValidationError: non-positive or non-finite prices, negative units.
    """
    col = lambda name: np.asarray(table.column(name).to_numpy())  # noqa: E731
    product = col(product_column)
    ids, product_idx = np.unique(product, return_inverse=True)
    category = col(category_column).astype(np.int32)
    category_of_product = np.zeros(len(ids), np.int32)
    category_of_product[product_idx] = category
    price = col(price_column).astype(np.float64)
    bad = ~np.isfinite(price) | (price <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataValidationError(
            f"column {price_column!r}: {int(bad.sum())} rows are non-positive or not "
            f"finite (first: product {product[row]}, price {price[row]}); prices must "
            "be > 0.",
            column=price_column,
            num_bad_rows=int(bad.sum()),
            example={product_column: product[row], price_column: price[row]},
        )
    log_price = np.log(price)
    mean = np.bincount(product_idx, log_price) / np.bincount(product_idx)
    units = col(units_column)
    if (units < 0).any():
        row = int(np.flatnonzero(units < 0)[0])
        raise DataValidationError(
            f"column {units_column!r}: {int((units < 0).sum())} rows are negative "
            f"(first: product {product[row]}, units {units[row]}).",
            column=units_column,
            num_bad_rows=int((units < 0).sum()),
            example={product_column: product[row], units_column: units[row]},
        )
    kwargs = dict(
        log_price=(log_price - mean[product_idx]).astype(np.float32),
        product_idx=product_idx.astype(np.int32),
        time_idx=col(time_column).astype(np.int32),
        category_of_product=category_of_product,
        num_categories=int(num_categories),
        num_times=int(num_times),
        units=units.astype(np.int32),
        likelihood=likelihood,
    )
    return kwargs, ids
