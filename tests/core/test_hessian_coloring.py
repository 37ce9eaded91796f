"""Grouped Hessian-vector products give the same global Hessian columns as one
product per column, with fewer products; wrong groupings are caught."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from raybayes.core import ShardLogDensity
from raybayes.core import hessian_coloring as hc
from raybayes.datasets.elasticity import prepare_elasticity_data, simulate_elasticity
from raybayes.models.elasticity import elasticity_model
from raybayes.plan import plan


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _elasticity_density(num_categories=3, num_products=18, num_weeks=8):
    df, _ = simulate_elasticity(num_categories, num_products, num_weeks, seed=3)
    data = prepare_elasticity_data(
        df, product_cols=("product",), category_col="category"
    )
    kwargs = data.model_kwargs()
    partition = plan(elasticity_model, kwargs, num_shards=2).partition
    assert partition.plate == "products"
    return ShardLogDensity(elasticity_model, kwargs, partition)


def _random_point(density, seed):
    rng = np.random.default_rng(seed)
    g = jnp.asarray(0.4 * rng.standard_normal(density.num_global))
    lm = jnp.asarray(0.4 * rng.standard_normal(density.init_local().shape))
    return g, lm


def test_elasticity_columns_match_one_product_per_column():
    d = _elasticity_density()
    G = d.num_global  # 7 scalars + z_category (3) + gamma (8 x 3)
    assert G == 7 + 3 + 24
    for seed in (0, 1):  # the first call finds the groups, the second reuses them
        g, lm = _random_point(d, seed)
        hgg, hlg = d.global_hessian_columns(g, lm, coloring=False)
        assert d.last_num_hvp == G
        cgg, clg = d.global_hessian_columns(g, lm)
        num = d.last_num_hvp
        np.testing.assert_allclose(cgg, hgg, rtol=1e-9, atol=1e-9 * np.abs(hgg).max())
        np.testing.assert_allclose(clg, hlg, rtol=1e-9, atol=1e-9 * np.abs(hlg).max())
        if seed == 1:
            # gamma in 8 groups (one per week: its 3 categories share no product),
            # z_category in one, 7 scalars alone, 1 verification product
            assert num == 8 + 1 + 7 + 1
    groups = d._coloring.groups
    assert sorted(len(grp.columns) for grp in groups) == [3] * 9


def _dense_vector_model(X, y=None):
    coef = numpyro.sample("coef", dist.Normal(jnp.zeros(X.shape[1]), 1.0).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ coef), obs=y)


def test_a_dense_vector_site_falls_back_to_one_product_per_column():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 4))
    y = (rng.random(40) < 0.5).astype(np.int32)
    d = ShardLogDensity(_dense_vector_model, {"X": X, "y": y})
    g = jnp.asarray(rng.standard_normal(4))
    lm = d.init_local()
    hgg, _ = d.global_hessian_columns(g, lm, coloring=False)
    cgg, _ = d.global_hessian_columns(g, lm)
    np.testing.assert_allclose(cgg, hgg, rtol=1e-10)
    assert d._coloring.groups == [] and not d._coloring.enabled


def _synthetic(hgg, hlg):
    """An explicit Hessian's HVPs: (n, G) tangents -> (n, G), (n, P, 1)."""

    def hvp(t):
        return t @ hgg, (t @ hlg.T)[:, :, None]

    return hvp


def _spd_arrowhead(rng, G, P, links):
    """Random symmetric H_gg (global 0 dense, the others diagonal) and H_lg with
    ``links[j]`` the local rows that global j touches."""
    hgg = np.diag(rng.uniform(5, 6, G))
    hgg[0, 1:] = hgg[1:, 0] = rng.uniform(0.1, 1, G - 1)
    hlg = np.zeros((P, G))
    hlg[:, 0] = rng.uniform(0.1, 1, P)
    for j, rows in links.items():
        hlg[rows, j] = rng.uniform(0.1, 1, len(rows))
    return hgg, hlg


def test_columns_that_share_a_row_are_separated():
    rng = np.random.default_rng(1)
    # site b = globals 1..4; 1 and 2 share local row 0, so the whole site cannot
    # be one group
    hgg, hlg = _spd_arrowhead(rng, 5, 4, {1: [0], 2: [0, 1], 3: [2], 4: [3]})
    col = hc.ColoredGlobalHessian([(0, ()), (1, (4,))], 5)
    cgg, clg = col(_synthetic(hgg, hlg))
    np.testing.assert_allclose(cgg, hgg, rtol=1e-12)
    np.testing.assert_allclose(clg[:, 0, :], hlg, rtol=1e-12)


def test_an_entry_that_appears_later_is_found():
    rng = np.random.default_rng(2)
    hgg, hlg = _spd_arrowhead(rng, 5, 4, {1: [0], 2: [1], 3: [2], 4: [3]})
    col = hc.ColoredGlobalHessian([(0, ()), (1, (4,))], 5)
    col(_synthetic(hgg, hlg))
    assert len(col.groups) == 1 and col.groups[0].owner is not None
    hlg2 = hlg.copy()
    hlg2[2, 1] = 0.5  # global 1 now also touches row 2, owned by global 3
    cgg, clg = col(_synthetic(hgg, hlg2))
    np.testing.assert_allclose(cgg, hgg, rtol=1e-12)
    np.testing.assert_allclose(clg[:, 0, :], hlg2, rtol=1e-12)


def test_a_wrong_decompression_is_caught_by_the_verification(monkeypatch):
    rng = np.random.default_rng(3)
    hgg, hlg = _spd_arrowhead(rng, 5, 4, {1: [0], 2: [1], 3: [2], 4: [3]})
    col = hc.ColoredGlobalHessian([(0, ()), (1, (4,))], 5)
    real = hc._owners

    def wrong(*args):
        owner = real(*args)
        owner[owner >= 0] = 0  # every row to the group's first column
        return owner

    monkeypatch.setattr(hc, "_owners", wrong)
    with pytest.warns(RuntimeWarning, match="one at a time"):
        cgg, clg = col(_synthetic(hgg, hlg))
    np.testing.assert_allclose(cgg, hgg, rtol=1e-12)
    np.testing.assert_allclose(clg[:, 0, :], hlg, rtol=1e-12)
    assert not col.enabled


def test_candidate_groupings_cover_the_site():
    cands = hc.candidate_groupings(10, (4, 3))
    assert [len(c) for c in cands] == [1, 3, 4]  # whole, along axis 0, along axis 1
    for grouping in cands:
        assert sorted(np.concatenate(grouping).tolist()) == list(range(10, 22))
    assert hc.candidate_groupings(0, ()) == []
