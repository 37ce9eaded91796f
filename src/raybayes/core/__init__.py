"""The numerical core of distributed inference (pure JAX/NumPyro, no Ray).

* :class:`Partition`, :func:`assign_entities`, :func:`shard_model_kwargs`: how the
  arguments of a model split into shards along one plate.
* :class:`ShardLogDensity`, :func:`shard_log_density`: the log joint of one shard,
  with every site outside the split plate scaled by ``1/num_shards``, so that the
  sum over shards is the full log joint.
"""

from raybayes.core.partition import (
    Partition,
    ShardSpec,
    assign_entities,
    shard_model_kwargs,
)
from raybayes.core.shard_density import (
    ShardLogDensity,
    SiteInfo,
    scale_global_sites,
    shard_log_density,
    trace_latent_sites,
)

__all__ = [
    "Partition",
    "ShardSpec",
    "assign_entities",
    "shard_model_kwargs",
    "ShardLogDensity",
    "SiteInfo",
    "scale_global_sites",
    "shard_log_density",
    "trace_latent_sites",
]
