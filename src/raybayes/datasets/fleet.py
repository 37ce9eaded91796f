"""Synthetic fleets of count series from 2-state Poisson HMMs, with known truth.

Each group (``region x demographic x network``) is an hourly series of counts
(viewers, say) from a 2-state Poisson HMM whose rates and transition probabilities
are drawn per group. The data are written as a hive-partitioned Parquet data set
(``region=.../demographic=.../network=.../part-0.parquet``) with columns
``timestamp`` and ``count``; the true parameters go to ``truth.parquet`` next to
it, not inside the data set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["simulate_fleet"]


def _simulate_one(rng, num_steps, rates, p01, p10):
    z = np.empty(num_steps, np.int64)
    z[0] = rng.random() < p01 / (p01 + p10)
    u = rng.random(num_steps)
    for t in range(1, num_steps):
        z[t] = (u[t] < p01) if z[t - 1] == 0 else (u[t] >= p10)
    return rng.poisson(rates[z]), z


def simulate_fleet(
    output_dir: str | Path,
    num_regions: int = 2,
    num_demographics: int = 2,
    num_networks: int = 3,
    num_steps: int = 24 * 14,
    seed: int = 0,
    start: str = "2024-01-01",
    missing_fraction: float = 0.0,
) -> pd.DataFrame:
    """Write a synthetic fleet of 2-state Poisson HMM series with known parameters.

    Per group: ``rate[0] ~ LogNormal(log 5, 0.5)``, ``rate[1] = rate[0] *
    (2 + Gamma(2, 1))``, switching probabilities ``p01, p10 ~ Uniform(0.02, 0.15)``;
    the initial state is drawn from the stationary distribution.

    Args:
        output_dir: folder; the data set goes to ``output_dir/data``, the truth to
            ``output_dir/truth.parquet``.
        num_regions, num_demographics, num_networks: the group grid.
        num_steps: hourly points per group.
        seed: NumPy seed.
        start: first timestamp.
        missing_fraction: fraction of counts set to null (missing at random).

    Returns:
        The truth as a ``pandas.DataFrame``: one row per group with ``region``,
        ``demographic``, ``network``, ``rate_0``, ``rate_1``, ``p01``, ``p10``
        (``transition[0, 1]`` and ``transition[1, 0]``).

    Examples:
        >>> import tempfile
        >>> truth = simulate_fleet(tempfile.mkdtemp(), 1, 1, 2, num_steps=48)
        >>> len(truth)
        2
    """
    out = Path(output_dir)
    rng = np.random.default_rng(seed)
    times = pd.date_range(start, periods=num_steps, freq="h").to_numpy()
    rows = []
    for r in range(num_regions):
        for d in range(num_demographics):
            for n in range(num_networks):
                rate0 = float(np.exp(np.log(5.0) + 0.5 * rng.standard_normal()))
                rates = np.array([rate0, rate0 * (2.0 + rng.gamma(2.0, 1.0))])
                p01, p10 = rng.uniform(0.02, 0.15, size=2)
                y, _ = _simulate_one(rng, num_steps, rates, p01, p10)
                counts = pa.array(y, pa.int64())
                if missing_fraction > 0:
                    miss = rng.random(num_steps) < missing_fraction
                    counts = pa.array(np.where(miss, None, y).tolist(), pa.int64())
                key = dict(region=f"r{r}", demographic=f"d{d}", network=f"n{n}")
                folder = out / "data" / "/".join(f"{k}={v}" for k, v in key.items())
                folder.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table({"timestamp": times, "count": counts}),
                               folder / "part-0.parquet")
                rows.append(dict(key, rate_0=rates[0], rate_1=rates[1], p01=p01, p10=p10))
    truth = pd.DataFrame(rows)
    truth.to_parquet(out / "truth.parquet")
    return truth
