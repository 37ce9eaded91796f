"""GLM estimators on the in-process backend: scikit-learn agreement, Laplace standard
errors, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sklearn.linear_model as sk
from sklearn.base import clone

from raybayes.errors import ConfigurationError, DataValidationError, RaybayesWarning
from raybayes.glm import LogisticRegression, PoissonRegression, ShardedGLMData

TIGHT = dict(tol=1e-10, max_steps=1000, backend="local")


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(0)
    n, d = 600, 6
    X = rng.normal(size=(n, d)) * np.array([1, 2, 0.5, 1, 3, 1])
    w = np.array([0.8, -0.4, 1.0, 0.0, 0.2, -0.6])
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ w + 0.4)))).astype(int)
    return X, y


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(1)
    n, d = 500, 5
    X = rng.normal(size=(n, d))
    y = rng.poisson(np.exp(X @ np.array([0.4, -0.3, 0.0, 0.2, 0.1]) + 0.5))
    return X, y


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
@pytest.mark.parametrize("C", [0.01, 1.0, np.inf])
def test_logistic_l2_matches_sklearn(binary, solver, C):
    X, y = binary
    ours = LogisticRegression(C=C, solver=solver, num_workers=3, **TIGHT).fit(X, y)
    ref = sk.LogisticRegression(C=C, l1_ratio=0.0, tol=1e-10, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-6)
    assert ours.coef_.shape == (1, 6) and ours.intercept_.shape == (1,)
    assert ours.n_iter_.shape == (1,) and ours.converged_
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    assert ours.score(X, y) == ref.score(X, y)


def test_logistic_without_intercept_matches_sklearn(binary):
    X, y = binary
    for solver in ("lbfgs", "newton"):
        ours = LogisticRegression(C=0.1, fit_intercept=False, solver=solver, **TIGHT)
        ours.fit(X, y)
        ref = sk.LogisticRegression(C=0.1, fit_intercept=False, tol=1e-10).fit(X, y)
        np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
        assert ours.intercept_.tolist() == [0.0]


@pytest.mark.parametrize(
    "penalty,l1_ratio,C", [("l1", None, 0.02), ("elasticnet", 0.4, 0.008)]
)
def test_logistic_l1_and_elasticnet_match_sklearn_saga(binary, penalty, l1_ratio, C):
    X, y = binary
    X = X / X.std(axis=0)  # saga needs scaled features to converge tightly
    ours = LogisticRegression(
        penalty=penalty, C=C, l1_ratio=l1_ratio, num_workers=2, **TIGHT
    ).fit(X, y)
    ref = sk.LogisticRegression(
        C=C,
        l1_ratio=1.0 if penalty == "l1" else l1_ratio,
        solver="saga",
        tol=1e-12,
        max_iter=100000,
    ).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-6)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=2e-6)
    # The L1 part sets the same coefficients exactly to zero, and some are zero.
    assert 0 < np.sum(ours.coef_ == 0) < ours.coef_.size
    np.testing.assert_array_equal(ours.coef_ == 0, np.abs(ref.coef_) < 1e-8)


def test_distributed_equals_single_worker(binary):
    X, y = binary
    one = LogisticRegression(C=0.5, num_workers=1, **TIGHT).fit(X, y)
    many = LogisticRegression(C=0.5, num_workers=7, **TIGHT).fit(X, y)
    np.testing.assert_allclose(many.coef_, one.coef_, atol=1e-9)
    np.testing.assert_allclose(many.standard_errors_, one.standard_errors_, rtol=1e-8)


def test_logistic_standard_errors_are_the_analytic_inverse_hessian(binary):
    X, y = binary
    C = 0.05
    for solver in ("lbfgs", "newton"):
        m = LogisticRegression(C=C, solver=solver, num_workers=2, **TIGHT).fit(X, y)
        Xa = np.column_stack([X, np.ones(len(X))])
        p = 1 / (1 + np.exp(-(Xa @ np.r_[m.coef_.ravel(), m.intercept_])))
        H = Xa.T @ (Xa * (p * (1 - p))[:, None])
        H[:-1, :-1] += np.eye(X.shape[1]) / C  # penalty 1/(2C) ||beta||^2
        se = np.sqrt(np.diag(np.linalg.inv(H)))
        np.testing.assert_allclose(m.standard_errors_, se, rtol=1e-6)
        table = m.summary()
        assert list(table.index) == [f"x{j}" for j in range(6)] + ["intercept"]
        np.testing.assert_allclose(table["std_err"], se, rtol=1e-6)
        np.testing.assert_allclose(table["z"], table["coef"] / table["std_err"])
        assert np.all((table["p_value"] > 0) & (table["p_value"] <= 1))


def test_l1_standard_errors_are_nan_off_the_active_set(binary):
    X, y = binary
    m = LogisticRegression(penalty="l1", C=0.005, **TIGHT).fit(X, y)
    zero = m.coef_.ravel() == 0
    assert zero.any()
    assert np.all(np.isnan(m.standard_errors_[:-1][zero]))
    assert np.all(np.isfinite(m.standard_errors_[:-1][~zero]))


def test_string_labels_and_dataframe_feature_names(binary):
    X, y = binary
    df = pd.DataFrame(X, columns=[f"f{j}" for j in range(6)])
    labels = np.where(y == 1, "yes", "no")
    m = LogisticRegression(num_workers=2, **TIGHT).fit(df, labels)
    assert m.classes_.tolist() == ["no", "yes"]
    assert list(m.feature_names_in_) == list(df.columns)
    assert set(m.predict(X)) <= {"no", "yes"}
    assert m.summary().index[0] == "f0"
    m01 = LogisticRegression(num_workers=2, **TIGHT).fit(X, y)
    np.testing.assert_allclose(m.coef_, m01.coef_, atol=1e-12)


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_poisson_l2_matches_sklearn(counts, solver, alpha):
    X, y = counts
    ours = PoissonRegression(alpha=alpha, solver=solver, num_workers=3, **TIGHT)
    ours.fit(X, y)
    ref = sk.PoissonRegressor(alpha=alpha, tol=1e-10, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
    assert ours.intercept_ == pytest.approx(ref.intercept_, abs=1e-6)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), rtol=1e-5)
    assert ours.score(X, y) == pytest.approx(ref.score(X, y), abs=1e-9)


def test_poisson_standard_errors_are_the_analytic_inverse_hessian(counts):
    X, y = counts
    m = PoissonRegression(alpha=0.0, num_workers=2, **TIGHT).fit(X, y)
    Xa = np.column_stack([X, np.ones(len(X))])
    mu = np.exp(Xa @ np.r_[m.coef_, m.intercept_])
    se = np.sqrt(np.diag(np.linalg.inv(Xa.T @ (Xa * mu[:, None]))))
    np.testing.assert_allclose(m.standard_errors_, se, rtol=1e-6)


def test_poisson_l1_satisfies_the_kkt_conditions(counts):
    X, y = counts
    alpha = 0.05
    m = PoissonRegression(alpha=alpha, penalty="l1", num_workers=2, **TIGHT).fit(X, y)
    mu = np.exp(X @ m.coef_ + m.intercept_)
    grad = X.T @ (mu - y) / len(y)  # gradient of the mean loss
    active = m.coef_ != 0
    assert 0 < active.sum() < len(active)
    # Active: grad = -alpha * sign(coef); inactive: |grad| <= alpha.
    np.testing.assert_allclose(
        grad[active], -alpha * np.sign(m.coef_[active]), atol=1e-8
    )
    assert np.all(np.abs(grad[~active]) <= alpha + 1e-10)
    assert np.mean(mu - y) == pytest.approx(0.0, abs=1e-8)  # free intercept


def test_sharded_data_is_reused_across_fits(binary):
    X, y = binary
    with ShardedGLMData(X, y, "logistic", num_workers=2, backend="local") as data:
        path = [LogisticRegression(C=C, tol=1e-10).fit(data) for C in (0.01, 1.0)]
        with pytest.raises(ConfigurationError, match="family='poisson'"):
            PoissonRegression().fit(data)
    for m, C in zip(path, (0.01, 1.0), strict=True):
        ref = sk.LogisticRegression(C=C, l1_ratio=0.0, tol=1e-10).fit(X, y)
        np.testing.assert_allclose(m.coef_, ref.coef_, atol=1e-6)


def test_clone_and_params():
    m = LogisticRegression(C=3.0, penalty="l1", num_workers=2, backend="local")
    c = clone(m)
    assert c.get_params() == m.get_params() and c is not m


def test_not_converged_warns(binary):
    X, y = binary
    with pytest.warns(RaybayesWarning, match="did not converge in max_steps=2"):
        m = LogisticRegression(max_steps=2, tol=1e-12, backend="local").fit(X, y)
    assert not m.converged_ and m.n_iter_[0] == 2


def test_deprecated_max_iter_and_verbose_still_work(binary, capsys):
    X, y = binary
    new = LogisticRegression(max_steps=3, tol=1e-12, backend="local")
    with pytest.warns(RaybayesWarning):
        new.fit(X, y)
    old = LogisticRegression(max_iter=3, verbose=False, tol=1e-12, backend="local")
    with pytest.warns(FutureWarning, match="max_iter= is deprecated.*max_steps="):
        with pytest.warns(FutureWarning, match="verbose= is deprecated.*progress_bar="):
            with pytest.warns(RaybayesWarning):
                old.fit(X, y)
    np.testing.assert_array_equal(old.coef_, new.coef_)
    assert old.n_iter_[0] == 3
    # scikit-learn's clone keeps the old name as given.
    assert clone(old).get_params()["max_iter"] == 3
    with pytest.raises(ConfigurationError, match="both max_iter= .* and max_steps="):
        with pytest.warns(FutureWarning):
            LogisticRegression(max_iter=3, max_steps=5, backend="local").fit(X, y)


def test_auto_backend_fits_in_process_without_workers(binary):
    X, y = binary
    m = LogisticRegression(standard_errors=False).fit(X, y)  # backend="auto"
    assert m.backend_ == "local" and m.num_workers_ == 1
    ref = LogisticRegression(backend="local", standard_errors=False).fit(X, y)
    np.testing.assert_array_equal(m.coef_, ref.coef_)


# --- bad input -----------------------------------------------------------------


def test_non_finite_feature_names_column_count_and_row(binary):
    X, y = binary
    X = X.copy()
    X[[5, 9, 40], 3] = [np.nan, np.inf, np.nan]
    with pytest.raises(DataValidationError, match=r"column 3 has 3 non-finite") as err:
        LogisticRegression(backend="local").fit(X, y)
    assert err.value.num_bad_rows == 3 and err.value.example["row"] == 5
    assert "row 5" in str(err.value)
    df = pd.DataFrame(X, columns=list("abcdef"))
    with pytest.raises(DataValidationError, match=r"column 3 \('d'\)"):
        PoissonRegression(backend="local").fit(df, np.ones(len(df)))


def test_huge_but_finite_features_are_accepted():
    X = np.full((4, 1), 1e308)
    X[::2] = 0.0
    y = np.array([0, 1, 0, 1])
    m = LogisticRegression(backend="local", standard_errors=False).fit(X / 1e308, y)
    assert np.isfinite(m.coef_).all()
    from raybayes.glm.validation import check_features

    assert check_features(np.full((3, 1), 1e308)).shape == (3, 1)  # sums overflow


@pytest.mark.parametrize(
    "labels,match",
    [
        ([0, 1, 2, 1], r"1 label\(s\) outside \{0, 1\}; the first is row 2"),
        ([-1, 1, -1, 1], r"2 label\(s\) outside \{0, 1\}; the first is row 0"),
        ([1, 1, 1, 1], "1 distinct class"),
        (["a", "b", "c", "a"], "3 distinct class"),
        ([0, 1, np.nan, 1], r"outside \{0, 1\}; the first is row 2"),
    ],
)
def test_bad_labels(labels, match):
    X = np.arange(8.0).reshape(4, 2)
    with pytest.raises(DataValidationError, match=match):
        LogisticRegression(backend="local").fit(X, np.array(labels))


@pytest.mark.parametrize(
    "counts,match",
    [
        ([0, 2, -1, 3], r"1 negative count\(s\); the first is row 2"),
        ([0, 2.5, 1, 3], r"1 non-integer count\(s\); the first is row 1"),
        ([0, np.nan, 1, 3], r"1 non-finite"),
    ],
)
def test_bad_counts(counts, match):
    X = np.arange(8.0).reshape(4, 2)
    with pytest.raises(DataValidationError, match=match):
        PoissonRegression(backend="local").fit(X, np.array(counts))


def test_length_mismatch_and_more_workers_than_rows():
    X = np.arange(8.0).reshape(4, 2)
    with pytest.raises(DataValidationError, match="y has 3 rows but X has 4"):
        LogisticRegression(backend="local").fit(X, [0, 1, 0])
    with pytest.raises(ConfigurationError, match="num_workers=5 is more than the 4"):
        LogisticRegression(backend="local", num_workers=5).fit(X, [0, 1, 0, 1])


@pytest.mark.parametrize(
    "params,match",
    [
        (dict(penalty="l3"), "penalty='l3'"),
        (dict(solver="sag"), "solver='sag'"),
        (dict(penalty="elasticnet"), "l1_ratio=None"),
        (dict(penalty="l1", solver="newton"), "solver='newton' does not handle"),
        (dict(C=-1.0), "C=-1.0"),
        (dict(tol=0), "tol=0"),
        (dict(max_steps=0), "max_steps=0"),
        (dict(num_workers=0), "num_workers=0"),
        (dict(address="10.0.0.1:6379"), "address=.*backend='ray'"),
        (dict(backend=3), "backend=3"),
        (dict(backend="spark"), "backend='spark'"),
    ],
)
def test_bad_configuration(params, match):
    X = np.arange(8.0).reshape(4, 2)
    params = {"backend": "local", **params}
    with pytest.raises(ConfigurationError, match=match):
        LogisticRegression(**params).fit(X, [0, 1, 0, 1])
