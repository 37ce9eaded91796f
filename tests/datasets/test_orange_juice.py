"""The shipped Dominick's orange-juice data and its tidy loader."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import pytest

from raybayes.datasets import load_orange_juice
from raybayes.datasets.orange_juice import BRAND_NAMES

COLUMNS = {
    "store": "int64",
    "brand": "int64",
    "week": "int64",
    "units": "int64",
    "price": "float64",
    "deal": "int64",
    "feat": None,  # see test_feature_share_is_kept
}


@pytest.fixture(scope="module")
def raw():
    path = (
        resources.files("raybayes.datasets")
        / "data/orange_juice/bayesm_orangeJuice_yx.csv.gz"
    )
    with resources.as_file(path) as p:
        return pd.read_csv(p, compression="gzip")


@pytest.fixture(scope="module")
def tidy():
    return load_orange_juice()


def test_shape_columns_and_dtypes(tidy):
    assert tidy.shape == (106_139, 7)
    assert list(tidy.columns) == list(COLUMNS)
    for column, dtype in COLUMNS.items():
        if dtype is not None:
            assert str(tidy[column].dtype) == dtype, column
    assert tidy.index.equals(pd.RangeIndex(len(tidy)))


def test_stores_brands_weeks(tidy):
    assert tidy["store"].nunique() == 83
    assert sorted(tidy["brand"].unique()) == list(range(1, 12))
    assert set(BRAND_NAMES) == set(range(1, 12))
    assert tidy["week"].min() == 40 and tidy["week"].max() == 160
    assert not tidy.duplicated(["store", "brand", "week"]).any()


def test_units_are_counts_from_logmove(tidy, raw):
    units = tidy["units"].to_numpy()
    assert (units >= 1).all()
    expected = np.exp(raw["logmove"].to_numpy())
    np.testing.assert_array_equal(units, np.round(expected).astype(np.int64))
    # exp(logmove) is an integer up to rounding error in the stored logs.
    assert np.max(np.abs(expected - units) / units) < 1e-6


def test_own_price_is_the_price_of_the_rows_brand(tidy, raw):
    assert len(raw) == len(tidy)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(raw), size=200, replace=False)
    for i in rows:
        brand = int(raw["brand"].iloc[i])
        assert tidy["brand"].iloc[i] == brand
        assert tidy["price"].iloc[i] == raw[f"price{brand}"].iloc[i]
    # Prices are in dollars per ounce.
    assert (tidy["price"] > 0).all() and tidy["price"].max() < 0.2


def test_keys_and_deal_carry_over(tidy, raw):
    for column in ("store", "brand", "week", "deal"):
        np.testing.assert_array_equal(tidy[column].to_numpy(), raw[column].to_numpy())
    assert set(tidy["deal"].unique()) == {0, 1}


def test_feature_share_is_kept(tidy, raw):
    feat = raw["feat"].to_numpy()
    assert ((feat > 0) & (feat < 1)).sum() == 1585  # feat is a share, not a flag
    np.testing.assert_array_equal(tidy["feat"].to_numpy(), feat)
    assert tidy["feat"].dtype == np.float64


def test_store_subset(tidy):
    small = load_orange_juice(stores=3)
    first = np.sort(tidy["store"].unique())[:3]
    assert sorted(small["store"].unique()) == list(first)
    assert len(small) == int(tidy["store"].isin(first).sum())
    assert list(small.columns) == list(COLUMNS)
