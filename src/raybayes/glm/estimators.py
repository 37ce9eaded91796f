"""scikit-learn compatible GLM estimators fitted on data-sharded workers.

``LogisticRegression`` and ``PoissonRegression`` split the rows of ``(X, y)`` over
``num_workers`` shard workers (Ray actors, or in-process with ``backend="local"``).
Each worker holds its rows for the whole fit and returns the loss, gradient and, for
Newton's method, the Hessian of its rows; the driver adds them up and runs the
optimizer (L-BFGS, OWL-QN for L1/elastic net, or damped Newton). The penalized
objective is scikit-learn's, so the coefficients agree with scikit-learn's for the
same penalty. Standard errors come from the Laplace approximation at the optimum.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from raybayes.backends import Backend
from raybayes.config import ScalingConfig, renamed_argument, resolve_scaling
from raybayes.errors import ConfigurationError, RaybayesWarning
from raybayes.glm.optim import minimize_lbfgs, minimize_newton, minimize_owlqn
from raybayes.glm.sharded import ShardedGLMData
from raybayes.glm.validation import check_features, check_positive

__all__ = ["LogisticRegression", "PoissonRegression"]

_PENALTIES = ("l2", "l1", "elasticnet", None)
_DEPRECATED = "deprecated"  # default of a renamed argument (scikit-learn's convention)
_SOLVERS = ("lbfgs", "newton")


class _ShardedGLM(BaseEstimator):
    """Shared fitting code; subclasses set the family and the penalty scale."""

    _family: str

    # --- configuration -------------------------------------------------------
    def _penalty_strengths(self, n):
        """``(l2, l1)`` on the mean-loss scale; overridden by subclasses."""
        raise NotImplementedError

    def _check_params(self):
        if self.penalty not in _PENALTIES:
            raise ConfigurationError(
                f"penalty={self.penalty!r}; use 'l2', 'l1', 'elasticnet' or None."
            )
        if self.solver not in _SOLVERS:
            raise ConfigurationError(
                f"solver={self.solver!r}; use 'lbfgs' (default) or 'newton'."
            )
        if self.penalty == "elasticnet":
            r = self.l1_ratio
            if r is None or isinstance(r, bool) or not 0 <= r <= 1:
                raise ConfigurationError(
                    f"l1_ratio={r!r} with penalty='elasticnet'; use a number in "
                    "[0, 1] (0 is pure L2, 1 is pure L1)."
                )
        if self.solver == "newton" and self.penalty in ("l1", "elasticnet"):
            raise ConfigurationError(
                f"solver='newton' does not handle penalty={self.penalty!r} (the L1 "
                "term is not differentiable); use solver='lbfgs', which runs OWL-QN."
            )
        check_positive("tol", self.tol)
        # Resolved once per fit (one FutureWarning for a deprecated name).
        self._fit_max_steps = max_steps = self._max_steps()
        if (
            isinstance(max_steps, bool)
            or not isinstance(max_steps, (int, np.integer))
            or max_steps < 1
        ):
            raise ConfigurationError(
                f"max_steps={max_steps!r}; use a positive integer, e.g. max_steps=100."
            )
        self._fit_progress_bar = self._progress_bar()
        if self.backend not in ("auto", "ray", "local") and not isinstance(
            self.backend, Backend
        ):
            raise ConfigurationError(
                f"backend={self.backend!r}; use 'auto' (default), 'local', 'ray' or a "
                "raybayes Backend instance."
            )
        self._scaling()

    # scikit-learn keeps every constructor argument as given (get_params, clone),
    # so the deprecated names are resolved when fitting, not in __init__.
    def _max_steps(self):
        old = {} if self.max_iter == _DEPRECATED else {"max_iter": self.max_iter}
        return renamed_argument(
            old, "max_iter", "max_steps", self.max_steps, default=100
        )

    def _progress_bar(self):
        old = {} if self.verbose == _DEPRECATED else {"verbose": self.verbose}
        return bool(
            renamed_argument(
                old, "verbose", "progress_bar", self.progress_bar, default=False
            )
        )

    def _scaling(self) -> ScalingConfig:
        """The estimator's scaling configuration (validated)."""
        scaling, _ = resolve_scaling(
            self.backend,
            self.num_workers,
            self.use_gpu,
            self.resources_per_worker,
            self.address,
        )
        return scaling

    def _l1_ratio(self):
        return {"l2": 0.0, "l1": 1.0, None: 0.0}.get(self.penalty, self.l1_ratio)

    # --- fitting -------------------------------------------------------------
    def _fit(self, X, y):
        """Fit on arrays (placed on workers for this fit) or on ShardedGLMData."""
        if isinstance(X, ShardedGLMData):
            if y is not None:
                raise ConfigurationError(
                    "fit(data, y) got a ShardedGLMData and a y; the targets are "
                    "already in the data: call fit(data)."
                )
            if X.family != self._family:
                raise ConfigurationError(
                    f"the ShardedGLMData holds family={X.family!r} data; "
                    f"{type(self).__name__} needs family={self._family!r}."
                )
            data, owns_data = X, False
        else:
            if y is None:
                raise ConfigurationError("fit(X, y) needs y (or a ShardedGLMData X).")
            scaling = self._scaling()
            data = ShardedGLMData(
                X,
                y,
                self._family,
                num_workers=scaling.num_workers,
                backend=self.backend,
                address=scaling.address,
                use_gpu=scaling.use_gpu,
                resources_per_worker=scaling.resources_per_worker,
            )
            owns_data = True
        try:
            self._fit_on(data)
        finally:
            if owns_data:
                data.close()
        return self

    def _fit_on(self, data):
        n, d = data.num_rows, data.num_features
        l2, l1 = self._penalty_strengths(n)
        use_l1 = l1 > 0
        penalty_mask = np.ones(d + 1)
        penalty_mask[d] = 0.0
        x0 = np.zeros(d + 1)
        if self.fit_intercept:
            x0[d] = self._initial_intercept(data.y_mean)
        t0 = time.perf_counter()
        objective = data.objective
        res = self._optimize(objective, x0, n, l2, l1 * penalty_mask, use_l1)
        self.optimize_s_ = time.perf_counter() - t0
        self._set_result(res, d)
        self.standard_errors_ = None
        self.covariance_ = None
        if self.standard_errors:
            self._laplace(objective, res, n, l2, use_l1)
        self.backend_start_s_ = data.backend_start_s
        self.setup_s_ = data.setup_s
        self.num_workers_ = data.num_workers
        self.backend_ = data.backend_name
        self.n_features_in_ = d
        if data.feature_names is not None:
            self.feature_names_in_ = np.asarray(data.feature_names, dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        if self._is_classifier:
            self.classes_ = data.classes

    def _optimize(self, objective, x0, n, l2, l1_vec, use_l1):
        d = len(x0) - 1
        fi = bool(self.fit_intercept)

        def vg(w):
            t = objective.evaluate(w, fit_intercept=fi)
            beta = w.copy()
            beta[d] = 0.0
            return t.loss / n + 0.5 * l2 * (beta @ beta), t.grad / n + l2 * beta

        kw = dict(
            tol=self.tol,
            max_steps=int(self._fit_max_steps),
            progress_bar=self._fit_progress_bar,
        )
        if use_l1:
            return minimize_owlqn(vg, x0, l1_vec, **kw)
        if self.solver == "lbfgs":
            return minimize_lbfgs(vg, x0, **kw)

        reg = np.full(d + 1, l2)
        reg[d] = 0.0

        def vgh(w):
            t = objective.evaluate(w, need_hess=True, fit_intercept=fi)
            beta = w.copy()
            beta[d] = 0.0
            H = t.hess / n + np.diag(reg)
            if not fi:
                H[d, d] = 1.0  # the gradient entry is 0: the step leaves it at 0
            return t.loss / n + 0.5 * l2 * (beta @ beta), t.grad / n + l2 * beta, H

        def value(w):
            beta = w.copy()
            beta[d] = 0.0
            return objective.evaluate(
                w, need_grad=False, fit_intercept=fi
            ).loss / n + 0.5 * l2 * (beta @ beta)

        return minimize_newton(vgh, value, x0, **kw)

    def _set_result(self, res, d):
        self.coef_ = (
            np.asarray(res.x[:d]).reshape(1, d)
            if self._is_classifier
            else (np.asarray(res.x[:d]))
        )
        self.intercept_ = (
            (np.array([res.x[d]]) if self._is_classifier else float(res.x[d]))
            if self.fit_intercept
            else (np.zeros(1) if self._is_classifier else 0.0)
        )
        self.n_iter_ = np.array([res.num_iterations], dtype=np.int32)
        self.objective_ = res.fun
        self.converged_ = res.converged
        self.optimizer_message_ = res.message
        self.num_passes_ = res.num_evaluations
        self._theta = np.asarray(res.x, dtype=np.float64)
        if not res.converged:
            import warnings

            warnings.warn(
                f"{type(self).__name__} did not converge in max_steps="
                f"{self._fit_max_steps} iterations ({res.message}; max |gradient| "
                f"{res.grad_max:.3g} > tol={self.tol}). Increase max_steps, or use "
                "solver='newton' for "
                "ill-conditioned features.",
                RaybayesWarning,
                stacklevel=3,
            )

    def _laplace(self, objective, res, n, l2, use_l1):
        """Covariance = inverse Hessian of the penalized negative log likelihood."""
        d = len(res.x) - 1
        if res.hess is not None:
            H = res.hess * n  # Newton's Hessian is on the mean scale
        else:
            H = objective.evaluate(
                res.x, need_hess=True, fit_intercept=bool(self.fit_intercept)
            ).hess
            H = H + n * l2 * np.diag(np.r_[np.ones(d), 0.0])
        keep = np.ones(d + 1, dtype=bool)
        if use_l1:
            keep[:d] = res.x[:d] != 0  # the active set: the L1 term is locally linear
        if not self.fit_intercept:
            keep[d] = False
        cov = np.full((d + 1, d + 1), np.nan)
        idx = np.flatnonzero(keep)
        if idx.size:
            sub = H[np.ix_(idx, idx)]
            try:
                inv = np.linalg.inv(sub)
            except np.linalg.LinAlgError:
                inv = np.linalg.pinv(sub)
            cov[np.ix_(idx, idx)] = inv
        self.covariance_ = cov
        self.standard_errors_ = np.sqrt(np.diag(cov))

    # --- reporting -----------------------------------------------------------
    def summary(self):
        """Coefficient table with Laplace standard errors and Wald intervals.

        Returns:
            ``pandas.DataFrame`` indexed by feature (then ``"intercept"``) with
            columns ``coef``, ``std_err``, ``z``, ``p_value`` (two-sided),
            ``ci_2.5%`` and ``ci_97.5%``. Standard errors of coefficients that an L1
            penalty set to zero are NaN.

        Raises:
            sklearn.exceptions.NotFittedError: before :meth:`fit`.
            ConfigurationError: the model was fitted with ``standard_errors=False``.
        """
        import pandas as pd
        from scipy.stats import norm

        check_is_fitted(self, "coef_")
        if self.standard_errors_ is None:
            raise ConfigurationError(
                "summary() needs standard errors; refit with standard_errors=True."
            )
        names = list(getattr(self, "feature_names_in_", [])) or [
            f"x{j}" for j in range(self.n_features_in_)
        ]
        names = names + ["intercept"]
        coef = self._theta
        se = self.standard_errors_
        with np.errstate(divide="ignore", invalid="ignore"):
            z = coef / se
        q = norm.ppf(0.975)
        table = pd.DataFrame(
            {
                "coef": coef,
                "std_err": se,
                "z": z,
                "p_value": 2 * norm.sf(np.abs(z)),
                "ci_2.5%": coef - q * se,
                "ci_97.5%": coef + q * se,
            },
            index=names,
        )
        if not self.fit_intercept:
            table = table.drop(index="intercept")
        return table

    def _linear_predictor(self, X):
        check_is_fitted(self, "coef_")
        X = check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ConfigurationError(
                f"X has {X.shape[1]} features; the model was fitted with "
                f"{self.n_features_in_}."
            )
        d = self.n_features_in_
        return X.astype(np.float64, copy=False) @ self._theta[:d] + (
            self._theta[d] if self.fit_intercept else 0.0
        )


_COMMON_ARGS = """
        fit_intercept: fit an unpenalized intercept.
        solver: ``"lbfgs"`` (default; SciPy's L-BFGS-B, or OWL-QN when the penalty
            has an L1 part) or ``"newton"`` (damped Newton: every iteration reduces
            the ``(d + 1) x (d + 1)`` Hessian over the shards; best for
            ill-conditioned features with ``d`` up to a few thousand; L2 only).
        tol: stop when the largest absolute (projected or pseudo-) gradient entry of
            the mean-scaled objective is at most ``tol``, as scikit-learn's lbfgs.
        max_steps: maximum number of optimizer iterations (Spark MLlib's
            ``maxIter``, scikit-learn's ``max_iter``).
        standard_errors: compute ``standard_errors_`` and ``covariance_`` by the
            Laplace approximation (one extra pass with the Hessian after L-BFGS).
        num_workers: shard workers (row blocks); ``None`` uses one per CPU of the
            backend (one in-process; at most one per row).
        backend: ``"auto"`` (default), ``"local"`` (in-process), ``"ray"`` (an
            embedded local Ray instance unless ``address`` or ``RAY_ADDRESS`` names
            a cluster) or a started :class:`raybayes.backends.Backend` (left
            running). ``"auto"`` is Ray only when the scaling arguments ask for it
            (``num_workers > 1``, ``address``, ``RAY_ADDRESS``, ``use_gpu``,
            ``resources_per_worker``); a one-shot fit on one machine otherwise runs
            in-process and starts no workers (NumPy's BLAS still uses every core).
        use_gpu: one GPU per worker (``backend="ray"`` only; the GLM numerics are
            NumPy, so this only reserves the device).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 2}``.
        address: Ray cluster address, ``"host:port"`` (``backend="ray"`` only).
        progress_bar: show the optimizer's iterations and objective on stderr.
        max_iter, verbose: deprecated aliases of ``max_steps`` and
            ``progress_bar`` (a ``FutureWarning``; removed in the next release)."""


class LogisticRegression(ClassifierMixin, _ShardedGLM):
    __doc__ = f"""Binary logistic regression fitted on data-sharded workers.

    Minimizes scikit-learn's objective
    ``C * sum_i nll_i(w) + (1 - r)/2 ||beta||^2 + r ||beta||_1`` (``r`` is
    ``l1_ratio``: 0 for ``"l2"``, 1 for ``"l1"``; the intercept is not penalized),
    so ``coef_`` equals ``sklearn.linear_model.LogisticRegression``'s for the same
    ``C`` and penalty. Internally the mean loss is minimized with
    ``l2 = (1 - r) / (C n)`` and ``l1 = r / (C n)``.

    Args:
        penalty: ``"l2"`` (default), ``"l1"``, ``"elasticnet"`` or ``None``.
        C: inverse penalty strength, ``> 0``; ``np.inf`` means no penalty.
        l1_ratio: L1 share of the elastic-net penalty, in ``[0, 1]``.{_COMMON_ARGS}

    Attributes:
        classes_: the two labels, shape ``(2,)``; ``classes_[1]`` is the positive one.
        coef_: shape ``(1, n_features)``.
        intercept_: shape ``(1,)``.
        n_iter_: shape ``(1,)``, optimizer iterations.
        standard_errors_: Laplace standard errors of ``(*coef, intercept)``, shape
            ``(n_features + 1,)`` (NaN for coefficients that L1 set to zero).
        covariance_: the inverse Hessian of the penalized negative log likelihood,
            shape ``(n_features + 1, n_features + 1)``.
        objective_: the mean-scaled objective at the optimum.
        converged_, num_passes_, backend_, num_workers_, backend_start_s_,
            setup_s_, optimize_s_: run facts (passes over the data; the backend's
            name and worker count; seconds to start the backend, to place the
            shards, and to optimize).

    Raises (from ``fit``):
        DataValidationError: non-finite features, labels outside {{0, 1}}, not two
            classes, length mismatch.
        ConfigurationError: bad parameters (naming the value and the allowed
            ones), or more workers than rows.
        ShardError: a worker failed (with the worker's traceback).
        ClusterConnectionError: nothing answers at ``address``.

    References:
        Andrew & Gao, "Scalable training of L1-regularized log-linear models",
        ICML 2007 (OWL-QN). Tierney & Kadane, "Accurate approximations for posterior
        moments and marginal densities", JASA 81, 1986 (Laplace approximation).

    Examples:
        >>> import numpy as np
        >>> X = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([0, 0, 1, 1])
        >>> clf = LogisticRegression(backend="local", num_workers=2).fit(X, y)
        >>> clf.predict(X).tolist()
        [0, 0, 1, 1]
    """

    _family = "logistic"
    _is_classifier = True

    def __init__(
        self,
        penalty="l2",
        *,
        C=1.0,
        l1_ratio=None,
        fit_intercept=True,
        solver="lbfgs",
        tol=1e-4,
        max_steps=100,
        standard_errors=True,
        num_workers=None,
        backend="auto",
        use_gpu=False,
        resources_per_worker=None,
        address=None,
        progress_bar=False,
        max_iter=_DEPRECATED,
        verbose=_DEPRECATED,
    ):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.tol = tol
        self.max_steps = max_steps
        self.standard_errors = standard_errors
        self.num_workers = num_workers
        self.backend = backend
        self.use_gpu = use_gpu
        self.resources_per_worker = resources_per_worker
        self.address = address
        self.progress_bar = progress_bar
        self.max_iter = max_iter
        self.verbose = verbose

    def _penalty_strengths(self, n):
        if self.penalty is None or np.isinf(self.C):
            return 0.0, 0.0
        r = self._l1_ratio()
        return (1 - r) / (self.C * n), r / (self.C * n)

    @staticmethod
    def _initial_intercept(y_mean):
        return 0.0

    def fit(self, X, y=None):
        """Fit on rows ``X`` of shape ``(n, d)`` and labels ``y`` of shape ``(n,)``.

        The parameters and the data are checked before any worker starts.

        Args:
            X: features, array-like or DataFrame of shape ``(n, d)`` (float32 stays
                float32), or a :class:`~raybayes.glm.ShardedGLMData` whose workers
                already hold the data (then ``y=None``).
            y: two class labels, shape ``(n,)``; ``classes_[1]`` is the positive one.

        Returns:
            ``self``, fitted.

        Raises:
            ConfigurationError: a bad parameter (named, with the allowed values), a
                deprecated name given with its new one, or more workers than rows.
            DataValidationError: non-finite features, labels that are not two
                classes, a length mismatch (naming the column, count and a row).
            ShardError: a worker failed (with its traceback).
            ClusterConnectionError: nothing answers at ``address``.
        """
        self._check_params()
        check_positive("C", self.C, allow_inf=True)
        return self._fit(X, y)

    def decision_function(self, X):
        """Log-odds of the positive class, shape ``(n,)``."""
        return self._linear_predictor(X)

    def predict_proba(self, X):
        """Class probabilities, shape ``(n, 2)`` in the order of ``classes_``."""
        z = self.decision_function(X)
        p1 = np.exp(-np.logaddexp(0.0, -z))
        return np.column_stack([1 - p1, p1])

    def predict_log_proba(self, X):
        """Log class probabilities, shape ``(n, 2)``."""
        z = self.decision_function(X)
        return np.column_stack([-np.logaddexp(0.0, z), -np.logaddexp(0.0, -z)])

    def predict(self, X):
        """Predicted labels (from ``classes_``), shape ``(n,)``."""
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


class PoissonRegression(RegressorMixin, _ShardedGLM):
    __doc__ = f"""Poisson regression with a log link, fitted on data-sharded workers.

    Minimizes scikit-learn's ``PoissonRegressor`` objective
    ``1/(2n) sum_i deviance_i + alpha * ((1 - r)/2 ||beta||^2 + r ||beta||_1)``
    (``r`` is ``l1_ratio``; the intercept is not penalized), which equals
    ``(1/n) sum_i (exp(z_i) - y_i z_i)`` plus the penalty, up to a constant. With
    ``penalty="l2"`` the coefficients equal scikit-learn's for the same ``alpha``.

    Args:
        alpha: penalty strength, ``>= 0`` (0: no penalty).
        penalty: ``"l2"`` (default), ``"l1"``, ``"elasticnet"`` or ``None``.
        l1_ratio: L1 share of the elastic-net penalty, in ``[0, 1]``.{_COMMON_ARGS}

    Attributes:
        coef_: shape ``(n_features,)``. intercept_: float. n_iter_: shape ``(1,)``.
        standard_errors_, covariance_, objective_, converged_: as in
            :class:`LogisticRegression`.

    Raises (from ``fit``):
        DataValidationError: non-finite features; negative, non-integer or
            non-finite counts; length mismatch.
        ConfigurationError: bad parameters, or more workers than rows.
        ShardError: a worker failed (with the worker's traceback).

    References:
        McCullagh & Nelder, "Generalized Linear Models", 2nd ed., 1989.

    Examples:
        >>> import numpy as np
        >>> X = np.array([[0.0], [1.0], [2.0]]); y = np.array([1, 2, 4])
        >>> reg = PoissonRegression(alpha=0.0, backend="local", num_workers=1).fit(X, y)
        >>> round(float(reg.coef_[0]), 3)  # log-linear in x
        0.693
    """

    _family = "poisson"
    _is_classifier = False

    def __init__(
        self,
        alpha=1.0,
        *,
        penalty="l2",
        l1_ratio=None,
        fit_intercept=True,
        solver="lbfgs",
        tol=1e-4,
        max_steps=100,
        standard_errors=True,
        num_workers=None,
        backend="auto",
        use_gpu=False,
        resources_per_worker=None,
        address=None,
        progress_bar=False,
        max_iter=_DEPRECATED,
        verbose=_DEPRECATED,
    ):
        self.alpha = alpha
        self.penalty = penalty
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.tol = tol
        self.max_steps = max_steps
        self.standard_errors = standard_errors
        self.num_workers = num_workers
        self.backend = backend
        self.use_gpu = use_gpu
        self.resources_per_worker = resources_per_worker
        self.address = address
        self.progress_bar = progress_bar
        self.max_iter = max_iter
        self.verbose = verbose

    def _penalty_strengths(self, n):
        if self.penalty is None:
            return 0.0, 0.0
        r = self._l1_ratio()
        return self.alpha * (1 - r), self.alpha * r

    @staticmethod
    def _initial_intercept(y_mean):
        return float(np.log(y_mean))

    def fit(self, X, y=None):
        """Fit on rows ``X`` of shape ``(n, d)`` and counts ``y`` of shape ``(n,)``.

        The parameters and the data are checked before any worker starts.

        Args:
            X: features, array-like or DataFrame of shape ``(n, d)`` (float32 stays
                float32), or a :class:`~raybayes.glm.ShardedGLMData` whose workers
                already hold the data (then ``y=None``).
            y: non-negative integer counts, shape ``(n,)``.

        Returns:
            ``self``, fitted.

        Raises:
            ConfigurationError: a bad parameter (named, with the allowed values), a
                deprecated name given with its new one, or more workers than rows.
            DataValidationError: non-finite features; negative, non-integer or
                non-finite counts; a length mismatch.
            ShardError: a worker failed (with its traceback).
            ClusterConnectionError: nothing answers at ``address``.
        """
        self._check_params()
        a = self.alpha
        if (
            isinstance(a, bool)
            or not isinstance(a, (int, float, np.number))
            or not (np.isfinite(a) and a >= 0)
        ):
            raise ConfigurationError(f"alpha={a!r}; use a finite number >= 0.")
        return self._fit(X, y)

    def predict(self, X):
        """Expected counts ``exp(X @ coef_ + intercept_)``, shape ``(n,)``."""
        return np.exp(self._linear_predictor(X))

    def score(self, X, y, sample_weight=None):
        """D^2, the fraction of Poisson deviance explained (scikit-learn's score).

        Returns:
            ``1 - deviance(y, predict(X)) / deviance(y, mean(y))``.
        """
        from sklearn.metrics import d2_tweedie_score

        return d2_tweedie_score(
            y, self.predict(X), sample_weight=sample_weight, power=1
        )
