"""NUTS chains advanced chunk by chunk: the unit of remote work of chain-parallel MCMC.

Pure JAX/NumPyro: nothing here knows about Ray. A :class:`NUTSChainRunner` lives on a
worker; the driver asks it to initialise a chain or to advance one by a chunk of
iterations, and gets back the chain's full state (adaptation state included) and the
chunk's draws as NumPy arrays. Because the whole state travels with every chunk, any
worker can continue any chain, and a chain's draws depend only on its key, never on
which worker ran it.
"""

from __future__ import annotations

import traceback
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro.infer import NUTS
from numpyro.infer.util import init_to_uniform

from raybayes.config import derive_key
from raybayes.errors import ChainError

__all__ = ["ChunkResult", "NUTSChainRunner", "chain_key", "SAMPLE_STATS"]

#: Per-draw statistics returned with every chunk, named as in ArviZ.
SAMPLE_STATS = (
    "diverging",
    "tree_depth",
    "n_steps",
    "step_size",
    "energy",
    "acceptance_rate",
    "lp",
)


def chain_key(seed: int, chain_id: int) -> np.ndarray:
    """The PRNG key of chain ``chain_id``: ``derive_key(seed, chain_id)``.

    That is ``fold_in(PRNGKey(seed), chain_id)``: it depends on the seed and the
    chain index only, never on scheduling.

    Args:
        seed: the run's integer seed.
        chain_id: the chain's index, ``>= 0``.

    Returns:
        A ``uint32[2]`` NumPy array.

    Raises:
        ConfigurationError: ``seed`` is not an integer.

    Examples:
        >>> chain_key(0, 1).shape
        (2,)
    """
    return np.asarray(derive_key(seed, chain_id))


class ChunkResult(NamedTuple):
    """What one chunk of iterations returns to the driver.

    Attributes:
        chain_id: the chain advanced.
        state: the chain's ``numpyro.infer.hmc.HMCState`` after the chunk, with NumPy
            leaves (adaptation state included).
        draws: constrained draws of every latent and deterministic site, each of
            shape ``(num_steps, *site_shape)``; ``None`` for warmup chunks.
        stats: sample statistics (see :data:`SAMPLE_STATS`), each ``(num_steps,)``.
        num_steps: iterations run in this chunk.
        elapsed_s: wall time of the chunk on the worker, in seconds.
    """

    chain_id: int
    state: Any
    draws: dict[str, np.ndarray] | None
    stats: dict[str, np.ndarray]
    num_steps: int
    elapsed_s: float


def _to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


