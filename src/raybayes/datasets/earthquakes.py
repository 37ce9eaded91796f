"""Annual counts of major earthquakes (magnitude >= 7), 1900-2006.

The classic test series for Poisson hidden Markov models: Zucchini, W. &
MacDonald, I. L. (2009), Hidden Markov Models for Time Series: An Introduction
Using R, CRC Press, Table 1.1 (counts from the USGS, public domain). See
``datasets/data/earthquakes/PROVENANCE.md``.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

__all__ = ["load_earthquakes"]


def load_earthquakes() -> pd.DataFrame:
    """Load the 107 annual counts of major earthquakes.

    Returns:
        ``pandas.DataFrame`` with columns ``year`` (int, 1900-2006) and ``count``
        (int64, earthquakes of magnitude >= 7 in that year).

    References:
        Zucchini & MacDonald (2009), Hidden Markov Models for Time Series, Table 1.1.

    Examples:
        >>> df = load_earthquakes()
        >>> df.shape, int(df["count"].sum())
        ((107, 2), 2072)
    """
    path = resources.files("raybayes.datasets") / "data/earthquakes/earthquakes_major_1900_2006.csv"
    with resources.as_file(path) as p:
        df = pd.read_csv(p)
    return df.astype({"year": "int64", "count": "int64"})
