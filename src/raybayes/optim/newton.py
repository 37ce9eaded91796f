"""Vector-free trust-region Newton on the arrowhead Hessian: the MAP of hierarchical
models in a few exact Hessians.

L-BFGS needs thousands of iterations on the flat, curved ridges that non-centred
hierarchical models have between a scale parameter and its standardised effects
(``sigma`` against ``z`` in ``beta = mu + sigma z``). Newton's method with the exact
Hessian follows the curvature of such a ridge and converges quadratically near the
mode. The Hessian of a hierarchical model is an arrowhead matrix (see
:mod:`raybayes.core.arrowhead`), so one Newton step costs what one Laplace
approximation costs: each worker computes its local blocks ``B_i`` and cross blocks
``C_i`` and returns its part of the Schur complement ``S`` ``(G, G)``; the driver
solves the globals' step, and every worker the steps of its own locals.

One iteration, in messages between the driver and the S shards:

1. (when the Hessian is refreshed) each worker computes and factors its rows of
   the Hessian at its current point and returns its part of ``S``, of the reduced
   right-hand side ``sum_i C_i^T B_i^{-1} g_i`` and of the local Newton decrement
   ``sum_i g_i^T B_i^{-1} g_i``;
2. the driver eigendecomposes ``S`` and takes the trust-region step of the globals
   on the reduced quadratic model (:func:`raybayes.core.arrowhead.trust_region_step`:
   a Levenberg-Marquardt damping ``lam`` chosen by the radius, so that indefinite
   ``S`` away from the mode is handled);
3. each worker forms its locals' step ``-B_i^{-1} (g_i + C_i dg)`` (the locals are
   solved exactly for the globals' step) and returns its part of ``g . d``;
4. an Armijo backtracking line search on the full objective along ``d`` (each trial
   one parallel evaluation); the radius grows when the full step agrees with the
   model and shrinks to the accepted step otherwise;
5. accept: each worker moves its locals, keeps the gradient and returns its largest
   gradient component and its parts of the next right-hand side.

The Hessian (``G_colors + k`` Hessian-vector products over all rows, the
expensive part) is kept while accepted steps cut the largest gradient component
at least fourfold (the chord method), and recomputed otherwise. The run stops when
the largest gradient component is at most ``gtol``.

The driver holds ``O(G^2)`` numbers (``S`` and its eigenvectors) whatever the
number of local parameters; the locals, their gradient and their step stay on the
workers (the workers are those of vector-free L-BFGS, so
``warmup_steps`` iterations of :func:`~raybayes.optim.find_map_vector_free` can
run first on the same state).

References:
    Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Sec. 3.1
    (Armijo backtracking), Ch. 4 (trust regions), Sec. 10.3 (Levenberg-Marquardt).
    Moré, J. J. & Sorensen, D. C. (1983). Computing a trust region step. SIAM J.
    Sci. Stat. Comput. 4(3), 553-572.
    Kelley, C. T. (2003). Solving Nonlinear Equations with Newton's Method. SIAM,
    Sec. 2.3 (the chord method).
    Rue, H., Martino, S. & Chopin, N. (2009). Approximate Bayesian inference for
    latent Gaussian models by using integrated nested Laplace approximations. JRSS B
    71(2), 319-392 (the arrowhead structure and its Schur complement).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from raybayes.config import reject_unknown_arguments
from raybayes.core import arrowhead
from raybayes.distributed import worker_precision
from raybayes.errors import ConfigurationError, ShardError
from raybayes.optim.result import MAPResult, map_result_fields
from raybayes.optim.vlbfgs import (
    VectorFreeObjective,
    VLBFGSShardWorker,
    find_map_vector_free,
)
from raybayes.progress import progress_lines

__all__ = [
    "NewtonMAPResult",
    "NewtonObjective",
    "NewtonShardWorker",
    "find_map_newton",
]

#: Armijo constant of the backtracking line search.
_C1 = 1e-4


def _max_abs(a) -> float:
    a = np.asarray(a)
    return float(np.max(np.abs(a))) if a.size else 0.0


class NewtonShardWorker(VLBFGSShardWorker):
    """A vector-free L-BFGS worker that also takes arrowhead Newton steps.

    The Newton methods work on the same per-shard state as vector-free L-BFGS (the
    locals ``x``, the gradient ``g`` and the direction ``d``, ``(P_s, k)``), so a
    run can switch from L-BFGS to Newton without moving the locals.
    """

    def _factor_arrays(self):
        """``(B^{-1} (P, k, k), C (P, k, G))`` of the kept factor as float64 NumPy
        arrays (``None`` when ``k = 0``), converted once per factor: the products
        below are two-operand contractions, milliseconds where an op-by-op
        three-operand ``jnp.einsum`` took a tenth of a second."""
        factor = self._factored()
        cached = getattr(self, "_factor_np", None)
        if cached is None or cached[0] is not factor:
            arrays = None
            if factor.local_inverse is not None:
                arrays = (
                    np.asarray(factor.local_inverse, np.float64),
                    np.asarray(factor.cross, np.float64),
                )
            self._factor_np = cached = (factor, arrays)
        return cached[1]

    def _reduce_np(self, v):
        """``sum_i C_i^T B_i^{-1} v_i`` ``(G,)`` with the kept factor."""
        arrays = self._factor_arrays()
        if arrays is None:
            return np.zeros(self.density.num_global)
        binv, cross = arrays
        return np.einsum("pkg,pk->g", cross, np.einsum("pkj,pj->pk", binv, v))

    def _reduced(self):
        """``(sum_i C_i^T B_i^{-1} g_i (G,), sum_i g_i^T B_i^{-1} g_i)``."""
        arrays = self._factor_arrays()
        g = self._vf()["g"]
        if arrays is None:
            return np.zeros(self.density.num_global), 0.0
        binv, cross = arrays
        bg = np.einsum("pkj,pj->pk", binv, g)
        return np.einsum("pkg,pk->g", cross, bg), float(np.vdot(g, bg))

    @worker_precision
    def newton_hessian(self, global_flat, batch_size: int, damping: float, reuse: bool):
        """Compute (or, with ``reuse``, damp again) and factor the Hessian at the
        current point.

        Returns:
            ``(schur (G, G), blocks not positive definite, Hessian-vector products,
            reduce (G,), decrement)``.
        """
        schur, _, not_pd, num_hvp = self.laplace_factor(
            global_flat, self._vf()["x"], batch_size, damping, reuse
        )
        reduce, decrement = self._reduced() if not not_pd else (None, 0.0)
        return schur, not_pd, num_hvp, reduce, decrement

    @worker_precision
    def newton_direction(self, delta_global):
        """Set ``d = -B^{-1} (g + C dg)`` for the globals' step ``dg`` ``(G,)``.

        Returns:
            ``(local g . d, local max |d|)``.
        """
        st = self._vf()
        factor = self._factored()
        if factor.local_inverse is None:
            st["d"] = np.zeros_like(st["x"])
        else:
            st["d"] = np.asarray(
                arrowhead.newton_local_step(factor, st["g"], delta_global), np.float64
            ).reshape(st["x"].shape)
        return float(np.vdot(st["g"], st["d"])), _max_abs(st["d"])

    @worker_precision
    def newton_evaluate(self, global_trial, alpha: float):
        """Value and gradient at ``x + alpha d``; see :meth:`vlbfgs_evaluate`.

        Returns:
            ``(value, grad_global (G,), local max |g|)`` at the trial point.
        """
        value, gg, _ = self.vlbfgs_evaluate(global_trial, alpha)
        return value, gg, _max_abs(self._vf()["trial"][1])

    @worker_precision
    def newton_resume(self, global_flat):
        """Evaluate at the kept locals and ``global_flat``; forget any L-BFGS memory.

        Returns:
            ``(value, grad_global (G,), local max |g|)``.
        """
        st = self._vf()
        value, gg, gl = self.value_and_grad(global_flat, st["x"])
        st["g"] = np.asarray(gl, np.float64).reshape(st["x"].shape)
        st["s"], st["y"], st["trial"] = [], [], None
        return value, np.asarray(gg, np.float64), _max_abs(st["g"])

    @worker_precision
    def newton_profile(self, global_flat, max_steps: int, gtol: float):
        """Newton steps on this shard's locals only, the globals fixed.

        Given the globals the entities are independent, so each worker can move
        its locals towards their conditional mode alone: per step one gradient
        and ``k`` Hessian-vector products (the blocks ``B_i``, damped where not
        positive definite) and a backtracking search on the shard's loss.

        Returns:
            ``(value, grad_global (G,), local max |g|, reduce, decrement)`` at the
            new locals (``reduce`` ``None`` before any Hessian).
        """
        import jax.numpy as jnp

        st = self._vf()
        d = self.density
        g = jnp.asarray(global_flat, dtype=jnp.result_type(float))
        x = np.array(st["x"], np.float64)
        value, gg, gl = self.value_and_grad(global_flat, x)
        gl = np.asarray(gl, np.float64).reshape(x.shape)
        for _ in range(int(max_steps) if d.num_local_per_entity else 0):
            if _max_abs(gl) <= gtol:
                break
            blocks = np.asarray(d.local_hessian_blocks(g, jnp.asarray(x, g.dtype)))
            blocks = 0.5 * (blocks + np.swapaxes(blocks, -1, -2))
            eye = np.eye(blocks.shape[-1])
            low = np.linalg.eigvalsh(blocks)[:, :1]  # (P, 1) smallest eigenvalue
            shift = np.where(low > 1e-8, 0.0, 1e-3 - low)[..., None] * eye
            step = -np.linalg.solve(blocks + shift, gl[..., None])[..., 0]
            alpha = 1.0
            for _ in range(10):
                v2, gg2, gl2 = self.value_and_grad(global_flat, x + alpha * step)
                if np.isfinite(v2) and v2 <= value + _C1 * alpha * np.vdot(gl, step):
                    break
                alpha *= 0.5
            else:
                break
            x = x + alpha * step
            value, gg, gl = v2, gg2, np.asarray(gl2, np.float64).reshape(x.shape)
        st["x"], st["g"], st["trial"] = x, gl, None
        st["s"], st["y"] = [], []
        reduced = self._reduced() if self._factor is not None else (None, 0.0)
        return float(value), np.asarray(gg, np.float64), _max_abs(gl), *reduced

    @worker_precision
    def newton_accept(self, alpha: float):
        """Move to the last trial point; forget any L-BFGS memory.

        Returns:
            ``(reduce (G,), decrement)`` at the new gradient with the kept Hessian
            (``None`` before any Hessian).
        """
        st = self._vf()
        st["s"], st["y"] = [], []
        self.vlbfgs_accept(alpha, False)
        if self._factor is None:
            return None
        return self._reduced()

    # ------------------------------------------- Newton-CG (Steihaug-Toint PCG)
    def _cg(self):
        st = self._vf()
        if st.get("cg") is None:
            raise ShardError(self.shard_id, "newton_cg_start was not called")
        return st["cg"]


    @worker_precision
    def newton_cg_start(self):
        """Start a CG solve of ``H s = -g`` at the current point: ``r = g``, ``s = 0``.

        Returns:
            ``sum_i C_i^T B_i^{-1} r_i`` ``(G,)``: this shard's term of the
            preconditioner's reduced right-hand side.
        """
        st = self._vf()
        zero = np.zeros_like(st["x"])
        st["cg"] = dict(r=st["g"].copy(), s=zero, hs=zero, p=zero, hp=zero, z=zero)
        return self._reduce_np(st["g"])

    @worker_precision
    def newton_cg_precondition(self, z_global):
        """The locals of ``z = M^{-1} r``: ``z_i = B_i^{-1} (r_i - C_i z_g)``.

        Args:
            z_global: ``(G,)`` the globals of ``z`` (solved on the driver).

        Returns:
            This shard's part of ``r . z``.
        """
        cg = self._cg()
        arrays = self._factor_arrays()
        if arrays is None:
            cg["z"] = np.zeros_like(cg["r"])
            return 0.0
        binv, cross = arrays
        rhs = cg["r"] - np.einsum("pkg,g->pk", cross, np.asarray(z_global, np.float64))
        z = np.einsum("pkj,pj->pk", binv, rhs)
        cg["z"] = z
        return float(np.vdot(cg["r"], z))

    # one CG iteration is two calls: newton_cg_hvp, then newton_cg_step (which
    # also preconditions: the driver updates the reduced right-hand side
    # sum_i C_i^T B_i^{-1} r_i from that of H p, which newton_cg_hvp returns)

    @worker_precision
    def newton_cg_hvp(self, global_flat, p_global, beta):
        """Set the locals of the CG direction, ``p = -z + beta p`` (``p = -z`` when
        ``beta`` is ``None``), and compute ``H p`` at the current point.

        Returns:
            ``((H p)_g (G,) this shard's term, this shard's part of p_l . (H p)_l,
            sum_i C_i^T B_i^{-1} (H p)_i (G,))``.
        """
        import jax.numpy as jnp

        st = self._vf()
        cg = self._cg()
        cg["p"] = -cg["z"] if beta is None else -cg["z"] + float(beta) * cg["p"]
        dtype = jnp.result_type(float)
        hg, hl = self.density.hvp(
            jnp.asarray(global_flat, dtype),
            jnp.asarray(st["x"], dtype),
            jnp.asarray(p_global, dtype),
            jnp.asarray(cg["p"], dtype),
        )
        cg["hp"] = np.asarray(hl, np.float64).reshape(cg["p"].shape)
        return (
            np.asarray(hg, np.float64),
            float(np.vdot(cg["p"], cg["hp"])),
            self._reduce_np(cg["hp"]),
        )

    @worker_precision
    def newton_cg_step(self, alpha: float, z_global):
        """``s += alpha p``, ``r += alpha H p``, then the locals of ``z = M^{-1} r``
        (see :meth:`newton_cg_precondition`) for the globals ``z_global`` ``(G,)``
        that the driver solved from the new residual.

        Returns:
            This shard's part of ``r . z`` at the new residual.
        """
        cg = self._cg()
        alpha = float(alpha)
        cg["s"] = cg["s"] + alpha * cg["p"]
        cg["hs"] = cg["hs"] + alpha * cg["hp"]
        cg["r"] = cg["r"] + alpha * cg["hp"]
        return self.newton_cg_precondition(z_global)

    @worker_precision
    def newton_cg_finish(self, tau: float):
        """End the solve at ``s + tau p`` (``tau`` 0 inside the trust region) and
        make it the direction of :meth:`newton_evaluate`.

        Returns:
            ``(g_l . s_l, s_l . (H s)_l)``, this shard's parts.
        """
        st = self._vf()
        cg = self._cg()
        tau = float(tau)
        if tau:
            cg["s"] = cg["s"] + tau * cg["p"]
            cg["hs"] = cg["hs"] + tau * cg["hp"]
        st["d"] = cg["s"]
        return float(np.vdot(st["g"], cg["s"])), float(np.vdot(cg["s"], cg["hs"]))


class NewtonObjective(VectorFreeObjective):
    """A :class:`~raybayes.optim.vlbfgs.VectorFreeObjective` whose workers also take
    arrowhead Newton steps (:class:`NewtonShardWorker`).

    Same arguments as :class:`~raybayes.distributed.ShardedObjective`; use it with
    :func:`find_map_newton` (or :func:`~raybayes.optim.find_map_vector_free`).
    """

    worker_class = NewtonShardWorker

    def resume(self, global_flat):
        """Evaluate at ``global_flat`` and the locals the workers hold.

        Returns:
            ``(value, grad_global (G,), max local |g|)``.
        """
        g = np.asarray(global_flat, np.float64)
        results = self._call("newton_resume", lambda s: (g,))
        self.num_evaluations += 1
        value, grad = self._reduce(results)
        return value, grad, max(r[2] for r in results)

    def hessian(self, global_flat, batch_size, damping=0.0, reuse=False):
        """Every shard's :meth:`NewtonShardWorker.newton_hessian`, in shard order."""
        g = np.asarray(global_flat, np.float64)
        return self._call(
            "newton_hessian", lambda s: (g, int(batch_size), float(damping), reuse)
        )

    def direction(self, delta_global):
        """Set the locals' Newton step for ``delta_global`` ``(G,)`` on every shard.

        Returns:
            ``(sum of local g . d, max local |d|)``.
        """
        dg = np.asarray(delta_global, np.float64)
        results = self._call("newton_direction", lambda s: (dg,))
        return sum(r[0] for r in results), max(r[1] for r in results)

    def evaluate(self, global_trial, alpha):
        """Value, global gradient and largest gradient component at ``x + alpha d``.

        Returns:
            ``(value, grad_global (G,), max |g|)``.
        """
        g = np.asarray(global_trial, np.float64)
        results = self._call("newton_evaluate", lambda s: (g, float(alpha)))
        self.num_evaluations += 1
        value, grad = self._reduce(results)
        return value, grad, max(_max_abs(grad), max(r[2] for r in results))

    def profile(self, global_flat, max_steps, gtol):
        """Every shard's :meth:`NewtonShardWorker.newton_profile`, summed.

        Returns:
            ``(value, grad_global (G,), max local |g|, reduce (G,) or None,
            decrement)``.
        """
        g = np.asarray(global_flat, np.float64)
        results = self._call(
            "newton_profile", lambda s: (g, int(max_steps), float(gtol))
        )
        self.num_evaluations += 1
        value, grad = self._reduce(results)
        reduce = (
            None
            if results[0][3] is None
            else np.sum([np.asarray(r[3], np.float64) for r in results], axis=0)
        )
        return (
            value,
            grad,
            max(r[2] for r in results),
            reduce,
            float(sum(r[4] for r in results)),
        )

    def accept(self, alpha):
        """Accept the last trial point on every shard.

        Returns:
            ``(reduce (G,), decrement)`` summed over shards, with the kept Hessian.
        """
        results = self._call("newton_accept", lambda s: (float(alpha),))
        reduce = np.sum([np.asarray(r[0], np.float64) for r in results], axis=0)
        return reduce, float(sum(r[1] for r in results))

    # --------------------------------------------------------------- Newton-CG
    def cg_start(self):
        """Every shard's :meth:`NewtonShardWorker.newton_cg_start`, summed ``(G,)``."""
        results = self._call("newton_cg_start", lambda s: ())
        return np.sum([np.asarray(r, np.float64) for r in results], axis=0)

    def cg_precondition(self, z_global):
        """Set the locals of ``z = M^{-1} r`` on every shard; sum of ``r_l . z_l``."""
        z = np.asarray(z_global, np.float64)
        return float(sum(self._call("newton_cg_precondition", lambda s: (z,))))

    def cg_hvp(self, global_flat, p_global, beta):
        """``H p`` on every shard (see :meth:`NewtonShardWorker.newton_cg_hvp`).

        Returns:
            ``((H p)_g (G,), sum of p_l . (H p)_l, sum_i C_i^T B_i^{-1} (H p)_i
            (G,))``.
        """
        g = np.asarray(global_flat, np.float64)
        p = np.asarray(p_global, np.float64)
        b = None if beta is None else float(beta)
        results = self._call("newton_cg_hvp", lambda s: (g, p, b))
        hp = np.sum([np.asarray(r[0], np.float64) for r in results], axis=0)
        red = np.sum([np.asarray(r[2], np.float64) for r in results], axis=0)
        return hp, float(sum(r[1] for r in results)), red

    def cg_step(self, alpha, z_global):
        """``s += alpha p``, ``r += alpha H p`` and the locals of ``z = M^{-1} r``
        on every shard; the sum of ``r_l . z_l``."""
        z = np.asarray(z_global, np.float64)
        return float(sum(self._call("newton_cg_step", lambda s: (float(alpha), z))))

    def cg_finish(self, tau):
        """End the solve on every shard; the sums of ``g_l . s_l`` and
        ``s_l . (H s)_l``."""
        results = self._call("newton_cg_finish", lambda s: (float(tau),))
        return float(sum(r[0] for r in results)), float(sum(r[1] for r in results))