class NUTSChainRunner:
    """Runs NUTS chains of one model, a chunk of iterations at a time.

    Every chain shares the model, its data and the warmup length; each chain has its
    own state, key, step size and mass matrix. The chunk is one jitted ``lax.scan``
    of fixed length ``chunk_size`` (shorter chunks are masked), so a worker compiles
    the model once.

    Args:
        model: a NumPyro model (a Python callable).
        model_args: positional arguments of the model.
        model_kwargs: keyword arguments of the model.
        num_warmup: warmup (adaptation) iterations of each chain.
        chunk_size: iterations per chunk.
        kernel_kwargs: extra arguments of :class:`numpyro.infer.NUTS`
            (``target_accept_prob``, ``max_tree_depth``, ``dense_mass``, ...).

    References:
        Hoffman, M. D. & Gelman, A. (2014). The No-U-Turn Sampler: adaptively setting
        path lengths in Hamiltonian Monte Carlo. JMLR 15, 1593-1623.
        https://jmlr.org/papers/v15/hoffman14a.html
    """

    def __init__(
        self,
        model,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        num_warmup: int,
        chunk_size: int,
        kernel_kwargs: dict | None = None,
    ):
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.num_warmup = int(num_warmup)
        self.chunk_size = int(chunk_size)
        kernel_kwargs = dict(kernel_kwargs or {})
        kernel_kwargs.setdefault("init_strategy", init_to_uniform)
        self.kernel = NUTS(model, **kernel_kwargs)
        self._chunk_fn = None
        self._postprocess_fn = None
        self._init_fn = None
        self._ready = False
        #: Simulated straggler factor (>= 1) for benchmarks: each chunk is made to
        #: take ``slowdown`` times its compute time.
        self.slowdown = 1.0

    def ping(self) -> bool:
        """Answer once the worker is up (used after a worker restart)."""
        return True

    # -- set-up ------------------------------------------------------------------
    def _init_state(self, rng_key, init_params=None):
        # Jitted once per worker: run eagerly, NumPyro's initialisation (the search
        # for a valid point, the first potential and gradient) compiles its loops
        # anew for every chain, seconds each for a model with a ``lax.scan``.
        if self._init_fn is None:

            def init(key, params):
                return self.kernel.init(
                    key, self.num_warmup, params, self.model_args, self.model_kwargs
                )

            self._init_fn = jax.jit(init)
        state = self._init_fn(jnp.asarray(rng_key), init_params)
        if not self._ready:
            self._build()
        # Traced, NumPyro cannot raise when no valid point is found; check here.
        finite = np.isfinite(np.asarray(state.potential_energy)) and all(
            np.all(np.isfinite(np.asarray(g)))
            for g in jax.tree_util.tree_leaves(state.z_grad)
        )
        if not finite:
            raise RuntimeError(
                "Cannot find valid initial parameters: the log density or its "
                "gradient is not finite at every initial point tried "
                f"(potential energy {float(state.potential_energy)}). Check the "
                "model's supports and data, or pass init_params."
            )
        return state

    def _build(self):
        kernel, args, kwargs = self.kernel, self.model_args, self.model_kwargs
        size = self.chunk_size

        def stats_of(s):
            return {
                "diverging": s.diverging,
                "n_steps": s.num_steps,
                "step_size": s.adapt_state.step_size,
                "energy": s.energy,
                "acceptance_rate": s.accept_prob,
                "lp": -s.potential_energy,
            }

        def chunk(state, num_steps):
            def body(s, i):
                s = lax.cond(
                    i < num_steps, lambda x: kernel.sample(x, args, kwargs), lambda x: x, s
                )
                return s, (s.z, stats_of(s))

            return lax.scan(body, state, jnp.arange(size))

        self._chunk_fn = jax.jit(chunk)
        self._postprocess_fn = jax.jit(jax.vmap(kernel.postprocess_fn(args, kwargs)))
        self._ready = True

    def _ensure_ready(self):
        if not self._ready:
            # The kernel's closures (adaptation schedule, tree builder) are set by
            # init and are chain-independent; any key does.
            self._init_state(jax.random.PRNGKey(0))

    # -- the remote API ----------------------------------------------------------
    def init_chain(self, chain_id: int, rng_key, init_params: dict | None = None):
        """Initialise chain ``chain_id`` from its key.

        Args:
            chain_id: the chain's index (for error messages).
            rng_key: the chain's ``uint32[2]`` key (see :func:`chain_key`).
            init_params: optional initial values (unconstrained), site -> array.

        Returns:
            The initial ``HMCState`` with NumPy leaves.

        Raises:
            ChainError: the model raised, or no valid initial point was found.
        """
        try:
            return _to_numpy(self._init_state(rng_key, init_params))
        except Exception as err:  # noqa: BLE001 - re-raised with the chain id
            raise ChainError(chain_id, repr(err), traceback.format_exc()) from None

    def advance(self, chain_id: int, state, num_steps: int, collect: bool) -> ChunkResult:
        """Advance a chain by ``num_steps <= chunk_size`` iterations.

        Args:
            chain_id: the chain's index (for error messages).
            state: its current ``HMCState`` (NumPy leaves).
            num_steps: iterations to run (warmup or sampling, as ``state.i`` says).
            collect: return the draws (sampling) or not (warmup).

        Returns:
            A :class:`ChunkResult`.

        Raises:
            ChainError: the model raised during the chunk.
        """
        import time

        if not 0 < num_steps <= self.chunk_size:
            raise ChainError(
                chain_id, f"num_steps={num_steps} outside 1..chunk_size={self.chunk_size}"
            )
        try:
            self._ensure_ready()
            start = time.perf_counter()
            state = jax.tree_util.tree_map(jnp.asarray, state)
            new_state, (zs, stats) = self._chunk_fn(state, num_steps)
            zs = jax.tree_util.tree_map(lambda x: x[:num_steps], zs)
            draws = _to_numpy(self._postprocess_fn(zs)) if collect else None
            stats = {k: np.asarray(v[:num_steps]) for k, v in stats.items()}
            stats["tree_depth"] = np.floor(np.log2(np.maximum(stats["n_steps"], 1))).astype(
                np.int64
            ) + 1
            new_state = _to_numpy(new_state)
            elapsed = time.perf_counter() - start
            if self.slowdown > 1.0:
                time.sleep((self.slowdown - 1.0) * elapsed)
                elapsed = time.perf_counter() - start
        except ChainError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the chain id
            raise ChainError(chain_id, repr(err), traceback.format_exc()) from None
        return ChunkResult(chain_id, new_state, draws, stats, num_steps, elapsed)
