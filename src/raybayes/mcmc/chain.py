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

__all__ = ["ChunkResult", "LowRankNUTS", "NUTSChainRunner", "chain_key", "SAMPLE_STATS"]

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
        warmup_points: with a low-rank mass matrix, for warmup chunks:
            ``(x, grad)``, the unconstrained draws and the potential's gradients
            there, each ``(num_steps, d)``; otherwise ``None``.
    """

    chain_id: int
    state: Any
    draws: dict[str, np.ndarray] | None
    stats: dict[str, np.ndarray]
    num_steps: int
    elapsed_s: float
    warmup_points: tuple | None = None


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
        low_rank_phases: with a low-rank plus diagonal mass matrix
            (:mod:`raybayes.mcmc.mass`), ``(first, later)``: the warmup iterations
            of the first phase (diagonal adaptation, in the model's unconstrained
            coordinates) and of each later phase, which runs in the coordinates
            ``y`` of the driver's latest estimate (``x = m + L y``;
            :meth:`switch_chain`); the last phase goes on into sampling.
            ``None`` (default): NumPyro's NUTS on the model as it is.

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
        low_rank_phases: tuple[int, int] | None = None,
    ):
        self.model = model
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.num_warmup = int(num_warmup)
        self.chunk_size = int(chunk_size)
        kernel_kwargs = dict(kernel_kwargs or {})
        kernel_kwargs.setdefault("init_strategy", init_to_uniform)
        self.low_rank_phases = low_rank_phases
        self.kernel = NUTS(model, **kernel_kwargs)
        self._kernel_kwargs = kernel_kwargs
        self._low_rank = None
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
            if self.low_rank_phases is not None:
                return _to_numpy(self._lowrank().init_chain(rng_key, init_params))
            return _to_numpy(self._init_state(rng_key, init_params))
        except Exception as err:  # noqa: BLE001 - re-raised with the chain id
            raise ChainError(chain_id, repr(err), traceback.format_exc()) from None

    def switch_chain(self, chain_id: int, state, old, new):
        """Move a chain to new low-rank coordinates and start its next warmup phase.

        The chain keeps its point and its key; its step size and diagonal are
        adapted afresh over the remaining warmup iterations.

        Args:
            chain_id: the chain's index (for error messages).
            state: its ``HMCState`` at the end of a phase (NumPy leaves).
            old: the :class:`~raybayes.mcmc.mass.LowRankMass` of ``state``.
            new: the new one.

        Returns:
            The chain's new ``HMCState`` (NumPy leaves).

        Raises:
            ChainError: the model raised, or the new point's density is not finite.
        """
        try:
            return _to_numpy(self._lowrank().switch(state, old, new))
        except Exception as err:  # noqa: BLE001 - re-raised with the chain id
            raise ChainError(chain_id, repr(err), traceback.format_exc()) from None

    def _lowrank(self):
        if self._low_rank is None:
            self._low_rank = _LowRankKernels(self)
        return self._low_rank

    def advance(self, chain_id: int, state, num_steps: int, collect: bool,
                mass=None, phase: int = 0) -> ChunkResult:
        """Advance a chain by ``num_steps <= chunk_size`` iterations.

        Args:
            chain_id: the chain's index (for error messages).
            state: its current ``HMCState`` (NumPy leaves).
            num_steps: iterations to run (warmup or sampling, as ``state.i`` says).
            collect: return the draws (sampling) or not (warmup).
            mass: with a low-rank mass matrix, the chain's current
                :class:`~raybayes.mcmc.mass.LowRankMass`; ``None`` otherwise.
            phase: with a low-rank mass matrix, the chain's warmup phase.

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
            start = time.perf_counter()
            points = None
            if mass is not None:
                lr = self._lowrank()
                state = jax.tree_util.tree_map(jnp.asarray, state)
                mass = jax.tree_util.tree_map(jnp.asarray, mass)
                chunk = lr.chunk[min(phase, 1)]
                new_state, (zs, xs, gs, stats) = chunk(state, num_steps, mass)
                zs = zs[:num_steps]
                draws = _to_numpy(lr.postprocess(zs, mass)) if collect else None
                if not collect:
                    points = (np.asarray(xs[:num_steps]), np.asarray(gs[:num_steps]))
            else:
                self._ensure_ready()
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
        return ChunkResult(chain_id, new_state, draws, stats, num_steps, elapsed, points)


def _stats_of(s):
    return {
        "diverging": s.diverging,
        "n_steps": s.num_steps,
        "step_size": s.adapt_state.step_size,
        "energy": s.energy,
        "acceptance_rate": s.accept_prob,
        "lp": -s.potential_energy,
    }


