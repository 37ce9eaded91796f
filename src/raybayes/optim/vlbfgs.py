"""Vector-free L-BFGS: distributed MAP with the local parameters kept on their shards.

:func:`~raybayes.optim.find_map` runs L-BFGS on the driver on the full vector
(globals and every shard's locals), so the driver holds ``2 * history_size + 2``
vectors whose length grows with the number of local parameters. Vector-free
L-BFGS (Chen, Wang & Zhou 2014) keeps every long vector distributed: each shard
worker holds the local slices ``(P_s, k)`` of the iterate ``x``, of the gradient
``g``, of the last ``m`` pairs ``s_i = x_{i+1} - x_i`` and ``y_i = g_{i+1} - g_i``,
and of the search direction ``d``; the driver holds only their global slices
``(G,)`` and the Gram matrix of the ``2m + 1`` basis vectors
``b = (s_{k-m}, ..., s_{k-1}, y_{k-m}, ..., y_{k-1}, g_k)``.

The two-loop recursion of L-BFGS (Nocedal 1980; Liu & Nocedal 1989) only combines
the basis vectors linearly and takes dot products between them, so it can be run on
the Gram matrix alone: it returns the coefficients ``delta`` (``2m + 1`` scalars) of
the direction ``d = sum_l delta_l b_l`` (Chen et al. 2014, Algorithm 3). Each dot
product is the driver's global part plus the sum of the shards' local parts, and
after a step only the products involving the new ``s``, ``y`` and ``g`` are new
(``3 (2m + 1)`` scalars per shard).

One iteration, in messages between the driver and the S shards:

1. line search on ``phi(alpha) = f(x + alpha d)``: the driver sends the trial
   globals ``(G,)`` and ``alpha``; each shard evaluates its term at its own trial
   locals and returns its value, its global gradient ``(G,)`` and the local part of
   ``grad . d`` (one scalar);
2. accept: the driver sends ``alpha``; each shard updates ``x``, ``s``, ``y`` and
   ``g`` in place and returns the local parts of the new dot products and its
   largest local gradient component;
3. direction: the driver computes ``delta`` from the Gram matrix and sends it;
   each shard forms its local slice of ``d``.

The driver's state is ``O(m G + m^2)`` floats whatever the number of local
parameters, and every message is ``O(G + m)`` floats. The line search is SciPy's
:func:`scipy.optimize.line_search` on the scalar function ``phi``: it enforces
the strong Wolfe conditions by bracketing and zoom (Nocedal & Wright 2006,
Algorithms 3.5-3.6). This is not the Moré & Thuente (1994) search that
:func:`~raybayes.optim.find_map`'s L-BFGS-B uses, so the two take different steps
and stop at slightly different points (within their tolerances) of the same mode.

Stopping follows :func:`~raybayes.optim.find_map` (Spark MLlib): relative decrease
of the loss below ``tol``, largest gradient component below ``gtol``, or
``max_steps`` iterations. A failed line search restarts from steepest descent with
an empty memory (at most ``max_restarts`` times) and then ends the run with its
status; it never raises.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from raybayes.config import reject_unknown_arguments, renamed_argument
from raybayes.distributed import ShardedObjective, ShardWorker, worker_precision
from raybayes.errors import ConfigurationError, ShardError
from raybayes.optim.result import MAPResult, map_result_fields
from raybayes.progress import progress_lines

__all__ = [
    "VLBFGSShardWorker",
    "VectorFreeMAPResult",
    "VectorFreeObjective",
    "find_map_vector_free",
    "two_loop_coefficients",
]

#: Wolfe constants (sufficient decrease, curvature), as in SciPy's BFGS.
_C1, _C2 = 1e-4, 0.9


def _max_abs(a) -> float:
    a = np.asarray(a)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _nbytes(obj) -> int:
    """Approximate size of a message: array bytes, 8 per scalar."""
    if obj is None:
        return 0
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 8


def two_loop_coefficients(gram: np.ndarray) -> np.ndarray:
    """Coefficients of the L-BFGS direction in the basis ``(s..., y..., g)``.

    The dot-product form of the two-loop recursion (Chen, Wang & Zhou 2014,
    Algorithm 3): with ``n`` pairs, the basis is ``b = (s_0, ..., s_{n-1}, y_0, ...,
    y_{n-1}, g)``, oldest pair first, and ``gram[i, j] = b_i . b_j``. The result
    ``delta`` gives the direction ``d = sum_l delta_l b_l = -H g``, where ``H`` is
    the L-BFGS inverse Hessian approximation with the initial scaling ``gamma =
    s_{n-1} . y_{n-1} / y_{n-1} . y_{n-1}`` (Liu & Nocedal 1989). With ``n = 0``
    it is ``(-1,)``: steepest descent.

    Args:
        gram: ``(2n + 1, 2n + 1)`` symmetric Gram matrix; ``s_i . y_i > 0`` for
            every pair.

    Returns:
        ``(2n + 1,)`` float64 coefficients.

    Raises:
        ConfigurationError: ``gram`` is not square of odd size.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s, g = rng.standard_normal(4), rng.standard_normal(4)
        >>> b = np.stack([s, 2 * s, g])  # one pair, y = 2 s: H = I / 2
        >>> d = two_loop_coefficients(b @ b.T) @ b
        >>> np.allclose(d, -g / 2)
        True
    """
    gram = np.asarray(gram, np.float64)
    size = gram.shape[0]
    if gram.ndim != 2 or gram.shape[1] != size or size % 2 != 1:
        raise ConfigurationError(
            f"gram has shape {gram.shape}; it must be (2n + 1, 2n + 1)."
        )
    n = (size - 1) // 2
    delta = np.zeros(size)
    delta[-1] = -1.0
    if n == 0:
        return delta
    alpha = np.zeros(n)
    for i in reversed(range(n)):
        alpha[i] = (gram[i] @ delta) / gram[i, n + i]
        delta[n + i] -= alpha[i]
    delta *= gram[n - 1, 2 * n - 1] / gram[2 * n - 1, 2 * n - 1]
    for i in range(n):
        beta = (gram[n + i] @ delta) / gram[i, n + i]
        delta[i] += alpha[i] - beta
    return delta


class VLBFGSShardWorker(ShardWorker):
    """A shard worker that also holds its slices of the L-BFGS state.

    Holds, as ``(P_s, k)`` float64 arrays: the local parameters ``x``, the gradient
    ``g`` at ``x``, the last ``m`` pairs ``s_i``/``y_i`` (oldest first), the search
    direction ``d``, and the gradient at the last trial point of the line search.
    Every method returns scalars or arrays of size ``O(G + m)``, except
    :meth:`vlbfgs_locals`.
    """

    # ------------------------------------------------------------------ state
    def _vf(self):
        state = getattr(self, "_vlbfgs", None)
        if state is None:
            raise ShardError(self.shard_id, "vlbfgs_start was not called")
        return state

    def _basis(self):
        st = self._vf()
        return [*st["s"], *st["y"], st["g"]]

    def _local_shape(self):
        d = self.density
        return (int(d.num_local_entities), int(d.num_local_per_entity))

    @worker_precision
    def vlbfgs_start(self, global_flat, local_mat, history_size: int):
        """Set the starting point and empty the memory.

        Args:
            global_flat: ``(G,)`` globals.
            local_mat: ``(P_s, k)`` locals of this shard, or ``None`` for zeros.
            history_size: m, the pairs kept.

        Returns:
            ``(value, grad_global (G,), local g . g, local max |g|)``.
        """
        self._check()
        shape = self._local_shape()
        x = (
            np.zeros(shape)
            if local_mat is None
            else np.array(local_mat, np.float64).reshape(shape)
        )
        value, gg, gl = self.value_and_grad(global_flat, x)
        gl = np.asarray(gl, np.float64).reshape(shape)
        self._vlbfgs = dict(
            m=int(history_size), x=x, g=gl, s=[], y=[], d=np.zeros(shape), trial=None
        )
        return value, np.asarray(gg, np.float64), float(np.vdot(gl, gl)), _max_abs(gl)

    @worker_precision
    def vlbfgs_evaluate(self, global_trial, alpha: float):
        """Value and gradient at ``x + alpha d`` (globals given by the driver).

        Keeps the local gradient there for :meth:`vlbfgs_accept`.

        Returns:
            ``(value, grad_global (G,), local grad . d)``.
        """
        st = self._vf()
        alpha = float(alpha)
        trial = st["x"] + alpha * st["d"]
        value, gg, gl = self.value_and_grad(global_trial, trial)
        gl = np.asarray(gl, np.float64).reshape(trial.shape)
        st["trial"] = (alpha, gl)
        return value, np.asarray(gg, np.float64), float(np.vdot(gl, st["d"]))

    def vlbfgs_accept(self, alpha: float, keep_pair: bool):
        """Move to the last trial point ``x + alpha d`` and update the memory.

        ``s = alpha d``, ``y = g_trial - g``; the pair is appended when
        ``keep_pair`` (the oldest beyond m is dropped).

        Returns:
            ``(rows, local max |g|)``: ``rows`` ``(r, 2n + 1)`` are the local parts of
            ``v . b_l`` for ``v`` in ``(s_new, y_new, g_new)`` (``r = 3``) or
            ``(g_new,)`` (``r = 1``, no pair kept), over the new basis
            ``b = (s..., y..., g)``.

        Raises:
            ShardError: the last trial point was not at ``alpha``.
        """
        st = self._vf()
        alpha = float(alpha)
        if st["trial"] is None or st["trial"][0] != alpha:
            raise ShardError(
                self.shard_id, f"no gradient kept at the accepted step {alpha}"
            )
        g_new = st["trial"][1]
        s = alpha * st["d"]
        y = g_new - st["g"]
        st["x"] = st["x"] + s
        st["g"] = g_new
        st["trial"] = None
        if keep_pair:
            st["s"].append(s)
            st["y"].append(y)
            if len(st["s"]) > st["m"]:
                del st["s"][0], st["y"][0]
            new = (s, y, g_new)
        else:
            new = (g_new,)
        basis = self._basis()
        rows = np.array(
            [[np.dot(v.ravel(), b.ravel()) for b in basis] for v in new],
            np.float64,
        ).reshape(len(new), len(basis))
        return rows, _max_abs(g_new)

    def vlbfgs_direction(self, delta, reset: bool = False):
        """Form the local direction ``d = sum_l delta_l b_l``.

        Args:
            delta: ``(2n + 1,)`` coefficients over the basis ``(s..., y..., g)``.
            reset: empty the memory first (then ``delta`` has one entry).

        Raises:
            ShardError: ``delta`` does not match the memory.
        """
        st = self._vf()
        if reset:
            st["s"], st["y"] = [], []
        basis = self._basis()
        delta = np.asarray(delta, np.float64)
        if delta.shape != (len(basis),):
            raise ShardError(
                self.shard_id,
                f"delta has shape {delta.shape}; the basis has {len(basis)} vectors",
            )
        d = delta[-1] * basis[-1]
        for c, b in zip(delta[:-1], basis[:-1], strict=True):
            d = d + c * b
        st["d"] = d
        return None

    def vlbfgs_locals(self) -> np.ndarray:
        """The local parameters ``(P_s, k)`` at the current iterate."""
        return self._vf()["x"]


class VectorFreeObjective(ShardedObjective):
    """A :class:`~raybayes.distributed.ShardedObjective` whose workers hold their
    slices of the L-BFGS state (:class:`VLBFGSShardWorker`).

    Same arguments as :class:`~raybayes.distributed.ShardedObjective`. The driver
    helpers below send and receive only ``O(G + m)`` numbers per call (except
    :meth:`start` with given locals, and :meth:`gather_locals`), and count them.

    Attributes:
        bytes_sent: bytes of the arguments the driver sent (one copy per shard), an
            approximation from the arrays' sizes, 8 per scalar.
        bytes_received: bytes of the results the driver received.
    """

    worker_class = VLBFGSShardWorker

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_sent = 0
        self.bytes_received = 0

    def _call(self, method, per_shard_args):
        """:meth:`gather`, counting the bytes sent and received."""
        futures = []
        for s in range(self.num_shards):
            args = per_shard_args(s)
            self.bytes_sent += _nbytes(args)
            futures.append(self.submit(s, method, *args))
        results = [self.result(f) for f in futures]
        self.bytes_received += sum(_nbytes(r) for r in results)
        return results

    def start(self, global_flat, locals_, history_size):
        """Set the workers' starting point; ``locals_`` per shard or ``None``.

        Returns:
            ``(value, grad_global (G,), sum of local g . g, max local |g|)``.
        """
        g = np.asarray(global_flat, np.float64)
        results = self._call(
            "vlbfgs_start",
            lambda s: (g, None if locals_ is None else locals_[s], int(history_size)),
        )
        self.num_evaluations += 1
        value, grad = self._reduce(results)
        return value, grad, sum(r[2] for r in results), max(r[3] for r in results)

    def evaluate_step(self, global_trial, alpha):
        """``phi(alpha)``'s pieces at ``x + alpha d``.

        Returns:
            ``(value, grad_global (G,), sum of local grad . d)``.
        """
        g = np.asarray(global_trial, np.float64)
        results = self._call("vlbfgs_evaluate", lambda s: (g, float(alpha)))
        self.num_evaluations += 1
        value, grad = self._reduce(results)
        return value, grad, sum(r[2] for r in results)

    def accept_step(self, alpha, keep_pair):
        """Accept the last trial point on every shard.

        Returns:
            ``(rows (r, 2n + 1) summed over shards, max local |g|)``.
        """
        results = self._call("vlbfgs_accept", lambda s: (float(alpha), bool(keep_pair)))
        rows = np.sum([r[0] for r in results], axis=0)
        return rows, max(r[1] for r in results)

    def set_direction(self, delta, reset=False):
        """Send the direction's coefficients ``delta`` ``(2n + 1,)`` to every shard."""
        delta = np.asarray(delta, np.float64)
        self._call("vlbfgs_direction", lambda s: (delta, bool(reset)))

    def gather_locals(self) -> list[np.ndarray]:
        """Every shard's local matrix ``(P_s, k)`` (the only O(P) transfer)."""
        return [
            np.asarray(r, np.float64) for r in self._call("vlbfgs_locals", lambda s: ())
        ]

    @staticmethod
    def _reduce(results):
        value = float(sum(r[0] for r in results))
        grad = np.sum([np.asarray(r[1], np.float64) for r in results], axis=0)
        return value, grad


