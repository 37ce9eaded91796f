"""Fleets of small models: one Bayesian model per group of a partitioned data set."""

from typing import TYPE_CHECKING

from raybayes._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and the API reference; at run time, below
    from raybayes.fleet.aggregate import aggregate, plot_group
    from raybayes.fleet.driver import FleetResult, fit_many, list_groups
    from raybayes.fleet.store import connect as connect_results

__all__ = ["fit_many", "FleetResult", "list_groups", "aggregate", "plot_group",
           "connect_results"]

# Imported on first use, so that the command line's --help loads neither JAX nor Ray.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "aggregate": "raybayes.fleet.aggregate",
        "plot_group": "raybayes.fleet.aggregate",
        "FleetResult": "raybayes.fleet.driver",
        "fit_many": "raybayes.fleet.driver",
        "list_groups": "raybayes.fleet.driver",
        "connect_results": "raybayes.fleet.store:connect",
    },
)
