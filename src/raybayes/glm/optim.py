"""Driver-side optimizers for penalized GLMs: L-BFGS, OWL-QN and damped Newton.

Each optimizer sees the objective only through callbacks that return the full-batch
value (and gradient, Hessian); the callbacks sum the shard workers' results, so the
optimizers themselves hold vectors of length ``num_features + 1`` only. Pure NumPy
and SciPy, no Ray.

The objective is always on the *mean* scale,
``F(w) = (1/n) sum_i nll_i(w) + (l2/2) ||beta||^2 + l1 ||beta||_1``, so that ``tol``
means what it means in scikit-learn: the largest absolute entry of the (projected or
pseudo-) gradient at which the solver stops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import closing as _closing
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.optimize

from raybayes.config import renamed_argument
from raybayes.progress import LossProgress

__all__ = ["OptimizeResult", "minimize_lbfgs", "minimize_owlqn", "minimize_newton"]

_FTOL = 64 * np.finfo(float).eps  # relative decrease at which progress has stalled


class OptimizeResult(NamedTuple):
    """Outcome of one optimizer run.

    Attributes:
        x: the solution, shape ``(p,)``.
        fun: objective at ``x``.
        grad_max: largest absolute (pseudo-)gradient entry at ``x``.
        num_iterations: iterations taken.
        num_evaluations: objective evaluations (each one distributed pass over X).
        converged: whether ``grad_max <= tol`` (or the objective stopped changing at
            machine precision) within ``max_steps``.
        message: the reason for stopping, for humans.
        hess: the Hessian at ``x`` when the solver computed it there, else ``None``.
    """

    x: np.ndarray
    fun: float
    grad_max: float
    num_iterations: int
    num_evaluations: int
    converged: bool
    message: str
    hess: np.ndarray | None = None


def _renamed(deprecated: dict, max_steps: int, progress_bar: bool, func: str):
    """``(max_steps, progress_bar)`` after the deprecated ``max_iter``/``verbose``."""
    max_steps = renamed_argument(
        deprecated, "max_iter", "max_steps", max_steps, default=100
    )
    progress_bar = renamed_argument(
        deprecated, "verbose", "progress_bar", progress_bar, default=False
    )
    if deprecated:
        raise TypeError(
            f"{func}() got unexpected keyword arguments {sorted(deprecated)}"
        )
    return int(max_steps), bool(progress_bar)


def _progress_bar(enabled: bool, name: str, max_steps: int) -> LossProgress:
    """The shared optimizer progress display: a bar of iterations and the objective."""
    return LossProgress(max_steps, label=name, enabled=enabled)


def _show(bar: LossProgress, it: int, f: float, gmax: float) -> None:
    bar.update(it, f, extra=f"max|grad| {gmax:.3e}")


def minimize_lbfgs(
    value_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    *,
    tol: float = 1e-4,
    max_steps: int = 100,
    history: int = 10,
    progress_bar: bool = False,
    **deprecated,
) -> OptimizeResult:
    """Minimize a smooth objective with SciPy's L-BFGS-B (strong-Wolfe line search).

    The settings are scikit-learn's for ``LogisticRegression(solver="lbfgs")``:
    ``gtol=tol``, ``ftol=64 * eps``, ``maxls=50``.

    Args:
        value_and_grad: ``x -> (F(x), grad F(x))``.
        x0: start, shape ``(p,)``.
        tol: stop when the largest absolute projected-gradient entry is ``<= tol``.
        max_steps: at most this many iterations (``max_iter`` is a deprecated
            alias).
        history: number of (s, y) pairs kept.
        progress_bar: show the iterations, objective and largest gradient entry
            on stderr (:class:`raybayes.progress.LossProgress`; ``verbose`` is a
            deprecated alias).

    Returns:
        :class:`OptimizeResult`. A line-search failure is reported in ``message``
        with ``converged=False``; it does not raise.

    Raises:
        TypeError: an unknown keyword argument.
        ConfigurationError: both ``max_iter`` and ``max_steps`` (or ``verbose`` and
            ``progress_bar``) given with different values.

    References:
        Byrd, Lu, Nocedal & Zhu, "A limited memory algorithm for bound constrained
        optimization", SIAM J. Sci. Comput. 16(5), 1995.

    Examples:
        >>> res = minimize_lbfgs(lambda x: (float(x @ x), 2 * x), np.ones(3))
        >>> bool(res.converged), float(abs(res.x).max()) < 1e-6
        (True, True)
    """
    max_steps, progress_bar = _renamed(
        deprecated, max_steps, progress_bar, "minimize_lbfgs"
    )
    last = {}

    def fun(x):
        f, g = value_and_grad(x)
        last["f"], last["g"] = f, g
        return f, g

    count = [0]

    def callback(intermediate_result):
        count[0] += 1
        _show(bar, count[0], last["f"], float(np.max(np.abs(last["g"]))))

    bar = _progress_bar(progress_bar, "lbfgs", max_steps)
    try:
        res = scipy.optimize.minimize(
            fun,
            np.asarray(x0, dtype=np.float64),
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options=dict(
                maxiter=max_steps, maxls=50, gtol=tol, ftol=_FTOL, maxcor=history
            ),
        )
    finally:
        bar.close()
    gmax = float(np.max(np.abs(res.jac))) if res.jac.size else 0.0
    message = res.message if isinstance(res.message, str) else str(res.message)
    converged = bool(res.success) and res.nit < max_steps or gmax <= tol
    return OptimizeResult(
        res.x, float(res.fun), gmax, int(res.nit), int(res.nfev), converged, message
    )


def _pseudo_gradient(x, g, l1):
    """Minimum-norm subgradient of ``f(x) + sum_i l1_i |x_i|``."""
    pg = np.where(x > 0, g + l1, np.where(x < 0, g - l1, 0.0))
    at0 = x == 0
    right = g + l1  # derivative moving up from 0
    left = g - l1  # derivative moving down from 0
    pg = np.where(at0 & (right < 0), right, pg)
    pg = np.where(at0 & (left > 0), left, pg)
    return pg


def _two_loop(v, pairs):
    """L-BFGS two-loop recursion: approximately ``H^{-1} v``."""
    q = v.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * (s @ q)
        q -= a * y
        alphas.append(a)
    if pairs:
        s, y, _ = pairs[-1]
        q *= (s @ y) / (y @ y)
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        b = rho * (y @ q)
        q += (a - b) * s
    return q


def minimize_owlqn(
    value_and_grad: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x0: np.ndarray,
    l1: np.ndarray,
    *,
    tol: float = 1e-4,
    max_steps: int = 100,
    history: int = 10,
    max_linesearch: int = 50,
    progress_bar: bool = False,
    **deprecated,
) -> OptimizeResult:
    """Minimize ``f(x) + sum_i l1_i |x_i|`` with OWL-QN (f smooth, l1 >= 0).

    Orthant-wise limited-memory quasi-Newton: the L-BFGS direction computed from the
    pseudo-gradient, with the sign of each coordinate kept in the orthant of the
    current point (coordinates that would cross zero are set to zero), and a
    backtracking line search with Armijo's condition on the projected point. The
    (s, y) pairs use the gradient of the smooth part only.

    Args:
        value_and_grad: ``x -> (f(x), grad f(x))`` of the smooth part.
        x0: start, shape ``(p,)``.
        l1: L1 weight of each coordinate, shape ``(p,)`` (0 for an unpenalized
            intercept).
        tol: stop when the largest absolute pseudo-gradient entry is ``<= tol``.
        max_steps: at most this many iterations (``max_iter`` is a deprecated
            alias).
        history: number of (s, y) pairs kept.
        max_linesearch: backtracking steps before the line search is declared failed.
        progress_bar: show the iterations, objective and largest gradient entry
            on stderr (:class:`raybayes.progress.LossProgress`; ``verbose`` is a
            deprecated alias).

    Returns:
        :class:`OptimizeResult`; ``fun`` includes the L1 term. A line-search failure
        ends the run with ``converged=False`` and a message; it does not raise.

    Raises:
        TypeError: an unknown keyword argument.
        ConfigurationError: a deprecated alias given together with its new name.

    References:
        Andrew & Gao, "Scalable training of L1-regularized log-linear models",
        ICML 2007. https://doi.org/10.1145/1273496.1273501

    Examples:
        >>> vg = lambda x: (float(0.5 * (x - 2) @ (x - 2)), x - 2)
        >>> res = minimize_owlqn(vg, np.zeros(2), np.array([1.0, 3.0]), tol=1e-10)
        >>> np.round(res.x, 6).tolist()  # soft threshold of 2 at 1 and 3
        [1.0, 0.0]
    """
    max_steps, progress_bar = _renamed(
        deprecated, max_steps, progress_bar, "minimize_owlqn"
    )
    with _closing(_progress_bar(progress_bar, "owlqn", max_steps)) as bar:
        return _owlqn(
            value_and_grad, x0, l1, tol, max_steps, history, max_linesearch, bar
        )


def _owlqn(value_and_grad, x0, l1, tol, max_steps, history, max_linesearch, bar):
    l1 = np.asarray(l1, dtype=np.float64)
    x = np.asarray(x0, dtype=np.float64).copy()
    f, g = value_and_grad(x)
    F = f + float(l1 @ np.abs(x))
    nfev = 1
    pairs: deque = deque(maxlen=history)
    pg = _pseudo_gradient(x, g, l1)
    gmax = float(np.max(np.abs(pg)))
    message = "maximum number of iterations reached"
    converged = gmax <= tol
    it = 0
    if converged:
        message = "pseudo-gradient below tol at the start"
    while not converged and it < max_steps:
        it += 1
        d = -_two_loop(pg, list(pairs))
        d = np.where(d * pg >= 0, 0.0, d)  # keep only descent coordinates
        if not np.any(d):
            d = -pg
        orthant = np.where(x != 0, np.sign(x), -np.sign(pg))
        t = 1.0 if pairs else 1.0 / max(1.0, float(np.linalg.norm(pg)))
        accepted = False
        for _ in range(max_linesearch):
            x_new = x + t * d
            x_new = np.where(np.sign(x_new) == orthant, x_new, 0.0)
            f_new, g_new = value_and_grad(x_new)
            nfev += 1
            F_new = f_new + float(l1 @ np.abs(x_new))
            if F_new <= F + 1e-4 * float(pg @ (x_new - x)):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            message = "line search failed to decrease the objective"
            break
        s, yv = x_new - x, g_new - g
        sy = float(s @ yv)
        if sy > 1e-10 * float(yv @ yv):
            pairs.append((s, yv, 1.0 / sy))
        decrease = F - F_new
        x, f, g, F = x_new, f_new, g_new, F_new
        pg = _pseudo_gradient(x, g, l1)
        gmax = float(np.max(np.abs(pg)))
        _show(bar, it, F, gmax)
        if gmax <= tol:
            converged, message = True, "pseudo-gradient below tol"
        elif decrease <= _FTOL * max(abs(F), 1.0):
            converged, message = True, "relative decrease of the objective below 64 eps"
    return OptimizeResult(x, F, gmax, it, nfev, converged, message)


def minimize_newton(
    value_grad_hess: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]],
    value: Callable[[np.ndarray], float],
    x0: np.ndarray,
    *,
    tol: float = 1e-4,
    max_steps: int = 100,
    max_linesearch: int = 30,
    progress_bar: bool = False,
    **deprecated,
) -> OptimizeResult:
    """Minimize a smooth convex objective with a damped Newton method.

    Each iteration solves ``H p = -g`` by Cholesky (adding ``mu I`` with growing
    ``mu`` while ``H`` is not numerically positive definite) and takes the largest
    step ``t`` in ``1, 1/2, 1/4, ...`` that satisfies Armijo's condition. The value,
    gradient and Hessian at the full step come from a single pass over the data; the
    backtracking steps, which are rare near the optimum, use value-only passes.

    Args:
        value_grad_hess: ``x -> (F(x), grad F(x), Hessian F(x))``.
        value: ``x -> F(x)``, cheaper than ``value_grad_hess``.
        x0: start, shape ``(p,)``.
        tol: stop when the largest absolute gradient entry is ``<= tol``.
        max_steps: at most this many iterations (``max_iter`` is a deprecated
            alias).
        max_linesearch: backtracking steps before the line search is declared failed.
        progress_bar: show the iterations, objective and largest gradient entry
            on stderr (:class:`raybayes.progress.LossProgress`; ``verbose`` is a
            deprecated alias).

    Returns:
        :class:`OptimizeResult`, with the Hessian at the solution in ``hess``.

    Raises:
        TypeError: an unknown keyword argument.
        ConfigurationError: a deprecated alias given together with its new name.

    References:
        Nocedal & Wright, "Numerical Optimization", 2nd ed., Springer 2006,
        Algorithm 3.2 (line search Newton with Hessian modification).

    Examples:
        >>> A = np.array([[3.0, 1.0], [1.0, 2.0]])
        >>> vgh = lambda x: (float(0.5 * x @ A @ x - x.sum()), A @ x - 1, A)
        >>> res = minimize_newton(vgh, lambda x: vgh(x)[0], np.zeros(2), tol=1e-12)
        >>> np.round(res.x, 6).tolist()
        [0.2, 0.4]
    """
    max_steps, progress_bar = _renamed(
        deprecated, max_steps, progress_bar, "minimize_newton"
    )
    with _closing(_progress_bar(progress_bar, "newton", max_steps)) as bar:
        return _newton(value_grad_hess, value, x0, tol, max_steps, max_linesearch, bar)


def _newton(value_grad_hess, value, x0, tol, max_steps, max_linesearch, bar):
    x = np.asarray(x0, dtype=np.float64).copy()
    f, g, H = value_grad_hess(x)
    nfev = 1
    gmax = float(np.max(np.abs(g)))
    converged = gmax <= tol
    message = (
        "gradient below tol at the start"
        if converged
        else ("maximum number of iterations reached")
    )
    it = 0
    while not converged and it < max_steps:
        it += 1
        p = _newton_direction(H, g)
        slope = float(g @ p)
        x_new = x + p
        f_new, g_new, H_new = value_grad_hess(x_new)
        nfev += 1
        t = 1.0
        ok = np.isfinite(f_new) and f_new <= f + 1e-4 * slope
        for _ in range(max_linesearch):
            if ok:
                break
            t *= 0.5
            x_new = x + t * p
            f_new = value(x_new)
            nfev += 1
            ok = np.isfinite(f_new) and f_new <= f + 1e-4 * t * slope
        if not ok:
            message = "line search failed to decrease the objective"
            break
        if t != 1.0:
            f_new, g_new, H_new = value_grad_hess(x_new)
            nfev += 1
        decrease = f - f_new
        x, f, g, H = x_new, f_new, g_new, H_new
        gmax = float(np.max(np.abs(g)))
        _show(bar, it, f, gmax)
        if gmax <= tol:
            converged, message = True, "gradient below tol"
        elif decrease <= _FTOL * max(abs(f), 1.0):
            converged, message = True, "relative decrease of the objective below 64 eps"
    return OptimizeResult(x, f, gmax, it, nfev, converged, message, H)


def _newton_direction(H, g):
    """Solve ``(H + mu I) p = -g`` with the smallest ``mu >= 0`` that factorizes."""
    scale = max(float(np.max(np.abs(np.diag(H)))), 1e-300)
    mu = 0.0
    for _ in range(60):
        try:
            c = scipy.linalg.cho_factor(H + mu * np.eye(len(g)), check_finite=False)
            p = scipy.linalg.cho_solve(c, -g, check_finite=False)
            if np.all(np.isfinite(p)) and g @ p < 0:
                return p
        except np.linalg.LinAlgError:
            pass
        mu = max(2 * mu, 1e-10 * scale)
    return -g
