"""Chain-parallel MCMC."""

from raybayes.mcmc.chain import ChunkResult, NUTSChainRunner, chain_key
from raybayes.mcmc.initialization import init_near_value
from raybayes.mcmc.sampler import sample
from raybayes.mcmc.store import load_draws

__all__ = ["ChunkResult", "NUTSChainRunner", "chain_key", "sample", "load_draws",
           "init_near_value"]
