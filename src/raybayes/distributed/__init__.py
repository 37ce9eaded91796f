"""Distributed pieces built on the execution backends (no numerics of their own)."""

from raybayes.distributed.sharded import ShardedObjective, ShardWorker

__all__ = ["ShardedObjective", "ShardWorker"]