@dataclass
class NewtonMAPResult(MAPResult):
    """:class:`~raybayes.optim.MAPResult` of :func:`find_map_newton`.

    Attributes:
        num_hessians: arrowhead Hessians computed.
        hessian_vector_products: Hessian-vector products per Hessian on the
            busiest shard (the most of any Hessian).
        warmup_steps: L-BFGS iterations before the first Newton step.
        newton_time_s: wall time of the Newton phase, in seconds.
    """

    num_hessians: int = 0
    hessian_vector_products: int = 0
    warmup_steps: int = 0
    newton_time_s: float = 0.0


def find_map_newton(
    objective: NewtonObjective,
    *,
    init: np.ndarray | None = None,
    gtol: float = 1e-6,
    max_steps: int = 100,
    warmup_steps: int = 500,
    tol: float = 1e-8,
    radius: float = 1.0,
    profile_steps: int = 5,
    batch_size: int = 16,
    progress_bar: bool = True,
    assemble: bool = True,
    **unknown,
) -> NewtonMAPResult:
    """Maximise the log joint by trust-region Newton steps on the arrowhead Hessian.

    See the module docstring for one iteration. Up to ``warmup_steps`` iterations
    of vector-free L-BFGS run first (stopping at a relative decrease of the loss
    below ``tol``): they are cheap, and they move from the prior's centre, where
    the Hessian of a hierarchical model is indefinite and trust-region steps are
    short, into the basin of the mode, where Newton's steps are long. On the
    elasticity model (300 products x 52 weeks) Newton from the origin took 44
    Hessians, after L-BFGS to ``tol=1e-8`` 3.

    Args:
        objective: a :class:`NewtonObjective` (its workers hold the locals).
        init: ``(objective.size,)`` starting point (unconstrained, driver layout);
            zeros by default.
        gtol: stop when the largest absolute gradient component (negative log
            joint, unconstrained space) is at most this.
        max_steps: at most this many accepted Newton steps.
        warmup_steps: at most this many L-BFGS iterations first (0: Newton from
            the start).
        tol: relative decrease of the loss at which the L-BFGS warm-up stops
            (see :func:`~raybayes.optim.find_map`).
        radius: initial trust radius of the globals' step (Euclidean norm, in the
            unconstrained space).
        profile_steps: after the warm-up and after every accepted step, at most
            this many Newton steps of every shard's locals with the globals fixed
            (on the workers, ``k`` Hessian-vector products each), towards their
            conditional mode, where ``S`` is the Hessian of the profile
            ``min_l f(g, l)`` (default 5; 0 leaves them).
        batch_size: Hessian-vector products evaluated together per worker.
        progress_bar: print a line per Newton step and Hessian to stderr (always
            logged at INFO on the ``raybayes.optim`` logger).
        assemble: also compute constrained values of every site at the MAP.

    Returns:
        :class:`NewtonMAPResult`: ``status`` ``"converged"`` (largest gradient
        component at most ``gtol``), ``"max_steps"``, ``"line_search_failed"``
        (no decrease along the direction from a fresh Hessian, even with the
        smallest trust radius) or ``"non_finite"``.

    Raises:
        ConfigurationError: ``objective`` is not a :class:`NewtonObjective`, or
            ``gtol``, ``max_steps``, ``warmup_steps``, ``radius`` or ``init`` out
            of range, or an unknown argument (before any work on the workers).
        ShardError: a shard worker failed (names the shard).

    References:
        Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed., Sec.
        3.1, Ch. 4 and Sec. 10.3. Moré, J. J. & Sorensen, D. C. (1983). Computing
        a trust region step. SIAM J. Sci. Stat. Comput. 4(3), 553-572.

    Examples:
        >>> import numpyro, numpyro.distributions as dist
        >>> from raybayes.core import Partition
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with NewtonObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     r = find_map_newton(f, warmup_steps=0, radius=10.0, progress_bar=False)
        >>> r.status, r.num_iterations, round(float(r.params["mu"]), 4)  # mode 4/5
        ('converged', 1, 0.8)
    """
    reject_unknown_arguments(unknown, "find_map_newton")
    if not isinstance(objective, NewtonObjective):
        raise ConfigurationError(
            f"objective is a {type(objective).__name__}; Newton steps need a "
            "NewtonObjective (or use fit_map(..., method='newton'))."
        )
    if not gtol > 0:
        raise ConfigurationError(f"gtol={gtol}; use a positive number such as 1e-6.")
    if int(max_steps) < 1:
        raise ConfigurationError(f"max_steps={max_steps}; use an integer >= 1.")
    if int(warmup_steps) < 0:
        raise ConfigurationError(
            f"warmup_steps={warmup_steps}; use an integer >= 0 (0: no L-BFGS)."
        )
    if not tol > 0:
        raise ConfigurationError(f"tol={tol}; use a positive number such as 1e-8.")
    if not radius > 0:
        raise ConfigurationError(f"radius={radius}; use a positive number such as 1.")
    if init is not None and np.shape(init) != (objective.size,):
        raise ConfigurationError(
            f"init has shape {np.shape(init)}; the objective needs ({objective.size},)."
        )
    emit = progress_lines(progress_bar, "raybayes.optim")
    start = time.perf_counter()
    evals_before = objective.num_evaluations
    x_global, value, grad_g, max_local, num_warmup, history, newton_start = _start(
        objective, init, warmup_steps, tol, gtol, profile_steps, progress_bar, emit
    )
    G = objective.num_global
    grad_max = max(_max_abs(grad_g), max_local)
    steps = hessians = num_hvp = rejected = age = 0
    radius = float(radius)
    eig = basis = reduce = None
    decrement = 0.0
    status, message = None, ""
    if not np.isfinite(value):
        status, message = "non_finite", "the log density is not finite at init"
    while status is None:
        if grad_max <= gtol:
            status, message = "converged", "largest gradient component <= gtol"
            break
        if steps >= int(max_steps):
            status, message = "max_steps", f"stopped after max_steps={max_steps}"
            break
        if eig is None:
            parts, local_damping, hvp_now = _damped_hessian(
                objective, x_global, batch_size
            )
            schur = arrowhead.sum_schur_parts([p[0] for p in parts], G)
            eig, basis = linalg.eigh(schur) if G else (np.zeros(0), np.zeros((0, 0)))
            reduce = np.sum([np.asarray(p[3], np.float64) for p in parts], axis=0)
            decrement = float(sum(p[4] for p in parts))
            hessians += 1
            num_hvp = max(num_hvp, hvp_now)
            rejected = age = 0
            emit(
                f"Newton Hessian {hessians}: {hvp_now} Hessian-vector products per "
                f"shard; smallest eigenvalue of S {eig[0] if G else 0.0:.3e}; local "
                f"damping {local_damping:.2e}  {time.perf_counter() - start:7.2f} s"
            )
        rhs = -grad_g + (reduce if G else 0.0)
        delta_g, lam = arrowhead.trust_region_step(eig, basis, rhs, radius)
        step_norm = float(np.linalg.norm(delta_g))
        # the reduced quadratic model's decrease: rhs.d - d S d / 2 + g B^-1 g / 2
        curvature = float(((basis.T @ delta_g) ** 2) @ eig) if G else 0.0
        predicted = float(rhs @ delta_g) - 0.5 * curvature + 0.5 * decrement
        local_slope, _ = objective.direction(delta_g)
        slope = float(grad_g @ delta_g) + local_slope
        alpha, accepted = 1.0, None
        rounding = 1e-12 * max(abs(value), 1.0)
        if slope < 0:
            for _ in range(8):
                new_value, new_grad, new_max = objective.evaluate(
                    x_global + alpha * delta_g, alpha
                )
                decrease = value - new_value
                armijo = decrease >= -_C1 * alpha * slope
                # near the mode the loss changes by less than its rounding error:
                # there a step is judged by the gradient it leaves
                level = abs(decrease) <= rounding and new_max < grad_max
                if np.isfinite(new_value) and (armijo or level):
                    accepted = (alpha, new_value, new_grad, new_max)
                    break
                alpha *= 0.25 if not np.isfinite(new_value) else 0.5
        if accepted is None:
            rejected += 1
            radius = max(0.25 * step_norm, 1e-12)
            if age and rejected >= 2:
                eig = None  # the kept Hessian may be stale: recompute it here
            elif not age and (rejected >= 4 or radius <= 1e-10):
                status = "line_search_failed"
                message = "no decrease along the Newton direction from a fresh Hessian"
            continue
        alpha, new_value, new_grad, new_max = accepted
        reduce, decrement = objective.accept(alpha)
        if profile_steps:
            new_value, new_grad, local_max, reduce, decrement = objective.profile(
                x_global + alpha * delta_g, profile_steps, gtol
            )
            new_max = max(_max_abs(new_grad), local_max)
        x_global = x_global + alpha * delta_g
        ratio = (value - new_value) / predicted if predicted > 0 else 0.0
        if alpha < 1.0:
            radius = max(alpha * step_norm, 1e-12)
        elif ratio > 0.75 and step_norm >= 0.9 * radius:
            radius = min(4.0 * radius, 1e6)
        elif ratio < 0.25:
            radius = max(0.5 * step_norm, 1e-12)
        value, grad_g = new_value, new_grad
        steps += 1
        age += 1
        rejected = 0
        history.append(value)
        emit(
            f"Newton step {steps:3d}  loss {value:.8e}  |grad|max {new_max:.3e}  "
            f"step {alpha:.3g} x {step_norm:.3e} (lam {lam:.2e}, ratio "
            f"{ratio:.3f})  {time.perf_counter() - start:7.2f} s"
        )
        if new_max > 0.25 * grad_max:  # slow progress: a fresh Hessian
            eig = None
        grad_max = new_max
    if status != "converged":
        emit(f"Newton stopped: {status} ({message})")
    x = objective.join(x_global, objective.gather_locals())
    now = time.perf_counter()
    fields = map_result_fields(
        objective,
        x,
        value,
        history,
        evals_before,
        status,
        f"{message}; {num_warmup} L-BFGS warm-up iteration(s), {steps} Newton "
        f"step(s) with {hessians} Hessian(s) (at most {num_hvp} Hessian-vector "
        f"products per shard each)",
        grad_max,
        now - start,
        0,
        assemble,
    )
    return NewtonMAPResult(
        **fields,
        num_hessians=hessians,
        hessian_vector_products=num_hvp,
        warmup_steps=num_warmup,
        newton_time_s=now - newton_start,
    )