@dataclass
class VectorFreeMAPResult(MAPResult):
    """:class:`~raybayes.optim.MAPResult` with the driver's communication and memory.

    Attributes:
        bytes_sent: per iteration, bytes the driver sent to the shards (line search
            evaluations, accepting the step, the next direction; one copy per
            shard).
        bytes_received: per iteration, bytes the driver received.
        driver_state_bytes: peak bytes of the optimizer state held on the driver
            (global slices of ``x``, ``g``, ``d``, of the ``m`` pairs, and the Gram
            matrix): ``O(m G + m^2)``, independent of the local parameters.
    """

    bytes_sent: list = field(default_factory=list)
    bytes_received: list = field(default_factory=list)
    driver_state_bytes: int = 0


class _DriverState:
    """The driver's slices: globals of x, g, d, of the pairs, and the Gram blocks."""

    def __init__(self, x, g, gg, history_size):
        self.m = int(history_size)
        self.x, self.g, self.gg = x, g, float(gg)
        self.d = np.zeros_like(x)
        num_global = x.shape[0]
        self.S = np.zeros((0, num_global))
        self.Y = np.zeros((0, num_global))
        self.SS = np.zeros((0, 0))
        self.SY = np.zeros((0, 0))  # SY[i, j] = s_i . y_j
        self.YY = np.zeros((0, 0))
        self.gS = np.zeros(0)
        self.gY = np.zeros(0)

    @property
    def n(self):
        return self.S.shape[0]

    def nbytes(self):
        arrays = (self.x, self.g, self.d, self.S, self.Y, self.SS, self.SY, self.YY)
        return sum(a.nbytes for a in arrays) + self.gS.nbytes + self.gY.nbytes + 8

    def gram(self):
        n = self.n
        out = np.empty((2 * n + 1, 2 * n + 1))
        out[:n, :n], out[:n, n : 2 * n], out[n : 2 * n, n : 2 * n] = (
            self.SS,
            self.SY,
            self.YY,
        )
        out[n : 2 * n, :n] = self.SY.T
        out[-1, :n] = out[:n, -1] = self.gS
        out[-1, n : 2 * n] = out[n : 2 * n, -1] = self.gY
        out[-1, -1] = self.gg
        return out

    def reset(self):
        n = 0
        self.S, self.Y = self.S[:n], self.Y[:n]
        self.SS, self.SY, self.YY = self.SS[:n, :n], self.SY[:n, :n], self.YY[:n, :n]
        self.gS, self.gY = self.gS[:n], self.gY[:n]

    def accept(self, alpha, grad_trial, keep_pair, rows):
        """Update the global slices, and the Gram blocks with the shards' ``rows``."""
        s = alpha * self.d
        y = grad_trial - self.g
        self.x = self.x + s
        self.g = grad_trial
        if keep_pair:
            keep = 1 if self.n >= self.m else 0
            self.S = np.vstack([self.S[keep:], s])
            self.Y = np.vstack([self.Y[keep:], y])
        n = self.n
        basis = np.vstack([self.S, self.Y, self.g[None]])
        new = np.vstack([s, y, self.g]) if keep_pair else self.g[None]
        rows = rows + new @ basis.T  # global parts + the shards' local parts
        if keep_pair:
            r_s, r_y = rows[0], rows[1]
            ss = np.zeros((n, n))
            sy = np.zeros((n, n))
            yy = np.zeros((n, n))
            ss[:-1, :-1] = self.SS[keep:, keep:]
            sy[:-1, :-1] = self.SY[keep:, keep:]
            yy[:-1, :-1] = self.YY[keep:, keep:]
            ss[-1, :] = ss[:, -1] = r_s[:n]
            sy[-1, :] = r_s[n : 2 * n]  # s_new . y_j
            sy[:, -1] = r_y[:n]  # s_i . y_new
            yy[-1, :] = yy[:, -1] = r_y[n : 2 * n]
            self.SS, self.SY, self.YY = ss, sy, yy
        r_g = rows[-1]
        self.gS, self.gY, self.gg = r_g[:n], r_g[n : 2 * n], float(r_g[2 * n])