class LowRankNUTS:
    """NUTS on a flat potential in the coordinates ``y`` of a low-rank mass matrix.

    ``x = m + L y`` (:func:`raybayes.mcmc.mass.from_unit`); the
    :class:`~raybayes.mcmc.mass.LowRankMass` is an argument of every function
    (fixed shapes), so a new estimate compiles nothing. Two NumPyro HMC instances
    (``numpyro.infer.hmc.hmc``) hold the warmup schedules: phase 0 runs ``first``
    iterations with the identity map and NumPyro's diagonal adaptation (started from
    nutpie's ``1 / |gradient|``); every later phase runs ``later`` iterations in the
    latest estimate's coordinates (step size and a diagonal in ``y`` adapted afresh;
    one instance, as the phases have one length), the last one going on into
    sampling.

    The functions are pure and not jitted: chain-parallel NUTS jits them for one
    chain, data-sharded NUTS jits their ``vmap`` over the chain batch (its
    potential then evaluates every chain in one call to the shard workers).

    Args:
        potential: ``potential(x)``, the potential energy (negative log density) at
            a ``(dim,)`` unconstrained point; differentiable with :func:`jax.grad`.
        dim: length of ``x``.
        dtype: dtype of ``x``.
        phases: ``(first, later)`` warmup iterations of the first phase and of each
            later one.
        chunk_size: iterations of one :meth:`chunk` (shorter chunks are masked).
        target_accept_prob: NUTS target acceptance probability.
        max_tree_depth: NUTS maximum tree depth.

    References:
        Seyboldt, A., Carlson, E. & Carpenter, B. (2026). Low-rank mass-matrix
        adaptation by minimising the Fisher divergence, as in nutpie:
        https://github.com/pymc-devs/nutpie

    Examples:
        >>> from raybayes.mcmc.mass import identity_mass
        >>> core = LowRankNUTS(lambda x: 0.5 * jnp.sum(x**2), 2, jnp.float32,
        ...                    phases=(10, 10), chunk_size=5)
        >>> state = jax.jit(core.init)(jax.random.PRNGKey(0), jnp.ones(2))
        >>> chunk = jax.jit(core.chunk(0))
        >>> state, (y, x, grad, stats) = chunk(state, 5, identity_mass(2, 1))
        >>> x.shape, bool(jnp.allclose(grad, x))  # the gradient of |x|^2 / 2
        ((5, 2), True)
    """

    def __init__(self, potential, dim, dtype, phases, chunk_size, *,
                 target_accept_prob=0.8, max_tree_depth=10):
        from numpyro.infer.hmc import hmc

        from raybayes.mcmc import mass as mm

        self.dim = int(dim)
        self.chunk_size = int(chunk_size)
        self._mm = mm
        warmups = [int(n) for n in phases]

        def gen(pre):
            return lambda y: potential(mm.from_unit(pre, y))

        self._gen = gen
        settings = dict(
            target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth
        )
        self._phases = [hmc(potential_fn_gen=gen, algo="NUTS") for _ in range(2)]

        def start(phase, y, key, pre, inverse_mass_matrix=None):
            init_kernel = self._phases[phase][0]
            return init_kernel(y, warmups[phase], model_args=(pre,), rng_key=key,
                               inverse_mass_matrix=inverse_mass_matrix, **settings)

        self._start = start
        # Each HMC instance sets its schedule when its init is traced: do it once
        # here, so a worker can continue a chain another worker started.
        zero = jnp.zeros(self.dim, dtype)
        for phase in (0, 1):
            jax.eval_shape(lambda y, p=phase: start(p, y, jax.random.PRNGKey(0),
                                                     mm.identity_mass(self.dim, 1)), zero)

    def init(self, key, x0, inverse_mass=None):
        """The phase-0 state at ``x0`` ``(dim,)``, with nutpie's first diagonal
        (variance ``1 / |gradient|`` at ``x0``: NumPyro's identity can be off by
        orders of magnitude, and the first window's draws then are far from
        stationary), or ``inverse_mass`` ``(dim,)`` where it is not NaN."""
        pre = self._mm.identity_mass(self.dim, 1)
        g = jnp.abs(jax.grad(self._gen(pre))(x0))
        inv_mass = jnp.where(jnp.isfinite(g) & (g > 0), 1.0 / g, 1.0)
        if inverse_mass is not None:
            inv_mass = jnp.where(jnp.isnan(inverse_mass), inv_mass, inverse_mass)
        return self._start(0, x0, key, pre, jnp.clip(inv_mass, 1e-6, 1e6))

    def switch(self, state, old, new):
        """The chain at the same point (and key) in ``new``'s coordinates, at the
        start of the next phase."""
        mm = self._mm
        y = mm.to_unit(new, mm.from_unit(old, state.z))
        return self._start(1, y, state.rng_key, new)

    def step(self, phase, state, pre):
        """One NUTS iteration of a chain of warmup phase ``phase`` (0 or 1)."""
        return self._phases[min(phase, 1)][1](state, model_args=(pre,))

    def point(self, state, pre):
        """``(x, grad)`` of the state in the model's unconstrained coordinates (the
        potential's gradient)."""
        mm = self._mm
        return mm.from_unit(pre, state.z), mm.grad_from_unit(pre, state.z_grad)

    def chunk(self, phase):
        """``chunk(state, num_steps, pre) -> (state, (y, x, grad, stats))``: a
        ``lax.scan`` of :attr:`chunk_size` iterations, the first ``num_steps`` run
        (each output ``(chunk_size, ...)``)."""

        def chunk(state, num_steps, pre):
            def body(s, i):
                s = lax.cond(i < num_steps, lambda x: self.step(phase, x, pre),
                             lambda x: x, s)
                x, g = self.point(s, pre)
                return s, (s.z, x, g, _stats_of(s))

            return lax.scan(body, state, jnp.arange(self.chunk_size))

        return chunk


