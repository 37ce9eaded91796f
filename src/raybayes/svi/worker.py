"""The SVI shard worker: one shard's data, its local variational parameters and
their optimizer state, and the shard's term of the ELBO gradient.

The ELBO of a model split into S shards (global sites scaled by ``1/S``, see
:mod:`raybayes.core.shard_density`) is

    ELBO = sum_s E_q[log p_s(g, l_s)] + sum_s H[q(l_s)] + H[q(g)].

Each step, the parameter server sends the global variational parameters theta and
the step's clock. Every shard draws the *same* globals ``g = g(theta, eps)``
(``eps`` from the clock's key, shared by all shards), subsamples ``B`` of its
``P_s`` entities with its own key, draws their locals, and returns the gradient of
its term with respect to theta. The estimate is unbiased for the full-data
gradient because the entity terms are scaled by ``P_s / B`` (Hoffman et al.,
"Stochastic variational inference", JMLR 2013). Each sampled entity's own
variational parameters get the exact gradient of its own terms and are updated on
the shard by an optimizer applied row by row (lazily: rows not sampled keep their
state), so local parameters never leave the worker.

With the structured guide (``family="structured"``) entity ``i``'s locals are drawn
with the step's global noise, ``z_i = m_i + A_i eps_g + L_i eps_i`` (see
:mod:`raybayes.svi.guides`); ``A_i`` and ``L_i`` are local parameters like ``m_i``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.primitives import Messenger

from raybayes.config import derive_key
from raybayes.core.shard_density import model_log_density
from raybayes.distributed import ShardWorker, worker_precision
from raybayes.errors import ConfigurationError
from raybayes.checkpoint import load_checkpoint, save_checkpoint
from raybayes.svi.guides import GlobalGuide, softplus_inv

__all__ = ["SVIShardWorker", "SVIWorkerConfig", "minibatch_scale"]


@dataclasses.dataclass(frozen=True)
class SVIWorkerConfig:
    """The settings every SVI shard worker receives (``configure_svi``).

    Attributes:
        family: ``"normal"`` (mean-field), ``"lowrank"`` (low-rank global block) or
            ``"structured"`` (locals conditioned on the globals, see
            :mod:`raybayes.svi.guides`).
        rank: rank of the low-rank global factor (``None``: mean-field, or
            full-rank for ``"structured"``).
        init_scale: initial standard deviation of the guide (unconstrained).
        subsample_size: entities per shard per step; ``None``: all of them.
        num_particles: Monte Carlo draws of the latents per step.
        seed: the run's integer seed (step keys are
            ``fold_in(derive_key(seed), clock)``).
        local_optimizer: the optax transformation of the local variational
            parameters (applied row by row).
        checkpoint_dir: where the shard writes its checkpoint, or ``None``.
        init_params: constrained initial means of some latent sites (local sites
            over the whole plate).
        slowdown: ``(factor, probability)`` of an artificial slowdown (tests of
            bounded staleness), or ``None``.
    """

    family: str
    rank: int | None
    init_scale: float
    subsample_size: int | None
    num_particles: int
    seed: int
    local_optimizer: Any
    checkpoint_dir: str | None = None
    init_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    slowdown: tuple[float, float] | None = None


class minibatch_scale(Messenger):  # noqa: N801 - a NumPyro handler
    """Scale global sites by ``1/S``, local sites by ``P_s/B``; mask padded rows.

    Args:
        fn: the model.
        global_scale: ``1 / num_shards``.
        local_scale: ``P_s / B`` (1 without subsampling).
        local_plates: plates whose sites belong to the shard.
        obs_plate: plate of the observation sites (receives ``mask``).
        mask: ``(B * M,)`` bool, ``False`` on padding rows, or ``None``.
    """

    def __init__(
        self,
        fn=None,
        global_scale=1.0,
        local_scale=1.0,
        local_plates=(),
        obs_plate=None,
        mask=None,
    ):
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.local_plates = frozenset(local_plates)
        self.obs_plate = obs_plate
        self.mask = mask
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        frames = {f.name for f in msg.get("cond_indep_stack", ())}
        factor = self.local_scale if frames & self.local_plates else self.global_scale
        msg["scale"] = factor if msg.get("scale") is None else factor * msg["scale"]
        if self.mask is not None and self.obs_plate in frames:
            msg["fn"] = msg["fn"].mask(self.mask)


class SVIShardWorker(ShardWorker):
    """A :class:`~raybayes.distributed.sharded.ShardWorker` that also runs SVI steps.

    Call :meth:`setup`, then :meth:`configure_svi`, then :meth:`step` once per
    clock. All methods return NumPy arrays or plain Python values.
    """

    # ----------------------------------------------------------------- set-up
    @worker_precision
    def configure_svi(self, cfg: SVIWorkerConfig | Mapping[str, Any]) -> dict:
        """Prepare the minibatch index and the local variational state.

        Args:
            cfg: an :class:`SVIWorkerConfig` (or a mapping of its fields).

        Returns:
            ``{"num_local_entities", "batch_size", "num_rows", "data_bytes"}``.

        Raises:
            ConfigurationError: ``subsample_size`` larger than the shard.
        """
        self._check()
        if not isinstance(cfg, SVIWorkerConfig):
            cfg = SVIWorkerConfig(**cfg)
        d = self.density
        self.cfg = cfg
        P, k = d.num_local_entities, d.num_local_per_entity
        part = self.partition
        B = cfg.subsample_size
        num_units = P if d.local_sites else self._num_units()
        if B is not None and B > num_units:
            raise ConfigurationError(
                f"subsample_size={B} but shard {self.shard_id} holds only {num_units} "
                f"entries of plate {part.plate!r}; use subsample_size <= {num_units} "
                "(the smallest shard), fewer shards, or None for no subsampling."
            )
        self.num_units = num_units
        self.batch_size = num_units if B is None else int(B)
        self.subsample = B is not None and B < num_units
        self.local_scale = num_units / self.batch_size
        if self.subsample and d.max_plate_nesting is not None:
            raise ConfigurationError(
                f"subsample_size={B} with enumerated discrete sites: a minibatch "
                "scale would multiply each enumerated term before it is summed out, "
                "not the marginal log likelihood of a row. Use subsample_size=None "
                "for a model with infer={'enumerate': 'parallel'} sites."
            )
        self.global_scale = 1.0 / len(self.specs)
        self.guide = GlobalGuide(
            d.num_global, cfg.family, cfg.rank, cfg.init_scale
        )
        self.num_particles = int(cfg.num_particles)
        dtype = jnp.result_type(float)
        self.key = derive_key(int(cfg.seed))
        # Arrays sorted by entity, so a minibatch of entities is a padded gather.
        arrays = dict(d.arrays)
        self._mask_plate = None
        if self.subsample and part is not None and part.index_arg is not None:
            index = np.asarray(arrays[part.index_arg])
            order = np.argsort(index, kind="stable")
            for name in part.obs_args:
                if arrays.get(name) is not None and np.ndim(arrays[name]) >= 1:
                    arrays[name] = jnp.asarray(np.asarray(arrays[name])[order])
            counts = np.bincount(index, minlength=num_units)
            self._counts = jnp.asarray(counts)
            self._starts = jnp.asarray(np.cumsum(counts) - counts)
            self._max_count = int(max(counts.max(initial=0), 1))
            self._mask_plate = part.obs_plate
        self._arrays_sorted = arrays
        # Local variational parameters and their row-wise optimizer state.
        init_global, loc = self._initial_values(dict(cfg.init_params or {}))
        loc = np.asarray(loc).astype(dtype)
        self.phi = {
            "loc": jnp.asarray(loc),
            "scale_raw": jnp.full((P, k), softplus_inv(cfg.init_scale), dtype),
        }
        # Structured guide: L_i's strictly lower triangle and the coupling to the
        # global noise, both 0 at the start (the mean-field guide's q).
        self.structured = cfg.family == "structured" and k > 0
        if self.structured:
            self.phi["tril"] = jnp.zeros((P, k, k), dtype)
            self.phi["coupling"] = jnp.zeros((P, k, self.guide.noise_size), dtype)
        self.local_opt = cfg.local_optimizer
        self.local_state = jax.vmap(self.local_opt.init)(self.phi)
        self.clock = 0
        self._slow = cfg.slowdown
        self._slow_rng = np.random.default_rng(1000 + self.shard_id)
        self._step_fn = jax.jit(self._step_impl)
        self._subsample_fn = jax.jit(lambda clock: self._indices(self._keys(clock)[1]))
        data_bytes = int(sum(np.asarray(v).nbytes for v in d.arrays.values()))
        return dict(
            init_global=np.asarray(init_global),
            num_local_entities=P,
            batch_size=self.batch_size,
            num_rows=self.num_rows(),
            data_bytes=data_bytes,
        )

    def _initial_values(self, init_params):
        """Unconstrained ``(G,)`` and ``(P_s, k)`` means from constrained values.

        Local sites are given with the full plate; the shard takes its entities.
        """
        d = self.density
        d.check_site_names(init_params)
        params = d.unflatten(d.init_global(), d.init_local())
        for name, value in init_params.items():
            site = d.sites[name]
            value = np.asarray(value)
            if site.is_local and len(self.entity_ids):
                value = np.take(
                    value, self.entity_ids, axis=site.constrained_entity_axis
                )
            if value.shape != site.shape:
                raise ConfigurationError(
                    f"init_params[{name!r}] has shape {value.shape} on shard "
                    f"{self.shard_id}; site {name!r} has shape {site.shape} there "
                    "(local sites are given for the whole plate)."
                )
            params[name] = site.transform.inv(jnp.asarray(value))
        return d.flatten(params)

    def _num_units(self):
        """Rows of the split plate when it has no latent variables (a GLM's rows)."""
        part = self.partition
        if part is None:
            return 1
        for name in part.entity_args:
            if self.kwargs.get(name) is not None:
                return int(np.shape(self.kwargs[name])[0])
        return self.num_rows()

    # ------------------------------------------------------------- minibatch
    def _batch(self, arrays, idx):
        """Model arguments of the entities ``idx`` ``(B,)``, and the padding mask."""
        part = self.partition
        if not self.subsample:
            return arrays, dict(self.density.static_kwargs), None
        out = dict(arrays)
        static = dict(self.density.static_kwargs)
        for name in part.entity_args:
            if out.get(name) is not None:
                out[name] = out[name][idx]
        if part.size_arg is not None:
            static[part.size_arg] = self.batch_size
        mask = None
        if part.index_arg is not None:
            M = self._max_count
            offs = jnp.arange(M)
            cnt = self._counts[idx]
            rows = self._starts[idx][:, None] + jnp.minimum(
                offs[None, :], jnp.maximum(cnt - 1, 0)[:, None]
            )
            rows = rows.reshape(-1)
            mask = (offs[None, :] < cnt[:, None]).reshape(-1)
            for name in part.obs_args:
                if name != part.index_arg and out.get(name) is not None:
                    out[name] = out[name][rows]
            out[part.index_arg] = jnp.repeat(
                jnp.arange(self.batch_size, dtype=arrays[part.index_arg].dtype), M
            )
        return out, static, mask

    def _log_joint(self, g, lm, arrays, static, mask):
        """Scaled log joint (unconstrained, Jacobians included) of a minibatch."""
        d = self.density
        params = d.unflatten(g, lm)
        constrained, log_det = {}, 0.0
        for name, u in params.items():
            s = d.sites[name]
            x = s.transform(u)
            constrained[name] = x
            ld = jnp.sum(s.transform.log_abs_det_jacobian(u, x))
            log_det = log_det + ld * (
                self.local_scale if s.is_local else self.global_scale
            )
        local_plates = self.partition.local_plates if self.partition is not None else ()
        model = minibatch_scale(
            self.model,
            self.global_scale,
            self.local_scale,
            local_plates,
            self._mask_plate,
            mask,
        )
        lp = model_log_density(
            model,
            self.model_args,
            {**arrays, **static},
            constrained,
            d.max_plate_nesting,
        )
        return lp + log_det

    # ------------------------------------------------------------------ step
    def _keys(self, clock):
        kc = jax.random.fold_in(self.key, clock)
        return (
            jax.random.fold_in(kc, 0),
            jax.random.fold_in(kc, 1),
            jax.random.fold_in(kc, 2),
        )

    def _indices(self, key_sub):
        if not self.subsample:
            return jnp.arange(self.num_units)
        key = jax.random.fold_in(key_sub, self.shard_id)  # never the same on two shards
        idx = jax.random.choice(key, self.num_units, (self.batch_size,), replace=False)
        return jnp.sort(idx)

    def _local_noise(self, key_loc, idx):
        K, k = self.num_particles, self.density.num_local_per_entity
        ids = jnp.asarray(self.entity_ids)[idx] if len(self.entity_ids) else idx
        eps = jax.vmap(
            lambda e: jax.random.normal(jax.random.fold_in(key_loc, e), (K, k))
        )(ids)
        return jnp.swapaxes(eps, 0, 1).astype(jnp.result_type(float))  # (K, B, k)

    def _structured_factors(self, phi):
        """``L_i`` ``(B, k, k)`` and ``A_i`` ``(B, k, G + rank)`` of the structured
        guide (scaled parameterization, see :mod:`raybayes.svi.guides`)."""
        scale = jax.nn.softplus(phi["scale_raw"])
        k = scale.shape[-1]
        unit = jnp.eye(k, dtype=scale.dtype) + jnp.tril(phi["tril"], -1)
        width = phi["coupling"].shape[-1]
        coupling = scale[..., None] * phi["coupling"] / np.sqrt(max(width, 1))
        return scale[..., None] * unit, coupling

    def _locals(self, phi, eps_l, eps_g):
        """Locals ``(K, B, k)`` from noise ``eps_l`` ``(K, B, k)`` and, for the
        structured guide, the step's global noise ``eps_g`` ``(K, G + rank)``."""
        if not self.structured:
            return phi["loc"] + jax.nn.softplus(phi["scale_raw"]) * eps_l
        tril, coupling = self._structured_factors(phi)
        return (
            phi["loc"]
            + jnp.einsum("bij,kbj->kbi", tril, eps_l)
            + jnp.einsum("bij,kj->kbi", coupling, eps_g)
        )

    def _objective(self, theta, phi_b, eps_g, eps_l, arrays, static, mask):
        g = self.guide.sample(theta, eps_g)  # (K, G)
        lm = self._locals(phi_b, eps_l, eps_g)  # (K, B, k)
        lp = jax.vmap(lambda gi, li: self._log_joint(gi, li, arrays, static, mask))(
            g, lm
        )
        ent = self.local_scale * jnp.sum(jnp.log(jax.nn.softplus(phi_b["scale_raw"])))
        return -(jnp.mean(lp) + ent)

    def _step_impl(self, theta, phi, state, clock, arrays):
        key_g, key_sub, key_loc = self._keys(clock)
        eps_g = jax.random.normal(
            key_g, (self.num_particles, self.guide.noise_size), jnp.result_type(float)
        )
        idx = self._indices(key_sub)
        batch, static, mask = self._batch(arrays, idx)
        has_local = self.density.num_local_per_entity > 0
        phi_b = jax.tree.map(lambda x: x[idx], phi) if has_local else phi
        eps_l = (
            self._local_noise(key_loc, idx)
            if has_local
            else jnp.zeros((self.num_particles, phi["loc"].shape[0], 0))
        )
        loss, (g_theta, g_phi) = jax.value_and_grad(self._objective, argnums=(0, 1))(
            theta, phi_b, eps_g, eps_l, batch, static, mask
        )
        if has_local:
            # Each sampled entity's own terms, unscaled: its exact gradient.
            g_phi = jax.tree.map(lambda x: x / self.local_scale, g_phi)
            state_b = jax.tree.map(lambda x: x[idx], state)
            updates, state_b = jax.vmap(self.local_opt.update)(g_phi, state_b, phi_b)
            phi_b = optax.apply_updates(phi_b, updates)
            phi = jax.tree.map(lambda full, rows: full.at[idx].set(rows), phi, phi_b)
            state = jax.tree.map(
                lambda full, rows: full.at[idx].set(rows), state, state_b
            )
        return loss, g_theta, phi, state

    @worker_precision
    def step(self, theta: dict, clock: int) -> tuple[float, dict, int]:
        """One SVI step at ``clock``: update the locals, return the global gradient.

        Args:
            theta: global variational parameters (NumPy arrays).
            clock: the step number; it selects the shared global noise and this
                shard's subsample.

        Returns:
            ``(loss_s, grad_theta, clock)``: this shard's term of the negative ELBO
            estimate and its gradient with respect to ``theta``.
        """
        self._check()
        start = time.perf_counter()
        theta = {k: jnp.asarray(v) for k, v in theta.items()}
        loss, g_theta, self.phi, self.local_state = self._step_fn(
            theta, self.phi, self.local_state, clock, self._arrays_sorted
        )
        g_theta = {k: np.asarray(v) for k, v in g_theta.items()}
        self.clock = clock + 1
        if self._slow is not None:
            factor, prob = self._slow
            if self._slow_rng.random() < prob:
                time.sleep((factor - 1.0) * (time.perf_counter() - start))
        return float(loss), g_theta, clock

    @worker_precision
    def trial_step(self, theta: dict, clock: int) -> dict:
        """The step :meth:`step` would take at ``clock``, without keeping it.

        Nothing changes on the worker: the same clock gives the same global noise,
        subsample and local noise as :meth:`step`, so tests and diagnostics can
        compare steps from one state (e.g. a subsampled step against a full one).

        Args:
            theta: global variational parameters (NumPy arrays).
            clock: the step number.

        Returns:
            ``{"loss": float, "grad_theta": {name: array}, "local_loc": (P_s, k)
            local means after the step, "subsample": (B,) the shard's entities
            (rows of ``local_loc``) in this step's subsample}``.
        """
        self._check()
        theta = {k: jnp.asarray(v) for k, v in theta.items()}
        loss, g_theta, phi, _ = self._step_fn(
            theta, self.phi, self.local_state, clock, self._arrays_sorted
        )
        return dict(
            loss=float(loss),
            grad_theta={k: np.asarray(v) for k, v in g_theta.items()},
            local_loc=np.asarray(phi["loc"]),
            subsample=np.asarray(self._subsample_fn(clock)),
        )

    # ------------------------------------------------------------ diagnostics
    @worker_precision
    def check_init(self, theta: dict) -> list[tuple[str, int, int]]:
        """Sites whose log density is not finite at the initial guide means.

        Returns:
            ``[(site, num_nonfinite, size)]``, empty when the ELBO is finite.
        """
        d = self.density
        g = jnp.asarray(theta["loc"], dtype=jnp.result_type(float))
        lm = self.phi["loc"]
        params = d.constrain(d.unflatten(g, lm))
        arrays = {**d.arrays, **d.static_kwargs}
        tr = handlers.trace(handlers.substitute(handlers.seed(self.model, 0), params))
        tr = tr.get_trace(*self.model_args, **arrays)
        bad = []
        for name, site in tr.items():
            if site["type"] != "sample":
                continue
            lp = np.asarray(site["fn"].log_prob(site["value"]))
            n = int(np.sum(~np.isfinite(lp)))
            if n:
                bad.append((name, n, int(lp.size)))
        return bad

    # ------------------------------------------------------------ checkpoints
    def _ckpt_path(self):
        return os.path.join(
            self.cfg.checkpoint_dir, f"shard-{self.shard_id:04d}.npz"
        )

    def save_checkpoint(self, version: int) -> None:
        """Write this shard's locals and optimizer state (atomically)."""
        record = dict(
            version=int(version),
            clock=int(self.clock),
            entity_ids=np.asarray(self.entity_ids),
            phi=jax.tree.map(np.asarray, self.phi),
            state=jax.tree.map(np.asarray, self.local_state),
        )
        save_checkpoint(self._ckpt_path(), record)

    @worker_precision
    def load_checkpoint(self) -> int | None:
        """Restore this shard's locals from its checkpoint; returns its version."""
        path = self._ckpt_path()
        record = load_checkpoint(path)
        if record is None:
            return None
        if not np.array_equal(record["entity_ids"], self.entity_ids):
            raise ConfigurationError(
                f"checkpoint {path} holds other entities than shard {self.shard_id}; "
                "resume with the same data, partition and num_shards, or use a new "
                "checkpoint_dir."
            )
        self.phi = jax.tree.map(jnp.asarray, record["phi"])
        self.local_state = jax.tree.map(jnp.asarray, record["state"])
        self.clock = int(record["clock"])
        return int(record["version"])

    # ---------------------------------------------------------------- results
    def local_params(self) -> dict:
        """``{"loc", "scale"}`` ``(P_s, k)`` and the shard's global entity ids.

        For the structured guide also ``scale_tril`` ``(P_s, k, k)`` (``L_i``,
        its diagonal is ``scale``) and ``coupling`` ``(P_s, k, G + rank)``
        (``A_i``: ``z_i = loc_i + A_i eps + L_i eps_i`` where the globals are
        ``mu + L eps``).
        """
        scale = jax.nn.softplus(self.phi["scale_raw"])
        out = dict(
            loc=np.asarray(self.phi["loc"]),
            scale=np.asarray(scale),
            entity_ids=np.asarray(
                self.entity_ids if self.density.num_local_per_entity else []
            ).astype(np.int64),
        )
        if self.structured:
            tril, coupling = self._structured_factors(self.phi)
            out["scale_tril"] = np.asarray(tril)
            out["coupling"] = np.asarray(coupling)
        return out

    @worker_precision
    def q_constrained_values(
        self, global_draws, rng_key, lo, hi, num_draws, global_noise=None
    ):
        """Constrained sites for draws ``lo .. hi - 1`` of ``num_draws`` from q.

        The locals are drawn here (keyed by entity id, see :meth:`local_draws`),
        the globals are given ``(hi - lo, G)``; see :meth:`constrained_values` for
        the output. The structured guide needs the globals' noise
        ``global_noise`` ``(hi - lo, G + rank)`` too (its locals are drawn given
        the globals).

        Raises:
            ConfigurationError: a structured guide without ``global_noise``.
        """
        local = self.local_draws(num_draws, rng_key)[lo:hi]
        if self.structured:
            if global_noise is None:
                raise ConfigurationError(
                    "the structured guide draws the locals given the globals: "
                    "pass global_noise (shape (draws, G + rank))."
                )
            _, coupling = self._structured_factors(self.phi)
            local = local + np.einsum(
                "pij,dj->dpi", np.asarray(coupling), np.asarray(global_noise)
            )
        return self.constrained_values(global_draws, local)

    @worker_precision
    def local_draws(self, num_draws: int, rng_key) -> np.ndarray:
        """``(num_draws, P_s, k)`` draws of the locals from q.

        Entity ``e`` uses ``fold_in(fold_in(rng_key, 1), e)``: the same draws on
        any shard, and never the stream of the globals' noise
        (``fold_in(rng_key, 0)``, drawn by the server).
        For the structured guide these are draws at the globals' mean
        (``g = mu``); :meth:`q_constrained_values` adds ``A_i eps``.
        """
        key = jax.random.fold_in(rng_key, 1)
        k = self.density.num_local_per_entity
        if k == 0:  # no local latent sites (e.g. a split of the observations)
            return np.zeros((num_draws, self.density.num_local_entities, 0))
        ids = jnp.asarray(self.entity_ids) if len(self.entity_ids) else jnp.arange(0)
        z = jax.vmap(
            lambda e: jax.random.normal(jax.random.fold_in(key, e), (num_draws, k))
        )(ids)
        z = jnp.swapaxes(z, 0, 1).astype(self.phi["loc"].dtype)
        eps_g = jnp.zeros((num_draws, self.guide.noise_size), z.dtype)
        return np.asarray(self._locals(self.phi, z, eps_g))
