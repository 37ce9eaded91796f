"""The shard workers and their driver-side adapter (no numerics of their own).

* :class:`ShardWorker` (:mod:`raybayes.distributed.worker`): the object each worker
  holds, one shard's data and log density; its methods call the numerical core
  (:mod:`raybayes.core`) and return NumPy arrays. :func:`worker_precision` runs a
  worker method in the worker's float precision.
* :class:`ShardedObjective` (:mod:`raybayes.distributed.objective`): one worker per
  shard on a backend, the public interface every shard algorithm uses to reach them
  (``submit``/``result``/``gather``/``call_all``/``restart_shard``), and the exact
  full-data objective summed over them. :func:`planned_objective` builds one with
  the split chosen by :func:`raybayes.plan`; :func:`constrained_values` and
  :func:`merge_shard_values` assemble site values over the shards.
"""

from raybayes.distributed.objective import (
    ShardedObjective,
    constrained_values,
    make_backend,
    merge_shard_values,
    planned_objective,
    shard_count,
)
from raybayes.distributed.worker import ShardWorker, worker_precision

__all__ = [
    "ShardWorker",
    "ShardedObjective",
    "constrained_values",
    "make_backend",
    "merge_shard_values",
    "planned_objective",
    "shard_count",
    "worker_precision",
]
