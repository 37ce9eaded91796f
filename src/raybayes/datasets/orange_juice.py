"""Dominick's Finer Foods refrigerated orange juice (bayesm ``orangeJuice``).

Weekly scanner data for 83 stores x 11 brands over weeks 40-160 (106,139 rows),
shipped with raybayes. Origin: R package bayesm 3.1-6 (``orangeJuice$yx``, GPL >= 2);
Montgomery, A. L. (1997), "Creating Micro-Marketing Pricing Strategies Using
Supermarket Scanner Data", Marketing Science 16(4), 315-337. Underlying data: James
M. Kilts Center for Marketing, University of Chicago Booth School of Business, for
research and teaching use. See ``datasets/data/orange_juice/PROVENANCE.md``.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["load_orange_juice", "BRAND_NAMES"]

#: Brand labels of bayesm's orangeJuice (index 1..11), from the bayesm documentation.
BRAND_NAMES = {
    1: "Tropicana Premium 64oz",
    2: "Tropicana Premium 96oz",
    3: "Florida's Natural 64oz",
    4: "Tropicana 64oz",
    5: "Minute Maid 64oz",
    6: "Minute Maid 96oz",
    7: "Citrus Hill 64oz",
    8: "Tree Fresh 64oz",
    9: "Florida Gold 64oz",
    10: "Dominick's 64oz",
    11: "Dominick's 128oz",
}


def load_orange_juice(stores: int | None = None) -> pd.DataFrame:
    """Load the orange-juice scanner data as a tidy table.

    Args:
        stores: keep only the first ``stores`` stores (sorted by id), for quick
            runs; ``None`` keeps all 83.

    Returns:
        ``pandas.DataFrame`` with one row per store x brand x week (106,139 rows for
        all stores) and columns ``store`` (int), ``brand`` (int, 1-11), ``week``
        (int, 40-160), ``units`` (int64, units sold = ``exp(logmove)``), ``price``
        (float, the row's own-brand price in dollars per ounce), ``deal`` (0/1,
        in-store coupon), ``feat`` (float in [0, 1], feature advertisement; a share
        in some rows).

    Examples:
        >>> df = load_orange_juice()
        >>> df.shape
        (106139, 7)
    """
    path = resources.files("raybayes.datasets") / "data/orange_juice/bayesm_orangeJuice_yx.csv.gz"
    with resources.as_file(path) as p:
        raw = pd.read_csv(p, compression="gzip")
    if stores is not None:
        keep = np.sort(raw["store"].unique())[:stores]
        raw = raw[raw["store"].isin(keep)]
    brand = raw["brand"].to_numpy()
    prices = raw[[f"price{b}" for b in range(1, 12)]].to_numpy()
    own_price = prices[np.arange(len(raw)), brand - 1]
    return pd.DataFrame(
        {
            "store": raw["store"].astype(np.int64).to_numpy(),
            "brand": brand.astype(np.int64),
            "week": raw["week"].astype(np.int64).to_numpy(),
            "units": np.rint(np.exp(raw["logmove"].to_numpy())).astype(np.int64),
            "price": own_price.astype(np.float64),
            "deal": raw["deal"].astype(np.int64).to_numpy(),
            "feat": raw["feat"].astype(np.float64).to_numpy(),
        }
    ).reset_index(drop=True)
