"""Input checks for the GLM estimators, run on the driver before any compute.

Each failure raises :class:`~raybayes.errors.DataValidationError` naming the column
(feature index or name), the number of bad rows, one example row and the fix.
"""

from __future__ import annotations

import numpy as np

from raybayes.errors import ConfigurationError, DataValidationError

__all__ = ["check_features", "check_binary_labels", "check_counts"]

_CHUNK_ROWS = 65536


def _feature_name(j, feature_names):
    if feature_names is not None:
        return f"column {j} ({feature_names[j]!r})"
    return f"column {j}"


def check_features(X, feature_names=None) -> np.ndarray:
    """Return ``X`` as a 2-D float array, or raise on unusable features.

    Float32 and float64 arrays are kept as they are (no copy); anything else is
    converted to float64. Finiteness is tested with column sums, one pass over
    ``X`` with no large temporary; only when a sum is not finite are the offending
    entries located.

    Args:
        X: array-like of shape ``(n, d)``.
        feature_names: names of the ``d`` columns, for messages.

    Returns:
        ``X`` as ``np.ndarray`` of dtype float32 or float64.

    Raises:
        DataValidationError: ``X`` is not 2-D, empty, sparse, or has NaN/inf
            entries (naming the first bad column, its count and one example row).

    Examples:
        >>> check_features([[1, 2], [3, 4]]).dtype
        dtype('float64')
    """
    if hasattr(X, "tocsr") or hasattr(X, "toarray"):
        raise DataValidationError(
            "X is a sparse matrix; raybayes.glm needs dense features. "
            "Use X.toarray() (or a dense DataFrame)."
        )
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        try:
            X = X.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise DataValidationError(
                f"X has dtype {X.dtype} that cannot be converted to float ({err}). "
                "Encode categorical columns numerically (e.g. one-hot) first."
            ) from None
    if X.ndim != 2:
        raise DataValidationError(
            f"X has shape {X.shape}; it must be 2-D (num_rows, num_features). "
            "Use X.reshape(-1, 1) for a single feature."
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataValidationError(f"X has shape {X.shape}; it needs rows and columns.")
    sums = np.zeros(X.shape[1], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
        for start in range(0, X.shape[0], _CHUNK_ROWS):
            sums += X[start : start + _CHUNK_ROWS].sum(axis=0, dtype=np.float64)
    if np.all(np.isfinite(sums)):
        return X
    for j in np.flatnonzero(~np.isfinite(sums)):
        bad = ~np.isfinite(X[:, j])
        count = int(bad.sum())
        if count:
            row = int(np.argmax(bad))
            name = _feature_name(j, feature_names)
            raise DataValidationError(
                f"X {name} has {count} non-finite value(s) (NaN or inf); the first is "
                f"in row {row}: {X[row].tolist()[:10]}. Impute or drop these rows "
                "before fitting.",
                column=name,
                num_bad_rows=count,
                example={"row": row, "values": X[row].tolist()},
            )
    return X  # column sums overflowed, but every entry is finite


def _check_1d(y, n, what):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataValidationError(f"y has shape {y.shape}; {what} must be 1-D.")
    if y.shape[0] != n:
        raise DataValidationError(
            f"y has {y.shape[0]} rows but X has {n}; they must match row for row."
        )
    return y


def check_binary_labels(y, n):
    """Check binary labels and encode them as 0/1.

    Numeric (or boolean) labels must be 0 and 1. Labels of another type (strings,
    say) are accepted when there are exactly two of them, as in scikit-learn: the
    second of the sorted classes is the positive one.

    Args:
        y: array-like of shape ``(n,)``.
        n: rows of ``X``.

    Returns:
        ``(y01, classes)``: float64 0/1 labels of shape ``(n,)`` and the two
        classes, shape ``(2,)``.

    Raises:
        DataValidationError: wrong length, NaN labels, numeric labels outside
            {0, 1}, or not exactly two classes.

    Examples:
        >>> check_binary_labels([0, 1, 1], 3)[0].tolist()
        [0.0, 1.0, 1.0]
    """
    y = _check_1d(y, n, "labels")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if np.issubdtype(y.dtype, np.number):
        y_float = y.astype(np.float64)
        bad = ~np.isin(y_float, (0.0, 1.0))
        if bad.any():
            row = int(np.argmax(bad))
            count = int(bad.sum())
            raise DataValidationError(
                f"y has {count} label(s) outside {{0, 1}}; the first is row {row} "
                f"with y = {y[row]!r}. Logistic regression needs 0/1 labels: map the "
                "positive class to 1 and the other to 0, e.g. y = (y == positive).",
                column="y",
                num_bad_rows=count,
                example={"row": row, "y": y[row].item()},
            )
        classes = np.unique(y)
        y01 = y_float
    else:
        classes, y01 = np.unique(y, return_inverse=True)
        y01 = y01.astype(np.float64)
    if len(classes) != 2:
        raise DataValidationError(
            f"y has {len(classes)} distinct class(es) {classes.tolist()[:5]}; binary "
            "logistic regression needs exactly two. Check the labels or the row "
            "filter that produced them.",
            column="y",
        )
    return y01, classes


def check_counts(y, n):
    """Check Poisson targets: finite, non-negative integers.

    Args:
        y: array-like of shape ``(n,)``.
        n: rows of ``X``.

    Returns:
        float64 array of shape ``(n,)``.

    Raises:
        DataValidationError: wrong length, non-finite, negative or non-integer
            counts (naming the count and one example row).

    Examples:
        >>> check_counts([0, 3, 1], 3).tolist()
        [0.0, 3.0, 1.0]
    """
    y = _check_1d(y, n, "counts")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise DataValidationError(
            f"y has dtype {y.dtype}; Poisson regression needs numeric counts."
        ) from None
    checks = (
        (~np.isfinite(yf), "non-finite (NaN or inf)", "Drop these rows"),
        (yf < 0, "negative", "Counts must be >= 0"),
        (
            yf != np.round(yf),
            "non-integer",
            "Counts must be whole numbers; for "
            "rates, fit counts with log(exposure) as a feature",
        ),
    )
    for bad, what, fix in checks:
        if bad.any():
            row = int(np.argmax(bad))
            count = int(bad.sum())
            raise DataValidationError(
                f"y has {count} {what} count(s); the first is row {row} with "
                f"y = {y[row]!r}. {fix}.",
                column="y",
                num_bad_rows=count,
                example={"row": row, "y": y[row].item()},
            )
    if yf.sum() == 0:
        raise DataValidationError(
            "y is all zeros; the Poisson maximum likelihood intercept is -inf. "
            "Check the target column.",
            column="y",
        )
    return yf


def check_positive(name, value, allow_inf=False):
    """Raise ConfigurationError unless ``value`` is a positive number."""
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if ok:
        ok = value > 0 and (allow_inf or np.isfinite(value))
    if not ok:
        extra = " or np.inf" if allow_inf else ""
        raise ConfigurationError(f"{name}={value!r}; use a positive number{extra}.")
