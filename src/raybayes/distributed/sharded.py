"""Former home of the shard workers and the sharded objective.

Kept so that ``from raybayes.distributed.sharded import ShardedObjective`` still
works; the code lives in :mod:`raybayes.distributed.worker` (the object each worker
holds) and :mod:`raybayes.distributed.objective` (the driver side).
"""

from raybayes.distributed.objective import ShardedObjective
from raybayes.distributed.worker import ShardWorker

__all__ = ["ShardWorker", "ShardedObjective"]
