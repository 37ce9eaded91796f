"""Partitioned Parquet read by the shard workers, each its own partitions only.

A dataset partitioned by entity (hive-style ``path/product=17/part-0.parquet``, or
one file per partition) is split into ``num_shards`` contiguous blocks of the sorted
partitions, balanced by their row counts (read from the Parquet footers, never from
the rows): the cuts are those :func:`raybayes.core.assign_entities` makes for
in-memory data, so the same rows give the same shards either way, and the same
metadata always give the same assignment. Each worker keeps its block and reads it
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

    The partitions and their row counts are listed once (footers only) and kept,
    so a source listed on the driver travels to the workers with its listing.

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
        self._listing: tuple[list, np.ndarray] | None = None

    def _list(self) -> tuple[list, np.ndarray]:
        """``(sorted partition keys or files, rows of each)``, from metadata only."""
        if self._listing is not None:
            return self._listing
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        if self.files is not None:
            rows = {f: pq.ParquetFile(f).metadata.num_rows for f in self.files}
        else:
            dataset = ds.dataset(self.path, format="parquet", partitioning="hive")
            rows = {}
            for fragment in dataset.get_fragments():
                keys = ds.get_partition_keys(fragment.partition_expression)
                if self.partition_column not in keys:
                    raise ConfigurationError(
                        f"file {fragment.path!r} has no hive key "
                        f"{self.partition_column!r} (keys: {sorted(keys)}); check "
                        "partition_column=."
                    )
                key = keys[self.partition_column]
                rows[key] = rows.get(key, 0) + fragment.metadata.num_rows
            if not rows:
                raise ConfigurationError(
                    f"no Parquet partitions found under {self.path!r}."
                )
        values = sorted(rows)
        self._listing = values, np.array([rows[v] for v in values], np.int64)
        return self._listing

    def partition_values(self) -> list:
        """Sorted partition keys (hive) or files; reads metadata only."""
        return list(self._list()[0])

    def partition_rows(self) -> np.ndarray:
        """``(num_partitions,)`` rows of each partition, in the order of
        :meth:`partition_values`, from the Parquet footers (no rows are read)."""
        return self._list()[1].copy()

    def shard_blocks(self, num_shards: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of each shard's block in :meth:`partition_values`.

        Contiguous blocks of about equal numbers of rows: the cuts of
        :func:`raybayes.core.assign_entities` with each partition's row count as
        its work (every shard gets at least one partition).

        Raises:
            ConfigurationError: more shards than partitions.

        Examples:
            >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
            >>> folder, files = tempfile.mkdtemp(), []
            >>> for j, n in enumerate([10, 10, 10, 90, 80]):  # rows per partition
            ...     files.append(f"{folder}/part-{j}.parquet")
            ...     pq.write_table(pa.table({"y": np.zeros(n)}), files[-1])
            >>> src = ParquetShards(files, None)
            >>> src.shard_blocks(2), src.shard_rows(2).tolist()
            ([(0, 4), (4, 5)], [120, 80])
        """
        from raybayes.core.partition import assign_entities

        values, rows = self._list()
        if num_shards > len(values):
            raise ConfigurationError(
                f"num_shards={num_shards} but the dataset has only {len(values)} "
                f"partitions; use num_shards <= {len(values)}."
            )
        specs = assign_entities(rows, num_shards, "partitions")
        return [(s.entity_start, s.entity_stop) for s in specs]

    def shard_rows(self, num_shards: int) -> np.ndarray:
        """``(num_shards,)`` rows each shard holds (from metadata), in shard order;
        ``max / mean`` of it is the split's imbalance."""
        rows = self._list()[1]
        blocks = self.shard_blocks(num_shards)
        return np.array([int(rows[a:b].sum()) for a, b in blocks])

    def shard_values(self, shard_id: int, num_shards: int) -> list:
        """The partitions of shard ``shard_id``: its block of the sorted keys (see
        :meth:`shard_blocks`).

        Raises:
            ConfigurationError: more shards than partitions.
        """
        start, stop = self.shard_blocks(num_shards)[shard_id]
        return self.partition_values()[start:stop]

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
