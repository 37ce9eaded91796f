"""The arrowhead numerics against dense linear algebra, without workers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from raybayes.core import arrowhead

G, P, K = 3, 5, 2  # globals, entities, locals per entity


@pytest.fixture(scope="module")
def system():
    """A random symmetric positive definite arrowhead matrix, dense and in blocks,
    split into two shards (entities 0-2 and 3-4)."""
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(P):
        a = rng.standard_normal((K, K))
        blocks.append(a @ a.T + K * np.eye(K))
    blocks = np.array(blocks)  # (P, K, K)
    cross = 0.5 * rng.standard_normal((P, K, G))  # C_i
    a = rng.standard_normal((G, G))
    hgg = a @ a.T + G * np.eye(G) + np.einsum(
        "pkg,pkj,pjh->gh", cross, np.linalg.inv(blocks), cross
    )
    n = G + P * K
    dense = np.zeros((n, n))
    dense[:G, :G] = hgg
    for i in range(P):
        rows = slice(G + i * K, G + (i + 1) * K)
        dense[rows, rows] = blocks[i]
        dense[rows, :G] = cross[i]
        dense[:G, rows] = cross[i].T
    assert np.linalg.eigvalsh(dense)[0] > 0
    shards = [np.arange(0, 3), np.arange(3, P)]
    return dict(hgg=hgg, blocks=blocks, cross=cross, dense=dense, shards=shards)


def _factors(system, damping=0.0):
    """One factor per shard; H_gg is split evenly, as scaled global sites split it."""
    S = len(system["shards"])
    return [
        arrowhead.factor_arrowhead(
            system["hgg"] / S,
            system["cross"][ids],
            system["blocks"][ids],
            damping=damping,
            num_shards=S,
        )
        for ids in system["shards"]
    ]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def test_schur_complement_and_log_determinant_match_the_dense_matrix(system):
    factors = _factors(system)
    schur = arrowhead.sum_schur_parts([f.schur for f in factors], G)
    dense = system["dense"]
    hgl, hll = dense[:G, G:], dense[G:, G:]
    expected = dense[:G, :G] - hgl @ np.linalg.solve(hll, hgl.T)
    np.testing.assert_allclose(schur, expected, rtol=1e-10, atol=1e-12)
    log_det = np.linalg.slogdet(schur)[1] + sum(float(f.log_det_local) for f in factors)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(dense)[1], rtol=1e-10)
    assert sum(int(f.num_not_positive_definite) for f in factors) == 0


def test_damped_factor_is_the_factor_of_the_damped_matrix(system):
    lam = 0.7
    schur = arrowhead.sum_schur_parts([f.schur for f in _factors(system, lam)], G)
    dense = system["dense"] + lam * np.eye(len(system["dense"]))
    hgl, hll = dense[:G, G:], dense[G:, G:]
    expected = dense[:G, :G] - hgl @ np.linalg.solve(hll, hgl.T)
    np.testing.assert_allclose(schur, expected, rtol=1e-10, atol=1e-12)


def test_indefinite_block_is_counted(system):
    blocks = system["blocks"].copy()
    blocks[1] = -blocks[1]
    f = arrowhead.factor_arrowhead(system["hgg"], system["cross"], blocks)
    assert int(f.num_not_positive_definite) == 1


def test_newton_step_solves_the_dense_system(system):
    rng = np.random.default_rng(1)
    grad = rng.standard_normal(G + P * K)
    grad_g, grad_l = grad[:G], grad[G:].reshape(P, K)
    factors = _factors(system)
    lam = 0.3
    schur = arrowhead.sum_schur_parts([f.schur for f in factors], G)
    rhs = -grad_g + sum(
        np.asarray(arrowhead.newton_reduce(f, grad_l[ids]))
        for f, ids in zip(factors, system["shards"], strict=True)
    )
    eig, vec = np.linalg.eigh(schur)
    # With lam on the global system only, the step solves
    # (H + lam [I_G 0; 0 0]) d = -grad, whatever the split.
    dg = arrowhead.levenberg_marquardt_step(eig, vec, rhs, lam)
    dl = np.concatenate(
        [
            np.asarray(arrowhead.newton_local_step(f, grad_l[ids], dg))
            for f, ids in zip(factors, system["shards"], strict=True)
        ]
    )
    damped = system["dense"].copy()
    damped[:G, :G] += lam * np.eye(G)
    expected = np.linalg.solve(damped, -grad)
    np.testing.assert_allclose(np.r_[dg, dl.ravel()], expected, rtol=1e-9, atol=1e-12)


def test_draws_have_the_inverse_hessian_as_covariance(system):
    """The draws are affine in the noise: feeding unit noise vectors gives the map M
    from noise to draws, and M M^T must be H^{-1} exactly."""
    factors = _factors(system)
    schur = arrowhead.sum_schur_parts([f.schur for f in factors], G)
    n = G + P * K
    noise_g = np.zeros((n, G))
    noise_g[:G] = np.eye(G)  # draws 0..G-1: global unit noise
    delta, cov, log_det = arrowhead.laplace_global_draws(schur, noise_g)
    np.testing.assert_allclose(cov, np.linalg.inv(schur), rtol=1e-10)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(schur)[1], rtol=1e-12)
    columns = []
    for f, ids in zip(factors, system["shards"], strict=True):
        z = np.zeros((len(ids), n, K))  # (P_s, D, k)
        for j, e in enumerate(ids):  # draws G..: each entity's unit noise
            for c in range(K):
                z[j, G + e * K + c, c] = 1.0
        draws = arrowhead.laplace_local_draws(f, np.zeros((len(ids), K)), delta, z)
        columns.append(np.asarray(draws).reshape(n, -1))
    M = np.concatenate([delta, *columns], axis=1).T  # (n params, n noise)
    np.testing.assert_allclose(M @ M.T, np.linalg.inv(system["dense"]), atol=1e-10)


def test_non_positive_definite_schur_complement_raises():
    with pytest.raises(np.linalg.LinAlgError):
        arrowhead.laplace_global_draws(
            np.array([[1.0, 2.0], [2.0, 1.0]]), np.ones((1, 2))
        )


def test_entity_noise_does_not_depend_on_the_split():
    key = jax.random.PRNGKey(4)
    whole = arrowhead.entity_noise(key, np.arange(6), 3, 2)
    parts = [arrowhead.entity_noise(key, ids, 3, 2) for ids in ([0, 1], [2, 3, 4, 5])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert whole.shape == (6, 3, 2)
    assert not np.allclose(whole[0], whole[1])


def test_shards_without_locals():
    f = arrowhead.factor_arrowhead(np.eye(2), np.zeros((0, 0, 2)), None)
    assert f.local_inverse is None
    assert arrowhead.newton_reduce(f, np.zeros((0, 0))) == 0.0
    assert arrowhead.newton_local_step(f, np.zeros((0, 0)), np.ones(2)).shape == (0, 0)
    assert arrowhead.laplace_local_draws(
        f, np.zeros((0, 0)), np.ones((4, 2)), None
    ).shape == (4, 0, 0)


def test_damped_system_matches_the_eigendecomposition():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6))
    spd = a @ a.T + 0.5 * np.eye(6)
    rhs = rng.standard_normal(6)
    system = arrowhead.LevenbergMarquardtSystem(spd)
    assert system.smallest is None and system.floor == 0.0  # the Cholesky path
    for lam in (0.0, 0.3, 0.3, 2.0):
        np.testing.assert_allclose(
            system.solve(rhs, lam), np.linalg.solve(spd + lam * np.eye(6), rhs),
            rtol=1e-10,
        )
    np.testing.assert_allclose(system.largest(), np.linalg.eigvalsh(spd)[-1])
    # indefinite: the eigendecomposition, and a floor that makes S + lam I definite
    indefinite = spd - (np.linalg.eigvalsh(spd)[0] + 1.0) * np.eye(6)
    system = arrowhead.LevenbergMarquardtSystem(indefinite)
    assert system.smallest == pytest.approx(-1.0)
    assert system.floor > 1.0
    lam = system.floor
    np.testing.assert_allclose(
        system.solve(rhs, lam),
        np.linalg.solve(indefinite + lam * np.eye(6), rhs),
        rtol=1e-8,
    )
