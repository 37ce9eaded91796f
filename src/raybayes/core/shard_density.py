"""The shard log density: the model on one shard, global sites scaled by 1/num_shards.

If the data of a model are split along a plate into S shards, every site inside the
split plate (or the observation plate that follows it) belongs to exactly one shard,
and every other site (the global parameters) appears in all S. Scaling the global
sites by 1/S (``numpyro.handlers.scale``) makes the sum of the S shard log joints
equal the full log joint, exactly, and so also its gradient and Hessian. Distributed
MAP, Laplace, SVI and HMC built on this sum are exact, not approximations.

Everything here is pure JAX/NumPyro and runs without Ray.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density as _numpyro_log_density

from raybayes.core.hessian_coloring import ColoredGlobalHessian
from raybayes.core.partition import Partition
from raybayes.core.tracing import abstract_trace
from raybayes.errors import ConfigurationError

__all__ = [
    "CompiledShardFunctions",
    "SiteInfo",
    "ShardLogDensity",
    "scale_global_sites",
    "shard_log_density",
    "enumerated_sites",
    "model_log_density",
    "trace_latent_sites",
]


def enumerated_sites(trace) -> dict[str, int]:
    """The latent discrete sites of a trace marked for enumeration.

    Args:
        trace: a NumPyro trace (:func:`~raybayes.core.tracing.abstract_trace`).

    Returns:
        site name -> its outermost plate dimension's depth (``-min(dim)`` over the
        plates of the site, 0 outside plates), in trace order; empty when the model
        enumerates nothing.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model():
        ...     with numpyro.plate("data", 3):
        ...         numpyro.sample("z", dist.Bernoulli(0.5),
        ...                        infer={"enumerate": "parallel"})
        >>> enumerated_sites(abstract_trace(model))
        {'z': 1}
    """
    out = {}
    for name, site in trace.items():
        if (
            site["type"] == "sample"
            and not site.get("is_observed")
            and (site.get("infer") or {}).get("enumerate") == "parallel"
            and getattr(site["fn"].support, "is_discrete", False)
        ):
            frames = site.get("cond_indep_stack", ())
            dims = [f.dim for f in frames if f.dim is not None]
            out[name] = -min(dims, default=0)
    return out


def _max_plate_nesting(trace) -> int:
    """The deepest plate of a trace (NumPyro's ``max_plate_nesting``)."""
    dims = [
        -f.dim
        for site in trace.values()
        for f in site.get("cond_indep_stack", ())
        if f.dim is not None
    ]
    return max(dims, default=0)


def model_log_density(
    model: Callable,
    model_args: tuple,
    model_kwargs: Mapping[str, Any],
    params: Mapping[str, Any],
    max_plate_nesting: int | None = None,
) -> jax.Array:
    """The log joint of a model at ``params``, enumerated sites summed out.

    Without enumeration (``max_plate_nesting=None``) this is
    ``numpyro.infer.util.log_density``. With it, the discrete sites marked
    ``infer={"enumerate": "parallel"}`` are marginalised exactly by
    ``numpyro.contrib.funsor.log_density`` (variable elimination over the plates,
    Obermeyer et al. 2019, "Tensor variable elimination for plated factor graphs"),
    as NumPyro's MCMC does.

    Args:
        model: a NumPyro model (with any handlers, e.g. scales, applied).
        model_args, model_kwargs: its arguments.
        params: constrained values of the continuous latent sites.
        max_plate_nesting: the model's deepest plate, or ``None`` (no enumeration).

    Returns:
        Scalar log density.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     loc = numpyro.sample("loc", dist.Normal(0, 1))
        ...     with numpyro.plate("data", 2):
        ...         z = numpyro.sample("z", dist.Bernoulli(0.5),
        ...                            infer={"enumerate": "parallel"})
        ...         numpyro.sample("y", dist.Normal(loc * z, 1), obs=y)
        >>> lp = model_log_density(model, (jnp.zeros(2),), {}, {"loc": 0.0}, 1)
        >>> round(float(lp), 4)  # log N(0|0,1) + 2 log N(0|0,1): z does not matter
        -2.7568
    """
    if max_plate_nesting is None:
        lp, _ = _numpyro_log_density(
            model, tuple(model_args), dict(model_kwargs), params
        )
        return lp
    from numpyro.contrib.funsor import enum
    from numpyro.contrib.funsor import log_density as _enum_log_density

    lp, _ = _enum_log_density(
        enum(model, -int(max_plate_nesting) - 1),
        tuple(model_args),
        dict(model_kwargs),
        params,
    )
    return lp


class scale_global_sites(handlers.scale):  # noqa: N801 - a NumPyro handler
    """``numpyro.handlers.scale`` applied only to sites outside ``local_plates``.

    Args:
        fn: the model.
        scale: the factor, ``1 / num_shards``.
        local_plates: names of the plates whose sites are left unscaled.
    """

    def __init__(self, fn=None, scale=1.0, local_plates=frozenset()):
        self.local_plates = frozenset(local_plates)
        super().__init__(fn, scale)

    def process_message(self, msg):
        frames = {f.name for f in msg.get("cond_indep_stack", ())}
        if msg["type"] == "sample" and not frames & self.local_plates:
            super().process_message(msg)


@dataclass(frozen=True)
class SiteInfo:
    """A latent sample site, as traced.

    Attributes:
        name: site name.
        shape: constrained value shape.
        unconstrained_shape: shape in the unconstrained space.
        plates: names of the plates enclosing the site.
        is_local: whether the site belongs to a shard (inside a local plate).
        entity_axis: axis of the split plate in the unconstrained value (local
            sites), else ``None``.
        constrained_entity_axis: the same axis in the constrained value.
    """

    name: str
    shape: tuple
    unconstrained_shape: tuple
    plates: tuple
    is_local: bool
    entity_axis: int | None
    constrained_entity_axis: int | None
    support: Any

    @property
    def transform(self):
        return biject_to(self.support)


def _split_kwargs(model_kwargs):
    arrays = {
        k: v for k, v in model_kwargs.items() if isinstance(v, (np.ndarray, jax.Array))
    }
    static = {k: v for k, v in model_kwargs.items() if k not in arrays}
    return arrays, static


def trace_latent_sites(
    model: Callable,
    model_kwargs: Mapping[str, Any],
    partition: Partition | None = None,
    model_args: tuple = (),
) -> tuple[dict[str, SiteInfo], dict]:
    """Trace a model once and describe its latent sites and plates.

    Args:
        model: a NumPyro model.
        model_kwargs: its keyword arguments.
        partition: the split, or ``None`` (every site global).
        model_args: positional arguments.

    Returns:
        ``(sites, trace)``: latent site name -> :class:`SiteInfo` (trace order), and
        the NumPyro trace (taken abstractly: latent values are shapes only, see
        :func:`~raybayes.core.tracing.abstract_trace`).

    Sites marked ``infer={"enumerate": "parallel"}`` are summed out of the log
    density (:func:`model_log_density`), so they are not parameters and are left
    out of ``sites``.

    Raises:
        ConfigurationError: a latent site sits in the observation plate but not in
            the split plate (its values would have no entity to follow); an
            enumerated site outside the split plates (summing it out couples the
            shards).
    """
    tr = abstract_trace(model, model_args, model_kwargs)
    local = partition.local_plates if partition is not None else frozenset()
    enumerated = enumerated_sites(tr)
    sites = {}
    for name, site in tr.items():
        if site["type"] != "sample" or site.get("is_observed"):
            continue
        if name in enumerated:
            plates = {f.name for f in site.get("cond_indep_stack", ())}
            if partition is not None and not plates & local:
                raise ConfigurationError(
                    f"enumerated site {name!r} is outside the split plate "
                    f"{partition.plate!r}: it is summed out of the whole data at once "
                    "(one value shared by every shard), so the log joint is not a sum "
                    "over shards. Put it inside the plate that is split, use "
                    "num_shards=1, or run raybayes.sample."
                )
            continue
        frames = site.get("cond_indep_stack", ())
        plates = tuple(f.name for f in frames)
        is_local = bool(local & set(plates))
        shape = tuple(np.shape(site["value"]))
        support = site["fn"].support
        if getattr(support, "is_discrete", False):
            raise ConfigurationError(
                f"latent site {name!r} is discrete ({type(support).__name__}); MAP and "
                "Laplace need continuous latent variables. Mark it "
                "infer={'enumerate': 'parallel'} to sum it out, pass its observed "
                "value, or marginalise it (e.g. an HMM's states with the forward "
                "algorithm)."
            )
        t = biject_to(support)
        ushape = tuple(t.inverse_shape(shape))
        axis = caxis = None
        if is_local:
            if partition.plate not in plates:
                raise ConfigurationError(
                    f"latent site {name!r} is in plate {partition.obs_plate!r} but not "
                    f"in the split plate {partition.plate!r}; per-observation latent "
                    "variables need the observation plate itself as the split plate."
                )
            frame = next(f for f in frames if f.name == partition.plate)
            event_dim = len(site["fn"].event_shape)
            caxis = len(shape) - event_dim + frame.dim
            axis = len(ushape) - t.domain.event_dim + frame.dim
        sites[name] = SiteInfo(
            name, shape, ushape, plates, is_local, axis, caxis, support
        )
    return sites, tr


class ShardLogDensity:
    """The log joint of one shard, in the unconstrained space, as flat JAX functions.

    Parameters are held as a flat vector of the global sites (``global_flat``,
    shape ``(num_global,)``) and an entity-major matrix of the local sites
    (``local_mat``, shape ``(num_local_entities, num_local_per_entity)``): row ``i``
    holds every unconstrained local value of the shard's entity ``i``. Because
    entities are conditionally independent given the globals, the local Hessian is
    block diagonal with one ``(k, k)`` block per row.

    Args:
        model: a NumPyro model.
        shard_kwargs: the shard's model arguments (see
            :func:`~raybayes.core.partition.shard_model_kwargs`), or the full
            arguments with ``num_shards=1``.
        partition: the split, or ``None`` for an unsplit model.
        num_shards: S, the factor of the global sites is ``1/S``.
        model_args: positional model arguments (not sharded).

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> d = ShardLogDensity(model, {"y": np.zeros(3)})
        >>> float(d.log_density(jnp.zeros(1), d.init_local()))  # 4 * log N(0|0,1)
        -3.675754...
    """

    def __init__(
        self,
        model: Callable,
        shard_kwargs: Mapping[str, Any],
        partition: Partition | None = None,
        num_shards: int = 1,
        model_args: tuple = (),
    ):
        self.model = model
        self.partition = partition
        self.num_shards = int(num_shards)
        self.model_args = tuple(model_args)
        self.sites, self.trace = trace_latent_sites(
            model, shard_kwargs, partition, model_args
        )
        self.max_plate_nesting = (
            _max_plate_nesting(self.trace) if enumerated_sites(self.trace) else None
        )
        self.global_sites = [s for s in self.sites.values() if not s.is_local]
        self.local_sites = [s for s in self.sites.values() if s.is_local]
        self.num_global = int(
            sum(np.prod(s.unconstrained_shape, dtype=int) for s in self.global_sites)
        )
        if self.local_sites:
            first = self.local_sites[0]
            self.num_local_entities = int(first.unconstrained_shape[first.entity_axis])
        else:
            self.num_local_entities = 0
        self._local_widths = [
            int(np.prod(s.unconstrained_shape, dtype=int))
            // max(self.num_local_entities, 1)
            for s in self.local_sites
        ]
        self.num_local_per_entity = int(sum(self._local_widths))
        self._arrays, self._static = _split_kwargs(dict(shard_kwargs))
        self._arrays = {k: jnp.asarray(v) for k, v in self._arrays.items()}
        local_plates = partition.local_plates if partition is not None else frozenset()
        self._scaled_model = scale_global_sites(
            model, 1.0 / self.num_shards, local_plates
        )
        self._concrete_arrays(shard_kwargs)
        # the jitted functions, shared by every density of the same structure in
        # this process (the data are their arguments): shards of one shape
        # compile once, not once per shard
        self.compiled = _shared_functions(self)
        self._constrained_site_trace = None
        self._coloring: ColoredGlobalHessian | None = None
        self.last_num_hvp = 0

    # ------------------------------------------------------------- accessors
    @property
    def _constrained_site_values(self):
        """The jitted constrained values (:mod:`raybayes.core.site_values`)."""
        return self.compiled.constrained_site_values

    @property
    def arrays(self) -> dict:
        """The shard's array arguments of the model (name -> JAX array)."""
        return self._arrays

    @property
    def static_kwargs(self) -> dict:
        """The shard's non-array (static) keyword arguments of the model."""
        return self._static

    def _concrete_arrays(self, shard_kwargs) -> None:
        """Keep as constants the arrays the model needs as values.

        Arrays are passed to the jitted functions as arguments, so that the data
        are not baked into the compiled code. A model that reads a size from the
        data (``G = int(g.max()) + 1``, ``len(np.unique(g))``) needs those arrays
        concrete: first the integer arrays, then all of them, are closed over.
        """
        g0, l0 = self.init_global(), self.init_local()
        integer = [
            k for k, v in self._arrays.items() if jnp.issubdtype(v.dtype, jnp.integer)
        ]
        for concrete in ([], integer, list(self._arrays)):
            arrays = {k: v for k, v in self._arrays.items() if k not in concrete}
            # Copies: JAX caches constants by object, across float64/float32
            # contexts, so the caller's array must not be the one closed over here.
            static = {
                **self._static,
                **{k: np.array(shard_kwargs[k], copy=True) for k in concrete},
            }
            self._arrays, self._static = arrays, static
            try:
                jax.eval_shape(self._neg, g0, l0, self._arrays)
                return
            except jax.errors.ConcretizationTypeError:
                continue
            except Exception:  # noqa: BLE001 - a model error: raised where it is used
                return

    # ------------------------------------------------------------- layouts
    def unflatten(self, global_flat, local_mat) -> dict:
        """Unconstrained site values from the flat layout.

        ``local_mat`` may hold any number of rows (a minibatch of entities); local
        sites then have that many entries on their entity axis.
        """
        params = {}
        offset = 0
        for s in self.global_sites:
            size = int(np.prod(s.unconstrained_shape, dtype=int))
            params[s.name] = jnp.reshape(
                global_flat[offset : offset + size], s.unconstrained_shape
            )
            offset += size
        col = 0
        for s, width in zip(self.local_sites, self._local_widths, strict=True):
            block = local_mat[:, col : col + width]
            moved = list(s.unconstrained_shape)
            moved.insert(0, moved.pop(s.entity_axis))
            moved[0] = local_mat.shape[0]  # any subset of the shard's entities
            params[s.name] = jnp.moveaxis(jnp.reshape(block, moved), 0, s.entity_axis)
            col += width
        return params

    def flatten(self, params: Mapping[str, Any]):
        """``(global_flat, local_mat)`` from unconstrained site values."""
        g = [jnp.ravel(jnp.asarray(params[s.name])) for s in self.global_sites]
        global_flat = jnp.concatenate(g) if g else jnp.zeros((0,))
        cols = [
            jnp.reshape(
                jnp.moveaxis(jnp.asarray(params[s.name]), s.entity_axis, 0),
                (self.num_local_entities, -1),
            )
            for s in self.local_sites
        ]
        local_mat = (
            jnp.concatenate(cols, axis=1)
            if cols
            else jnp.zeros((self.num_local_entities, 0))
        )
        return global_flat, local_mat

    def check_site_names(self, names, argument: str = "init_params") -> None:
        """Refuse names that are not latent sites of the model.

        Raises:
            ConfigurationError: naming the unknown names and the latent sites.
        """
        unknown = sorted(set(names) - set(self.sites))
        if unknown:
            raise ConfigurationError(
                f"{argument} names site(s) {unknown}, which are not latent sites "
                f"of the model; its latent sites are {list(self.sites)}. Fix the "
                "names."
            )

    def init_global(self, dtype=None):
        """Zeros of shape ``(num_global,)`` (the unconstrained origin)."""
        return jnp.zeros((self.num_global,), dtype=dtype or jnp.result_type(float))

    def init_local(self, dtype=None):
        """Zeros of shape ``(num_local_entities, num_local_per_entity)``."""
        return jnp.zeros(
            (self.num_local_entities, self.num_local_per_entity),
            dtype=dtype or jnp.result_type(float),
        )

    def constrain(self, params: Mapping[str, Any]) -> dict:
        """Constrained site values from unconstrained ones."""
        return {name: self.sites[name].transform(v) for name, v in params.items()}

    def unconstrain(self, values: Mapping[str, Any]) -> dict:
        """Unconstrained site values from constrained ones."""
        return {
            name: self.sites[name].transform.inv(jnp.asarray(v))
            for name, v in values.items()
        }

    # ------------------------------------------------------------- densities
    def log_density_params(self, params: Mapping[str, Any], arrays=None) -> jax.Array:
        """Shard log joint in the unconstrained space (site dict), Jacobians included."""
        arrays = self._arrays if arrays is None else arrays
        constrained = {}
        log_det = 0.0
        scale = 1.0 / self.num_shards
        for name, u in params.items():
            s = self.sites[name]
            t = s.transform
            x = t(u)
            constrained[name] = x
            ld = jnp.sum(t.log_abs_det_jacobian(u, x))
            log_det = log_det + (ld if s.is_local else scale * ld)
        lp = model_log_density(
            self._scaled_model,
            self.model_args,
            {**arrays, **self._static},
            constrained,
            self.max_plate_nesting,
        )
        return lp + log_det

    def log_density(self, global_flat, local_mat) -> jax.Array:
        """Shard log joint in the unconstrained space (flat layout). Scalar."""
        return self.log_density_params(self.unflatten(global_flat, local_mat))

    def _neg(self, global_flat, local_mat, arrays):
        return -self.log_density_params(self.unflatten(global_flat, local_mat), arrays)

    def value_and_grad(self, global_flat, local_mat):
        """Negative shard log joint and its gradient (jitted).

        Returns:
            ``(value, grad_global (num_global,), grad_local (num_local_entities, k))``.
        """
        value, (gg, gl) = self.compiled.value_and_grad(
            global_flat, local_mat, self._arrays
        )
        return value, gg, gl

    def batched_value_and_grad(self, global_batch, local_batch):
        """Negative shard log joint and gradient for a batch of points (jitted).

        One compiled call evaluates every point of the batch (several chains'
        positions at once, as data-sharded NUTS asks for in each leapfrog step).

        Args:
            global_batch: ``(B, num_global)`` unconstrained globals.
            local_batch: ``(B, num_local_entities, k)`` unconstrained locals.

        Returns:
            ``(values (B,), grad_global (B, num_global), grad_local (B,
            num_local_entities, k))``.
        """
        value, (gg, gl) = self.compiled.batched_value_and_grad(
            global_batch, local_batch, self._arrays
        )
        return value, gg, gl

    def _hvp_impl(self, global_flat, local_mat, tangent_global, tangent_local, arrays):
        grad = jax.grad(self._neg, argnums=(0, 1))
        _, out = jax.jvp(
            lambda g, lm: grad(g, lm, arrays),
            (global_flat, local_mat),
            (tangent_global, tangent_local),
        )
        return out

    def _columns_impl(self, global_flat, local_mat, eye, local_weights, arrays,
                      batch_size):
        """Hessian-vector products along ``(eye[m], local_weights[m] in every
        row)``: ``eye`` ``(n, G)``, ``local_weights`` ``(n, k)`` (zero for a global
        column, a unit vector for column j of every local block)."""
        if local_mat.size == 0:
            # No local variables on this shard (a split along the observations):
            # lax.map cannot batch a zero-size output, so map the global part only.
            zl = jnp.zeros_like(local_mat)
            hg = jax.lax.map(
                lambda e: self._hvp_impl(global_flat, local_mat, e, zl, arrays)[0],
                eye,
                batch_size=batch_size,
            )
            return hg, jnp.zeros((eye.shape[0], *local_mat.shape), hg.dtype)

        def one(pair):
            e, w = pair
            tl = jnp.broadcast_to(w.astype(local_mat.dtype), local_mat.shape)
            return self._hvp_impl(global_flat, local_mat, e, tl, arrays)

        return jax.lax.map(one, (eye, local_weights), batch_size=batch_size)

    def _columns_tangent_impl(
        self, global_flat, local_mat, dir_global, dir_local, eye, arrays, size
    ):
        weights = jnp.zeros((eye.shape[0], local_mat.shape[1]), eye.dtype)

        def one(dg, dl):
            return jax.jvp(
                lambda g, lm: self._columns_impl(g, lm, eye, weights, arrays, size),
                (global_flat, local_mat),
                (dg, dl),
            )[1]

        # the directions batched: the Hessian-vector products themselves (the
        # primal) do not depend on them and are computed once
        return jax.vmap(one)(dir_global, dir_local)

    def _local_tangent_impl(self, global_flat, local_mat, dir_global, dir_local,
                            tg, tl, arrays):
        def cols(g, lm):
            return jax.vmap(lambda a, b: self._hvp_impl(g, lm, a, b, arrays))(tg, tl)

        def one(dg, dl):
            return jax.jvp(cols, (global_flat, local_mat), (dg, dl))[1]

        return jax.vmap(one)(dir_global, dir_local)

    def hessian_tangent(
        self,
        global_flat,
        local_mat,
        dir_global,
        dir_local,
        batch_size: int = 16,
        coloring: bool = True,
    ):
        """Derivatives of this shard's Hessian blocks along ``m`` directions ``v``.

        ``d/de`` at ``e = 0`` of ``H_gg``, ``H_lg`` and the local blocks ``B_i`` at
        ``(global_flat, local_mat) + e (dir_global, dir_local)``: third derivatives
        of the negative shard log joint contracted with ``v``, by forward-mode
        differentiation of the Hessian-vector products (exact, no differences),
        the ``m`` directions in one compiled call.

        Args:
            global_flat: ``(G,)`` the point's globals.
            local_mat: ``(P, k)`` its locals.
            dir_global: ``(m, G)`` the directions' globals.
            dir_local: ``(m, P, k)`` their locals.
            batch_size: Hessian-vector products evaluated together.
            coloring: reuse the colour groups that :meth:`global_hessian_columns`
                found (the derivative has the Hessian's sparsity; default), or
                ``False`` for one product per global parameter. Without a colored
                Hessian taken before, one product per global parameter is used.

        Returns:
            ``(dH_gg (m, G, G), dH_lg (m, P, k, G), dB (m, P, k, k) or None)``.
        """
        import copy

        dtype = global_flat.dtype
        dg = jnp.asarray(dir_global, dtype)
        dl = jnp.asarray(dir_local, dtype)
        m = dg.shape[0]
        cache: dict = {}

        def all_directions(tangents):
            key = np.asarray(tangents).tobytes()
            if key not in cache:
                cache.clear()
                cache[key] = _in_chunks(
                    lambda t: self.compiled.columns_tangent(
                        global_flat, local_mat, dg, dl, t, self._arrays,
                        batch_size,
                    ),
                    tangents,
                    batch_size,
                    dtype,
                    axis=1,
                )
            return cache[key]

        d_gg, d_lg = [], []
        for i in range(m):
            def direction(tangents, i=i):
                hg, hl = all_directions(tangents)
                return hg[i], hl[i]

            if not coloring or self._coloring is None:
                hg, hl = direction(np.eye(self.num_global))
                d_gg.append(hg.T)
                d_lg.append(np.moveaxis(hl, 0, -1))
            else:
                a, b = copy.deepcopy(self._coloring)(direction)
                d_gg.append(a)
                d_lg.append(b)
        d_gg = jnp.asarray(np.stack(d_gg), dtype)
        d_lg = jnp.asarray(np.stack(d_lg), dtype)
        k = self.num_local_per_entity
        if not k:
            return d_gg, d_lg, None
        # the local blocks' columns: all entities at once (as local_hessian_blocks)
        eye = jnp.zeros((k, *local_mat.shape), dtype)
        eye = eye.at[jnp.arange(k), :, jnp.arange(k)].set(1.0)
        tg = jnp.zeros((k, self.num_global), dtype)
        _, hl = self.compiled.local_tangent(
            global_flat, local_mat, dg, dl, tg, eye, self._arrays
        )  # (m, k, P, k)
        return d_gg, d_lg, jnp.moveaxis(hl, 1, -1)

    def hvp(self, global_flat, local_mat, tangent_global, tangent_local):
        """Hessian-vector product of the negative shard log joint (jitted)."""
        return self.compiled.hvp(
            global_flat, local_mat, tangent_global, tangent_local, self._arrays
        )

    def local_hessian_blocks(self, global_flat, local_mat) -> jax.Array:
        """The ``(num_local_entities, k, k)`` diagonal blocks of the local Hessian.

        Uses k Hessian-vector products, in one compiled call: the tangent with
        ones in column j of every entity returns column j of every block at once,
        because blocks of different entities do not interact (Curtis-Powell-Reid
        coloring).
        """
        return self.compiled.local_blocks(global_flat, local_mat, self._arrays)

    def _local_blocks_impl(self, global_flat, local_mat, arrays):
        k = local_mat.shape[1]
        eye = jnp.zeros((k, *local_mat.shape), local_mat.dtype)
        eye = eye.at[jnp.arange(k), :, jnp.arange(k)].set(1.0)
        tg = jnp.zeros((k, global_flat.shape[0]), global_flat.dtype)
        _, hl = jax.vmap(
            lambda a, b: self._hvp_impl(global_flat, local_mat, a, b, arrays)
        )(tg, eye)  # (k, P, k): column j of every block
        return jnp.moveaxis(hl, 0, -1)

    def global_hessian_columns(
        self, global_flat, local_mat, batch_size: int = 16, coloring: bool = True
    ):
        """``H_gg (G, G)`` and ``H_lg (num_local_entities, k, G)`` of this shard.

        With ``coloring`` (default), the columns of plated global sites that touch
        disjoint rows share Hessian-vector products
        (:class:`~raybayes.core.hessian_coloring.ColoredGlobalHessian`; verified
        against a random product at every call). Otherwise one Hessian-vector
        product per global parameter. Either way ``batch_size`` products are
        evaluated together. :attr:`last_num_hvp` holds the number of products.
        """
        hgg, hlg, _ = self.hessian_blocks(
            global_flat, local_mat, batch_size, coloring, local_blocks=False
        )
        return hgg, hlg

    def hessian_blocks(
        self,
        global_flat,
        local_mat,
        batch_size: int = 16,
        coloring: bool = True,
        local_blocks: bool = True,
    ):
        """This shard's rows of the arrowhead Hessian in one pass of compiled
        Hessian-vector products: :meth:`global_hessian_columns` and, with
        ``local_blocks``, the ``k`` probes of :meth:`local_hessian_blocks`
        appended to the same chunks (they often fill the padding of the last
        chunk, and need no executable of their own).

        Returns:
            ``(H_gg (G, G), H_lg (P, k, G), B (P, k, k) or None)``; ``B`` is
            ``None`` without ``local_blocks`` or when ``k = 0``.
        """
        dtype = global_flat.dtype
        k = self.num_local_per_entity
        G = self.num_global
        pending = [bool(local_blocks and k)]
        blocks = []

        def hvp_columns(tangents):
            tangents = np.asarray(tangents)
            n = tangents.shape[0]
            weights = np.zeros((n, k))
            if pending[0]:  # the local blocks ride along with the first probes
                pending[0] = False
                tangents = np.concatenate([tangents, np.zeros((k, G))])
                weights = np.concatenate([weights, np.eye(k)])
            hg, hl = _in_chunks(
                lambda t, w: self.compiled.columns(
                    global_flat, local_mat, t, w, self._arrays, batch_size
                ),
                (tangents, weights),
                batch_size,
                dtype,
            )
            if hg.shape[0] > n:
                blocks.append(np.moveaxis(hl[n:], 0, -1))  # (P, k, k)
            return hg[:n], hl[:n]

        if not coloring:
            hg, hl = hvp_columns(np.eye(G))
            self.last_num_hvp = G
            hgg, hlg = hg.T, np.moveaxis(hl, 0, -1)
        else:
            if self._coloring is None:
                layout, offset = [], 0
                for s in self.global_sites:
                    layout.append((offset, s.unconstrained_shape))
                    offset += int(np.prod(s.unconstrained_shape, dtype=int))
                self._coloring = ColoredGlobalHessian(layout, G, dtype)
            hgg, hlg = self._coloring(hvp_columns)
            self.last_num_hvp = self._coloring.last_num_hvp
        out_blocks = jnp.asarray(blocks[0], dtype) if blocks else None
        return jnp.asarray(hgg, dtype), jnp.asarray(hlg, dtype), out_blocks


class CompiledShardFunctions:
    """The jitted functions of shard log densities of one structure.

    Every function takes the shard's data (``arrays``) as an argument, so the
    densities of all shards with the same model, static arguments, scale and
    latent layout share one instance (:func:`_shared_functions`) and with it the
    compiled executables: in one process (the in-process backend) shards of equal
    shape compile once, not once each. The functions are built on first use.

    Attributes:
        value_and_grad: ``(g, l, arrays) -> (value, (grad_g, grad_l))``.
        batched_value_and_grad: the same over a leading batch axis of ``g, l``.
        hvp: ``(g, l, t_g, t_l, arrays) -> (H t)_g, (H t)_l``.
        local_blocks: ``(g, l, arrays) -> (P, k, k)`` diagonal blocks ``B_i``.
        columns: ``(g, l, t_g (n, G), t_l (P, k), arrays, batch_size)`` ->
            ``n`` Hessian-vector products (the global columns).
        columns_tangent, local_tangent: their directional derivatives (nested
            Laplace's third derivatives).
        constrained_site_values: see :mod:`raybayes.core.site_values`.
    """

    def __init__(self, owner: ShardLogDensity):
        self._owner = owner
        self._built: dict[str, Any] = {}

    def _build(self, name):
        d = self._owner
        if name == "value_and_grad":
            return jax.jit(jax.value_and_grad(d._neg, argnums=(0, 1)))
        if name == "batched_value_and_grad":
            return jax.jit(
                jax.vmap(
                    jax.value_and_grad(d._neg, argnums=(0, 1)), in_axes=(0, 0, None)
                )
            )
        if name == "hvp":
            return jax.jit(d._hvp_impl)
        if name == "local_blocks":
            return jax.jit(d._local_blocks_impl)
        if name == "columns":
            return jax.jit(d._columns_impl, static_argnums=(5,))
        if name == "columns_tangent":
            return jax.jit(d._columns_tangent_impl, static_argnums=(6,))
        if name == "local_tangent":
            return jax.jit(d._local_tangent_impl)
        if name == "constrained_site_values":
            import functools

            from raybayes.core.site_values import _values

            return jax.jit(jax.vmap(functools.partial(_values, d), (0, 0, None)))
        raise AttributeError(name)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        built = self.__dict__["_built"]
        if name not in built:
            built[name] = self._build(name)
        return built[name]


#: structure key -> CompiledShardFunctions, while a density of that structure lives
_SHARED_FUNCTIONS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _fingerprint(value):
    """A hashable stand-in for a static model argument (arrays by content)."""
    if isinstance(value, (np.ndarray, jax.Array)):
        a = np.asarray(value)
        return ("array", a.shape, str(a.dtype), hashlib.sha1(a.tobytes()).hexdigest())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_fingerprint(v) for v in value))
    if isinstance(value, Mapping):
        return ("map", tuple((k, _fingerprint(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))  # kept alive by the density that holds it
    return (type(value).__name__, value)


def _shared_functions(density: ShardLogDensity) -> CompiledShardFunctions:
    """The :class:`CompiledShardFunctions` of ``density``'s structure: the model,
    its positional and static arguments, the scale of the global sites, the plates
    left unscaled and the latent layout (the entity axis's length excluded: jit
    compiles once per shape anyway)."""
    d = density
    layout = tuple(
        (
            s.name,
            s.is_local,
            s.entity_axis,
            tuple(n for i, n in enumerate(s.unconstrained_shape) if i != s.entity_axis),
            str(s.support),
        )
        for s in d.sites.values()
    )
    key = (
        id(d.model),
        _fingerprint(d.model_args),
        _fingerprint(sorted(d._static.items())),
        d.num_shards,
        d._scaled_model.local_plates,
        d.max_plate_nesting,
        layout,
    )
    try:
        shared = _SHARED_FUNCTIONS.get(key)
    except TypeError:  # an unhashable part: no sharing
        return CompiledShardFunctions(d)
    if shared is None or shared._owner.model is not d.model:
        shared = CompiledShardFunctions(d)
        _SHARED_FUNCTIONS[key] = shared
    return shared


def _in_chunks(columns, tangents, batch_size, dtype, axis=0):
    """``columns`` of ``(n, G)`` tangents in chunks of exactly ``batch_size`` rows
    (the last one padded with zeros): one compiled shape for any ``n``, so the
    different numbers of probes of the colored Hessian (discovery, steady state,
    dense fallback) do not each compile the Hessian-vector products again.
    ``tangents`` may be a tuple of arrays with ``n`` rows each (then ``columns``
    takes one chunk of each)."""
    parts = tangents if isinstance(tangents, tuple) else (tangents,)
    parts = [np.asarray(t) for t in parts]
    n = parts[0].shape[0]
    rows = max(-(-n // batch_size) * batch_size, batch_size)
    padded = []
    for t in parts:
        p = np.zeros((rows, *t.shape[1:]), t.dtype)
        p[:n] = t
        padded.append(p)
    outs = [  # dispatched together, read back after
        columns(*[jnp.asarray(p[i : i + batch_size], dtype=dtype) for p in padded])
        for i in range(0, rows, batch_size)
    ]
    hg = np.concatenate([np.asarray(o[0]) for o in outs], axis=axis)
    hl = np.concatenate([np.asarray(o[1]) for o in outs], axis=axis)
    take = (slice(None),) * axis + (slice(0, n),)
    return hg[take], hl[take]


def shard_log_density(
    model: Callable,
    shard_kwargs: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    partition: Partition | None,
    num_shards: int,
    unconstrained: bool = False,
    model_args: tuple = (),
) -> jax.Array:
    """Log joint of one shard, with every site outside the split plate scaled by 1/S.

    Summed over the S shards of :func:`~raybayes.core.partition.shard_model_kwargs`,
    it equals the full model's log joint (and so do its derivatives).

    Args:
        model: a NumPyro model.
        shard_kwargs: the shard's model arguments.
        params: latent site values. Global sites have their full shape; local sites
            the shard's entities only.
        partition: the split (``None``: no split, S must be 1).
        num_shards: S.
        unconstrained: ``params`` are unconstrained values; the log Jacobians of the
            transforms are added (scaled like their sites).
        model_args: positional model arguments.

    Returns:
        Scalar log density.

    Raises:
        ConfigurationError: ``num_shards`` > 1 without a partition.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> p = Partition("obs", entity_args=("y",))
        >>> a = shard_log_density(model, {"y": np.zeros(2)}, {"mu": 0.0},
        ...                       partition=p, num_shards=2)
        >>> round(float(a), 4)  # 0.5 * log N(0|0,1) + 2 * log N(0|0,1)
        -2.2973
    """
    if partition is None and num_shards != 1:
        raise ConfigurationError(
            f"num_shards={num_shards} needs a partition; pass partition= (see raybayes.plan)."
        )
    density = ShardLogDensity(model, shard_kwargs, partition, num_shards, model_args)
    if unconstrained:
        return density.log_density_params(params)
    local_plates = partition.local_plates if partition is not None else frozenset()
    scaled = scale_global_sites(model, 1.0 / num_shards, local_plates)
    return model_log_density(
        scaled,
        tuple(model_args),
        dict(shard_kwargs),
        dict(params),
        density.max_plate_nesting,
    )