class _LowRankKernels:
    """:class:`LowRankNUTS` on a model's flattened unconstrained density, jitted for
    one chain."""

    _KERNEL_KEYS = {"target_accept_prob", "max_tree_depth", "init_strategy", "dense_mass",
                    "inverse_mass_matrix"}

    def __init__(self, runner: NUTSChainRunner):
        from jax.flatten_util import ravel_pytree
        from numpyro.infer.util import initialize_model

        from raybayes.mcmc import mass as mm

        kw = runner._kernel_kwargs
        unknown = set(kw) - self._KERNEL_KEYS
        if unknown or kw.get("dense_mass"):
            raise ValueError(
                "a low-rank mass matrix takes target_accept_prob, max_tree_depth, "
                "init_strategy and a diagonal inverse_mass_matrix only; got "
                f"{sorted(unknown) or 'dense_mass=True'}."
            )
        model, args, kwargs = runner.model, runner.model_args, runner.model_kwargs
        strategy = kw.get("init_strategy", init_to_uniform)
        info = initialize_model(jax.random.PRNGKey(0), model, model_args=args,
                                model_kwargs=kwargs, init_strategy=strategy)
        flat, unravel = ravel_pytree(info.param_info.z)
        self.dim = flat.shape[0]
        potential, constrain = info.potential_fn, info.postprocess_fn
        given = _given_inverse_mass(kw.get("inverse_mass_matrix"), unravel, flat)
        core = LowRankNUTS(
            lambda x: potential(unravel(x)), self.dim, flat.dtype,
            runner.low_rank_phases, runner.chunk_size,
            target_accept_prob=kw.get("target_accept_prob", 0.8),
            max_tree_depth=kw.get("max_tree_depth", 10),
        )

        def init(key, x0):
            key, key_init = jax.random.split(key)
            if x0 is None:
                z = initialize_model(key_init, model, model_args=args, model_kwargs=kwargs,
                                     init_strategy=strategy).param_info.z
                x0 = ravel_pytree(z)[0]
            return core.init(key, x0, given)

        self._init = jax.jit(init)
        self._unravel_flat = lambda p: ravel_pytree(p)[0]
        self._switch = jax.jit(core.switch)
        self.chunk = [jax.jit(core.chunk(0)), jax.jit(core.chunk(1))]
        self.postprocess = jax.jit(jax.vmap(
            lambda y, pre: constrain(unravel(mm.from_unit(pre, y))), in_axes=(0, None)))

    def init_chain(self, rng_key, init_params=None):
        x0 = None if init_params is None else self._unravel_flat(
            {k: jnp.asarray(v) for k, v in init_params.items()})
        state = self._init(jnp.asarray(rng_key), x0)
        _check_finite(state)
        return state

    def switch(self, state, old, new):
        tree = jax.tree_util.tree_map
        state = self._switch(tree(jnp.asarray, state), tree(jnp.asarray, old),
                             tree(jnp.asarray, new))
        _check_finite(state)
        return state


def _given_inverse_mass(structured, unravel, flat):
    """The first phase's initial diagonal ``(dim,)`` from NumPyro's structured form
    ``{(site,): diagonal}``, NaN for the sites not given (they get
    ``1 / |gradient|``); ``None`` without one."""
    if not structured:
        return None
    dim = flat.shape[0]
    given = np.full(dim, np.nan, np.float32)
    positions = unravel(jnp.arange(dim, dtype=flat.dtype))
    for key, diag in structured.items():
        names = key if isinstance(key, tuple) else (key,)
        if len(names) != 1 or names[0] not in positions:
            raise ValueError(
                f"inverse_mass_matrix key {key!r}: with a low-rank mass matrix give "
                "one diagonal per site, keyed (site,), of the model's sites "
                f"{sorted(positions)}."
            )
        idx = np.asarray(positions[names[0]]).astype(np.int64).ravel()
        diag = np.asarray(diag, np.float32).ravel()
        if diag.shape != idx.shape or not np.all(np.isfinite(diag) & (diag > 0)):
            raise ValueError(
                f"inverse_mass_matrix[{key!r}] must be {idx.size} positive finite "
                f"variances, got shape {diag.shape}."
            )
        given[idx] = diag
    return jnp.asarray(given)


def _check_finite(state):
    finite = np.isfinite(np.asarray(state.potential_energy)) and bool(
        np.all(np.isfinite(np.asarray(state.z_grad))))
    if not finite:
        raise RuntimeError(
            "the log density or its gradient is not finite at the chain's point "
            f"(potential energy {float(state.potential_energy)}); check the model's "
            "supports and data, or pass init_params."
        )
