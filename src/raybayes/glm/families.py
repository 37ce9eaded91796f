"""Loss, gradient and Hessian of one shard of a generalized linear model (NumPy).

This is the numerical core that runs on each shard worker. It holds one block of rows
``(X_s, y_s)`` and returns, for given coefficients, the *sum* over its rows of the
negative log likelihood, its gradient and, on request, its Hessian. The driver adds
the shards up and runs the optimizer, so the distributed result is exactly the
single-process one up to floating-point summation order.

Memory bandwidth is the limit of a gradient pass on a CPU (the work per byte of ``X``
is two multiply-adds). The rows are therefore processed in blocks small enough to
stay in the L2 cache: ``z = X_b @ beta`` and ``X_b.T @ r`` read the block from main
memory once, not twice. Float32 data stay float32 (half the bytes); the per-block
sums are accumulated in float64.

No Ray import here: the module runs, and is tested, in-process.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg.blas

__all__ = ["FAMILIES", "ShardTerms", "GLMShard", "logistic_nll", "poisson_nll"]

FAMILIES = ("logistic", "poisson")

# Rows per block: 2048 rows x 100 float32 features = 0.8 MB, well inside L2.
_BLOCK_BYTES = 1 << 20


class ShardTerms(NamedTuple):
    """Sums over the rows of one shard, at one coefficient vector.

    Attributes:
        loss: negative log likelihood summed over the rows (float).
        grad: its gradient, shape ``(num_features + 1,)``; the last entry is the
            intercept's (zero when the model has none). ``None`` if not asked for.
        hess: its Hessian, shape ``(num_features + 1, num_features + 1)``, or ``None``.
        num_rows: rows in the shard.
    """

    loss: float
    grad: np.ndarray | None
    hess: np.ndarray | None
    num_rows: int


def _softplus(z):
    """``log(1 + exp(z))`` without overflow, in the dtype of ``z``."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _logistic_block(z, y, need_grad, need_hess):
    """Per-row terms of the Bernoulli-logit negative log likelihood."""
    loss = float(np.sum(_softplus(z) - y * z, dtype=np.float64))
    if not (need_grad or need_hess):
        return loss, None, None
    # expit(z) = 1 / (1 + exp(-z)), evaluated without overflow warnings.
    e = np.exp(-np.abs(z))
    p = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    r = p - y
    w = p * (1 - p) if need_hess else None
    return loss, r, w


def _poisson_block(z, y, need_grad, need_hess):
    """Per-row terms of the Poisson-log negative log likelihood (without log y!)."""
    mu = np.exp(z)
    loss = float(np.sum(mu - y * z, dtype=np.float64))
    if not (need_grad or need_hess):
        return loss, None, None
    return loss, mu - y, (mu if need_hess else None)


_BLOCK_FNS = {"logistic": _logistic_block, "poisson": _poisson_block}


def _gram(S):
    """``S.T @ S`` for a C-contiguous ``(k, d)`` block, via BLAS syrk."""
    syrk = _SYRK.get(S.dtype.char)
    if syrk is None:
        return S.T @ S
    # S.T is Fortran-ordered (d, k): syrk(a) = a @ a.T, upper triangle only.
    upper = syrk(1.0, S.T, trans=0, lower=0)
    return np.triu(upper) + np.triu(upper, 1).T


_SYRK = {"f": scipy.linalg.blas.ssyrk, "d": scipy.linalg.blas.dsyrk}


