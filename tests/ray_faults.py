"""Failures injected into a Ray cluster, shared by the fault-tolerance tests."""

import contextlib


def lose_node(cluster, node):
    """Take ``node`` out of ``cluster`` as a machine that is switched off.

    ``Cluster.remove_node`` SIGKILLs the node's Ray services (raylet, object store,
    agents) but not the worker processes they started. A worker actor lives on
    until its periodic check that its raylet is alive fails (about a second; more
    on a loaded machine) and meanwhile answers the driver's calls over its own
    connection, correctly. The rest of a small run takes about as long, so with
    ``remove_node`` alone the loss was seen in some runs and in others never (the
    orphan served every remaining call: nothing was lost, ``worker_restarts == 0``).
    A lost machine takes its processes with it: kill its actors' too.

    Returns:
        The ids of the actors that lived on ``node``.
    """
    import psutil
    from ray.util.state import list_actors

    # Filtered here: with filters, the state API counts the rows it leaves out
    # as missing and raises.
    actors = [a for a in list_actors(address=cluster.address)
              if a.node_id == node.node_id and a.state == "ALIVE"]
    cluster.remove_node(node, allow_graceful=False)
    for actor in actors:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(actor.pid).kill()
    return {a.actor_id for a in actors}