def _call(part, fn, *args, trips=1):
    """Call ``fn(*args)``: the untimed stand-in for a clock's ``run(part, ...)``."""
    return fn(*args)


def _start(objective, init, warmup_steps, tol, gtol, profile_steps, progress_bar,
           emit, run=_call):
    """The L-BFGS warm-up, the start on the workers and the local profile steps.

    Shared by :func:`find_map_newton` and ``find_map_newton_cg``. ``run(part, fn,
    *args, trips=...)`` calls each piece (a clock that times them, or a plain call).

    Returns:
        ``(x_global, value, grad_global, max_local_grad, num_warmup, history,
        newton_start)``: the globals (shape ``(G,)``) with the locals left on the
        workers, the loss and the global gradient there, the largest local gradient
        component, the warm-up's iterations and loss history, and the
        ``time.perf_counter()`` at which the Newton phase began.
    """
    history: list[float] = []
    num_warmup = 0
    if warmup_steps:
        warm = run(
            "warmup",
            lambda: find_map_vector_free(
                objective,
                init=init,
                tol=tol,
                gtol=gtol,
                max_steps=int(warmup_steps),
                progress_bar=progress_bar,
                assemble=False,
            ),
            trips=0,
        )
        num_warmup = warm.num_iterations
        history += warm.history
        emit(f"L-BFGS warm-up: {num_warmup} iterations, {warm.status}")
    newton_start = time.perf_counter()
    if warmup_steps:  # the workers hold the locals: go on from there
        x_global = np.array(warm.x[: objective.num_global])
        value, grad_g, max_local = run("evaluate", objective.resume, x_global)
    else:
        if init is None:
            x_global, x_locals = np.zeros(objective.num_global), None
        else:
            x_global, x_locals = objective.split(np.asarray(init, np.float64))
            x_global = np.array(x_global)
        value, grad_g, _, max_local = run(
            "evaluate", objective.start, x_global, x_locals, 1
        )
    if profile_steps:
        value, grad_g, max_local, _, _ = run(
            "profile", objective.profile, x_global, profile_steps, gtol
        )
    return x_global, value, grad_g, max_local, num_warmup, history, newton_start


