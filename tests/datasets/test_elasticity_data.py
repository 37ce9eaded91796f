"""Sales-table validation and the index arrays of the elasticity model."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from raybayes import DataValidationError
from raybayes.datasets import prepare_elasticity_data, validate_elasticity_frame


def sales_table() -> pd.DataFrame:
    """3 stores x 2 brands x 4 weeks, every value valid."""
    rng = np.random.default_rng(0)
    store, brand, week = (
        a.ravel()
        for a in np.meshgrid([5, 2, 9], [1, 3], [40, 41, 42, 43], indexing="ij")
    )
    n = len(store)
    return pd.DataFrame(
        {
            "store": store,
            "brand": brand,
            "week": week,
            "price": rng.uniform(0.02, 0.06, n),
            "units": rng.integers(1, 500, n),
        }
    )


def corrupt(column, rows, value):
    df = sales_table()
    df[column] = df[column].astype(float)
    df.loc[rows, column] = value
    return df


BAD_TABLES = {
    # name: (table, column, bad rows, words in the message)
    "nan units": (corrupt("units", [3, 17], np.nan), "units", [3, 17], "NaN"),
    "inf units": (corrupt("units", [8], np.inf), "units", [8], "inf"),
    "negative units": (
        corrupt("units", [1, 2, 22], -4.0),
        "units",
        [1, 2, 22],
        "negative",
    ),
    "fractional units": (corrupt("units", [5], 2.5), "units", [5], "integers"),
    "zero price": (corrupt("price", [0], 0.0), "price", [0], "zero or negative"),
    "negative price": (
        corrupt("price", [6, 7], -0.03),
        "price",
        [6, 7],
        "zero or negative",
    ),
    "nan price": (corrupt("price", [11], np.nan), "price", [11], "NaN"),
    "missing store id": (corrupt("store", [4], np.nan), "store", [4], "missing"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
@pytest.mark.parametrize("check", [validate_elasticity_frame, prepare_elasticity_data])
def test_bad_values_name_column_count_and_example(case, check):
    df, column, rows, words = BAD_TABLES[case]
    with pytest.raises(DataValidationError) as info:
        check(df)
    err = info.value
    assert err.column == column
    assert err.num_bad_rows == len(rows)
    # The example is the first bad row, with every column.
    first = df.iloc[rows[0]].to_dict()
    assert set(err.example) == set(df.columns)
    for key, value in first.items():
        np.testing.assert_equal(err.example[key], value)
    message = str(err)
    assert f"column {column!r}" in message
    assert f"{len(rows)} of {len(df)} rows" in message
    assert f"first at row {rows[0]}" in message
    assert words in message
    assert isinstance(err, ValueError)


def test_the_first_failing_check_is_reported():
    df = corrupt("units", [2], np.nan)
    df.loc[9, "price"] = -1.0
    with pytest.raises(DataValidationError) as info:
        validate_elasticity_frame(df)
    assert info.value.column == "units" and info.value.num_bad_rows == 1


@pytest.mark.parametrize("missing", [["price"], ["units", "week"]])
def test_missing_columns(missing):
    df = sales_table().drop(columns=missing)
    with pytest.raises(DataValidationError) as info:
        prepare_elasticity_data(df)
    err = info.value
    assert err.column in missing
    message = str(err)
    for column in missing:
        assert repr(column) in message
    assert "units_col=" in message  # the fix: map the columns


def test_column_names_can_be_mapped():
    df = sales_table().rename(columns={"units": "sold", "price": "cost"})
    data = prepare_elasticity_data(df, units_col="sold", price_col="cost")
    assert data.num_obs == len(df)


def test_empty_table():
    df = sales_table().iloc[:0]
    with pytest.raises(DataValidationError) as info:
        prepare_elasticity_data(df)
    assert info.value.column is None
    assert "empty" in str(info.value) and "0 rows" in str(info.value)


def test_error_pickles_with_its_attributes():
    df, *_ = BAD_TABLES["negative units"]
    with pytest.raises(DataValidationError) as info:
        validate_elasticity_frame(df)
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert (copy.column, copy.num_bad_rows) == ("units", 3)
    assert copy.example == info.value.example


def test_product_in_two_categories():
    df = sales_table()
    df["product"] = df["store"]  # a product spans both brands
    with pytest.raises(DataValidationError) as info:
        prepare_elasticity_data(df, product_cols=("product",), category_col="brand")
    assert info.value.column == "brand"
    assert "more than one category" in str(info.value)


def test_valid_table_gives_consistent_indices():
    df = sales_table()
    data = prepare_elasticity_data(df)
    assert data.num_obs == 24
    assert data.num_products == 6 and data.num_categories == 2 and data.num_times == 4
    assert list(data.categories) == [1, 3] and list(data.times) == [40, 41, 42, 43]
    # Product i is row i of data.products; every row maps back to its own keys.
    keys = data.products.iloc[data.product_idx][["store", "brand"]].to_numpy()
    np.testing.assert_array_equal(keys, df[["store", "brand"]].to_numpy())
    np.testing.assert_array_equal(
        data.categories[data.category_of_product[data.product_idx]], df["brand"]
    )
    np.testing.assert_array_equal(data.times[data.time_idx], df["week"])
    np.testing.assert_array_equal(data.units, df["units"])
    # log price is centred within each product, and the mean is kept.
    log_price = np.log(df["price"].to_numpy())
    np.testing.assert_allclose(
        data.log_price + data.mean_log_price[data.product_idx], log_price, rtol=1e-5
    )
    sums = np.bincount(data.product_idx, weights=data.log_price)
    np.testing.assert_allclose(sums, 0.0, atol=1e-5)
    kwargs = data.model_kwargs()
    assert kwargs["num_categories"] == 2 and kwargs["num_times"] == 4
    assert kwargs["units"] is data.units and kwargs["likelihood"] == "negbin"
    assert data.model_kwargs(with_units=False)["units"] is None