def find_map_vector_free(
    objective: VectorFreeObjective,
    *,
    init: np.ndarray | None = None,
    tol: float = 1e-6,
    gtol: float = 1e-5,
    max_steps: int = 100,
    history_size: int = 10,
    max_restarts: int = 5,
    progress_bar: bool = True,
    assemble: bool = True,
    **deprecated,
) -> VectorFreeMAPResult:
    """Maximise the log joint with vector-free L-BFGS over the shard workers.

    Same optimisation problem, stopping rule and result as
    :func:`~raybayes.optim.find_map`, but the local parameters, and their slices of
    the gradient, of the L-BFGS memory and of the direction stay on their shard
    workers (see the module docstring): the driver holds ``O(m G + m^2)`` numbers.
    The first step (and the first after a restart) is steepest descent scaled to
    unit length; later steps start the line search at ``alpha = 1``.

    Args:
        objective: a :class:`VectorFreeObjective` (its workers hold the state).
        init: ``(objective.size,)`` starting point (unconstrained, driver layout);
            zeros by default, sent to the workers without forming the full vector.
        tol: relative decrease of the loss ``(f_k - f_{k+1}) / max(|f_k|,
            |f_{k+1}|, 1)`` at which to stop (Spark MLlib ``tol``).
        gtol: largest gradient component at which to stop.
        max_steps: maximum iterations (accepted steps; the old name ``max_iter=``
            is deprecated).
        history_size: m, the L-BFGS memory (pairs kept on the workers).
        max_restarts: restarts from steepest descent with an empty memory after a
            failed line search that followed progress.
        progress_bar: print a line per iteration to stderr (always logged at INFO
            on the ``raybayes.optim`` logger; the old name ``progress=`` is
            deprecated).
        assemble: also compute constrained values of every site at the MAP.

    Returns:
        :class:`VectorFreeMAPResult`: a :class:`~raybayes.optim.MAPResult` (``x``
        in the layout of ``objective.join``) with the bytes the driver sent and
        received per iteration and its peak optimizer state in bytes.

    Raises:
        ConfigurationError: ``objective`` is not a :class:`VectorFreeObjective`,
            or ``tol``, ``gtol``, ``max_steps``, ``history_size`` or ``init`` out
            of range, or an unknown argument (before any work on the workers).

    References:
        Chen, W., Wang, Z. & Zhou, J. (2014). Large-scale L-BFGS using MapReduce.
        Advances in Neural Information Processing Systems 27, 1332-1340.
        Nocedal, J. (1980). Updating quasi-Newton matrices with limited storage.
        Math. Comp. 35(151), 773-782.
        Liu, D. C. & Nocedal, J. (1989). On the limited memory BFGS method for large
        scale optimization. Math. Program. 45, 503-528.
        Nocedal, J. & Wright, S. J. (2006). Numerical Optimization, 2nd ed.,
        Algorithms 3.5-3.6 (the strong-Wolfe search of
        :func:`scipy.optimize.line_search`); Moré, J. J. & Thuente, D. J. (1994).
        Line search algorithms with guaranteed sufficient decrease. ACM Trans.
        Math. Softw. 20(3), 286-307 (the search of ``find_map``'s L-BFGS-B).

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> from raybayes.core.partition import Partition
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0, 1))
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1), obs=y)
        >>> with VectorFreeObjective(model, {"y": np.ones(4)}, partition=Partition(
        ...         "obs", entity_args=("y",)), num_shards=2) as f:
        ...     r = find_map_vector_free(f, progress_bar=False)
        >>> round(float(r.params["mu"]), 4)  # posterior mode 4/5
        0.8
    """
    max_steps = renamed_argument(deprecated, "max_iter", "max_steps", max_steps,
                                 default=100)
    progress_bar = renamed_argument(deprecated, "progress", "progress_bar",
                                    progress_bar, default=True)
    reject_unknown_arguments(deprecated, "find_map_vector_free")
    max_iter = max_steps
    if not isinstance(objective, VectorFreeObjective):
        raise ConfigurationError(
            f"objective is a {type(objective).__name__}; vector-free L-BFGS needs a "
            "VectorFreeObjective (or use fit_map(..., vector_free=True))."
        )
    if not tol > 0:
        raise ConfigurationError(f"tol={tol}; use a positive number such as 1e-6.")
    if not gtol >= 0:
        raise ConfigurationError(f"gtol={gtol}; use a number >= 0 such as 1e-5.")
    if int(max_iter) < 1:
        raise ConfigurationError(f"max_steps={max_iter}; use an integer >= 1.")
    if int(history_size) < 1:
        raise ConfigurationError(
            f"history_size={history_size}; use an integer >= 1 such as 10."
        )
    if init is None:
        x_global, x_locals = np.zeros(objective.num_global), None
    else:
        x0 = np.asarray(init, np.float64)
        if x0.shape != (objective.size,):
            raise ConfigurationError(
                f"init has shape {x0.shape}; the objective needs ({objective.size},)."
            )
        x_global, x_locals = objective.split(x0)
        x_global = np.array(x_global)
    emit = progress_lines(progress_bar, "raybayes.optim")
    start = time.perf_counter()
    evals_before = objective.num_evaluations
    m = int(history_size)

    value, g_glob, gg_loc, maxabs_loc = objective.start(x_global, x_locals, m)
    state = _DriverState(x_global, g_glob, g_glob @ g_glob + gg_loc, m)
    grad_norm = max(_max_abs(g_glob), maxabs_loc)
    history: list[float] = []
    sent, received = [], []
    peak_state = state.nbytes()
    num_restarts = 0

    def traffic():
        return objective.bytes_sent, objective.bytes_received

    def steepest_descent(reset):
        norm = math.sqrt(state.gg)
        delta = np.array([-1.0 / norm])
        if reset:
            state.reset()
        state.d = delta[0] * state.g
        objective.set_direction(delta, reset=reset)
        return -norm  # phi'(0) = g . d

    if not (np.isfinite(value) and np.isfinite(state.gg)):
        status, message = "non_finite", "the log density is not finite at init"
    elif grad_norm <= gtol:
        status, message = "converged", "largest gradient component <= gtol at init"
    else:
        status, message = None, ""
        dphi0 = steepest_descent(reset=False)
    last_traffic = traffic()
    while status is None:
        ls = _line_search(objective, state, value, dphi0)
        if ls["alpha"] is None:
            if state.n > 0 and num_restarts < max_restarts:
                num_restarts += 1
                emit(f"VL-BFGS restart {num_restarts} after a failed line search")
                dphi0 = steepest_descent(reset=True)
                continue
            status = "non_finite" if ls["non_finite"] else "line_search_failed"
            message = ls["message"]
            break
        alpha, new_value, grad_trial, dphi = (
            ls["alpha"],
            ls["value"],
            ls["grad"],
            ls["dphi"],
        )
        sy = alpha * (dphi - dphi0)  # s . y along the line, before any exchange
        keep_pair = bool(sy > np.finfo(float).eps * alpha * abs(dphi0))
        rows, maxabs_loc = objective.accept_step(alpha, keep_pair)
        state.accept(alpha, grad_trial, keep_pair, rows)
        grad_norm = max(_max_abs(state.g), maxabs_loc)
        history.append(new_value)
        rel = (value - new_value) / max(abs(value), abs(new_value), 1.0)
        value = new_value
        if grad_norm <= gtol:
            status, message = "converged", "largest gradient component <= gtol"
        elif rel <= tol:
            status, message = "converged", "relative decrease of the loss <= tol"
        elif len(history) >= int(max_iter):
            status, message = "max_steps", f"stopped after max_steps={max_iter}"
        else:
            gram = state.gram()
            delta = two_loop_coefficients(gram)
            state.d = delta @ np.vstack([state.S, state.Y, state.g[None]])
            dphi0 = float(delta @ gram[-1])  # g . d from the Gram matrix
            if np.isfinite(dphi0) and dphi0 < 0:
                objective.set_direction(delta)
            else:  # not a descent direction (rounding): forget the memory
                num_restarts += 1
                dphi0 = steepest_descent(reset=True)
        now = traffic()
        sent.append(now[0] - last_traffic[0])
        received.append(now[1] - last_traffic[1])
        last_traffic = now
        peak_state = max(peak_state, state.nbytes())
        emit(
            f"VL-BFGS iter {len(history):4d}  loss {value:.8e}  "
            f"|grad|max {grad_norm:.3e}  "
            f"evals {objective.num_evaluations - evals_before:4d}  "
            f"{time.perf_counter() - start:7.2f} s"
        )
    elapsed = time.perf_counter() - start
    if status != "converged":
        emit(f"VL-BFGS stopped: {status} ({message})")
    x = objective.join(state.x, objective.gather_locals())
    return VectorFreeMAPResult(
        **map_result_fields(objective, x, value, history, evals_before, status,
                            message, grad_norm, elapsed, num_restarts, assemble),
        bytes_sent=sent,
        bytes_received=received,
        driver_state_bytes=int(peak_state),
    )


