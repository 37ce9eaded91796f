"""Fleets of small models: one Bayesian model per group of a partitioned data set."""

from raybayes.fleet.aggregate import aggregate, plot_group
from raybayes.fleet.driver import FleetResult, fit_many, list_groups
from raybayes.fleet.store import connect as connect_results

__all__ = ["fit_many", "FleetResult", "list_groups", "aggregate", "plot_group",
           "connect_results"]