def _damped_hessian(objective, x_global, batch_size, run=_call):
    """The full arrowhead Hessian, its local blocks damped until positive definite.

    Where a shard reports a local block that is not positive definite, the same
    Hessian is taken again with ``damping * I`` added to every local block, the
    damping growing tenfold from 1e-3 of the Schur complement's largest diagonal
    entry (Nocedal & Wright 2006, Sec. 3.4).

    Returns:
        ``(parts, local_damping, hvp_per_shard)``: the shards' Schur parts, the
        damping used (0.0 when none was needed) and the largest number of
        Hessian-vector products a shard spent.
    """
    G = objective.num_global
    parts = run("hessian", objective.hessian, x_global, batch_size)
    local_damping = 0.0
    hvp_now = max(p[2] for p in parts)
    while sum(p[1] for p in parts) > 0:  # local blocks not positive definite
        schur = arrowhead.sum_schur_parts([p[0] for p in parts], G)
        scale = np.max(np.abs(np.diag(schur)), initial=1.0)
        if not np.isfinite(scale):
            scale = 1.0
        local_damping = max(10 * local_damping, 1e-3 * scale)
        parts = run(  # the same Hessian, damped
            "hessian", objective.hessian, x_global, batch_size, local_damping, True
        )
    return parts, local_damping, hvp_now
