"""Chain-parallel MCMC."""

from raybayes.mcmc.chain import ChunkResult, NUTSChainRunner, chain_key
from raybayes.mcmc.sampler import sample

__all__ = ["ChunkResult", "NUTSChainRunner", "chain_key", "sample"]
