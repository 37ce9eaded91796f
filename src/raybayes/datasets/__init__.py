"""Data: the real data sets shipped with raybayes, and simulators with known truth."""

from raybayes.datasets.elasticity import (
    ElasticityData,
    prepare_elasticity_data,
    simulate_elasticity,
    validate_elasticity_frame,
)
from raybayes.datasets.earthquakes import load_earthquakes
from raybayes.datasets.fleet import simulate_fleet
from raybayes.datasets.orange_juice import load_orange_juice

__all__ = [
    "ElasticityData",
    "load_earthquakes",
    "load_orange_juice",
    "simulate_fleet",
    "prepare_elasticity_data",
    "simulate_elasticity",
    "validate_elasticity_frame",
]