def _line_search(objective, state, value0, dphi0):
    """Strong-Wolfe search on ``phi(alpha) = f(x + alpha d)`` (SciPy's routine).

    Returns a dict: ``alpha`` (``None`` on failure), ``value``, ``grad`` (global
    gradient ``(G,)`` there), ``dphi``, ``non_finite`` (a trial point had a
    non-finite value or gradient) and ``message``. The workers keep the gradient
    of the last point evaluated, which is ``alpha``.
    """
    cache: dict[float, tuple[float, float]] = {}
    last = {"alpha": None, "grad": None}
    flags = {"non_finite": False}

    def evaluate(alpha):
        alpha = float(alpha)
        if alpha not in cache:
            x_trial = state.x + alpha * state.d
            value, grad, dot = objective.evaluate_step(x_trial, alpha)
            dphi = float(grad @ state.d + dot)
            if not (np.isfinite(value) and np.isfinite(dphi)):
                flags["non_finite"] = True
                value, dphi = np.inf, np.inf
            cache[alpha] = (float(value), dphi)
            last["alpha"], last["grad"] = alpha, grad
        return cache[alpha]

    def phi(a):
        return evaluate(a[0])[0]

    def dphi(a):
        return np.array([evaluate(a[0])[1]])

    with warnings.catch_warnings():
        # SciPy's LineSearchWarning (a RuntimeWarning): failures are reported below.
        warnings.filterwarnings(
            "ignore", "(The line search|Rounding errors)", RuntimeWarning
        )
        with np.errstate(all="ignore"):
            alpha, *_ = optimize.line_search(
                phi,
                dphi,
                np.zeros(1),
                np.ones(1),
                gfk=np.array([dphi0]),
                old_fval=float(value0),
                c1=_C1,
                c2=_C2,
                maxiter=20,
            )
    out = dict(alpha=None, non_finite=flags["non_finite"], message="")
    if alpha is not None:
        alpha = float(alpha)
        val, der = evaluate(alpha)
        # SciPy returns its last step, Wolfe or not, when it runs out of
        # iterations: keep it only if it decreases the loss enough (Armijo).
        if np.isfinite(val) and val <= value0 + _C1 * alpha * dphi0 and alpha > 0:
            if last["alpha"] != alpha:  # the workers keep the last point only
                cache.pop(alpha)
                val, der = evaluate(alpha)
            out.update(alpha=alpha, value=val, grad=last["grad"], dphi=der)
            return out
    out["message"] = (
        "the log density was not finite along the search direction"
        if flags["non_finite"]
        else "the line search found no step meeting the strong Wolfe conditions"
    )
    return out