class GLMShard:
    """One shard of rows of a GLM, held by one worker.

    Args:
        X: features of the shard, shape ``(num_rows, num_features)``, float32 or
            float64 (other dtypes are converted to float64). Read, never copied when
            already C-contiguous float.
        y: targets, shape ``(num_rows,)``: 0/1 labels (``"logistic"``) or
            non-negative counts (``"poisson"``).
        family: ``"logistic"`` or ``"poisson"``.
        block_rows: rows per cache block (default: about 1 MB of ``X``).

    Raises:
        ValueError: an unknown family or mismatched shapes.

    Examples:
        >>> import numpy as np
        >>> X = np.array([[0.0], [1.0], [2.0]], dtype=np.float32)
        >>> shard = GLMShard(X, np.array([0.0, 1.0, 1.0]), "logistic")
        >>> round(shard.evaluate(np.zeros(2)).loss, 4)  # 3 * log(2)
        2.0794
    """

    def __init__(self, X, y, family, block_rows=None):
        if family not in _BLOCK_FNS:
            raise ValueError(f"family={family!r}; use one of {FAMILIES}.")
        X = np.asarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        if not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        y = np.asarray(y, dtype=X.dtype)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(
                f"X has shape {X.shape} and y {y.shape}; want (n, d), (n,)."
            )
        self.X = X
        self.y = y
        self.family = family
        row_bytes = max(1, X.shape[1] * X.itemsize)
        self.block_rows = int(block_rows or max(256, _BLOCK_BYTES // row_bytes))
        self._block_fn = _BLOCK_FNS[family]

    @property
    def num_rows(self) -> int:
        return self.X.shape[0]

    def ping(self) -> int:
        """Rows held (used to wait until the worker is up)."""
        return self.num_rows

    def evaluate(
        self, coef, need_grad=True, need_hess=False, fit_intercept=True
    ) -> ShardTerms:
        """Sum the loss (and gradient, Hessian) over this shard's rows.

        Args:
            coef: coefficients, shape ``(num_features + 1,)``: ``beta`` then the
                intercept (ignored when ``fit_intercept=False``).
            need_grad: also return the gradient.
            need_hess: also return the gradient and the Hessian.
            fit_intercept: whether ``coef[-1]`` is an intercept; if not, it is
                ignored and its gradient and Hessian entries are zero.

        Returns:
            :class:`ShardTerms` with float64 arrays.
        """
        X, y = self.X, self.y
        n, d = X.shape
        coef = np.asarray(coef, dtype=np.float64)
        beta = coef[:d].astype(X.dtype)
        b = X.dtype.type(coef[d] if fit_intercept else 0.0)
        need_grad = need_grad or need_hess
        loss = 0.0
        g = np.zeros(d + 1) if need_grad else None
        H = np.zeros((d + 1, d + 1)) if need_hess else None
        step = self.block_rows
        for start in range(0, n, step):
            Xb = X[start : start + step]
            yb = y[start : start + step]
            z = Xb @ beta
            z += b
            lb, r, w = self._block_fn(z, yb, need_grad, need_hess)
            loss += lb
            if need_grad:
                g[:d] += Xb.T @ r
                g[d] += float(np.sum(r, dtype=np.float64))
            if need_hess:
                # X_b^T diag(w) X_b = S^T S with S = sqrt(w) X_b: one symmetric
                # rank-k update (BLAS syrk, half the flops of a general product).
                Xs = Xb * np.sqrt(w)[:, None]
                H[:d, :d] += _gram(Xs)
                col = (Xb.T @ w).astype(np.float64)
                H[:d, d] += col
                H[d, :d] += col
                H[d, d] += float(np.sum(w, dtype=np.float64))
        if not fit_intercept:
            if need_grad:
                g[d] = 0.0
            if need_hess:
                H[d, :] = 0.0
                H[:, d] = 0.0
        return ShardTerms(loss, g, H, n)

    def loss(self, coef, fit_intercept=True) -> float:
        """The summed negative log likelihood only (one read of ``X``)."""
        return self.evaluate(coef, need_grad=False, fit_intercept=fit_intercept).loss


def logistic_nll(X, y, coef, fit_intercept=True) -> float:
    """Summed Bernoulli-logit negative log likelihood, in float64 (reference).

    Args:
        X: ``(n, d)``; y: ``(n,)`` labels in {0, 1}; coef: ``(d + 1,)`` (intercept
        last, ignored when ``fit_intercept=False``).
    """
    X = np.asarray(X, dtype=np.float64)
    coef = np.asarray(coef, dtype=np.float64)
    z = X @ coef[:-1] + (coef[-1] if fit_intercept else 0.0)
    return float(np.sum(np.logaddexp(0.0, z) - np.asarray(y, np.float64) * z))


def poisson_nll(X, y, coef, fit_intercept=True) -> float:
    """Summed Poisson-log negative log likelihood without ``log(y!)`` (reference)."""
    X = np.asarray(X, dtype=np.float64)
    coef = np.asarray(coef, dtype=np.float64)
    z = X @ coef[:-1] + (coef[-1] if fit_intercept else 0.0)
    return float(np.sum(np.exp(z) - np.asarray(y, np.float64) * z))
