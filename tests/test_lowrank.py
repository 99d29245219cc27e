"""Numerics of onnxcomp.passes.lowrank: SVD, rank rules, whitening, sparse + low-rank."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.passes import lowrank as lr


def _low_rank(rng: np.random.Generator, k: int, n: int, r: int) -> np.ndarray:
    return rng.standard_normal((k, r)) @ rng.standard_normal((r, n))


def _decaying(rng: np.random.Generator, k: int, n: int, decay: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    m = min(k, n)
    u, _ = np.linalg.qr(rng.standard_normal((k, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    s = decay ** np.arange(m)
    return (u * s) @ v.T, s


def test_full_rank_reproduces_matrix_exactly() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 25))
    f = lr.factorize_matrix(w, 25)
    assert f.U.shape == (40, 25) and f.V.shape == (25, 25)
    np.testing.assert_allclose(f.matrix(), w, atol=1e-5)


def test_truncation_is_eckart_young_optimal() -> None:
    rng = np.random.default_rng(1)
    w, s = _decaying(rng, 50, 30, 0.8)
    f = lr.factorize_matrix(w, 5)
    err = np.linalg.norm(w - f.matrix())
    assert err == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-4)


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.75, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_energy_rank_on_constructed_spectrum(energy: float, rank: int) -> None:
    # σ² = 16, 4, 1, 0.25 → cumulative 0.753, 0.941, 0.988, 1.0
    assert lr.energy_rank(np.array([4.0, 2.0, 1.0, 0.5]), energy) == rank


def test_energy_rank_rejects_bad_threshold() -> None:
    with pytest.raises(ValueError, match="energy"):
        lr.energy_rank(np.ones(3), 1.5)


def test_ratio_rank_and_param_count() -> None:
    assert lr.ratio_rank(100, 100, 0.5) == 25
    assert lr.factor_params(100, 100, 25) == 5000
    assert lr.ratio_rank(384, 1536, 0.7) == 215
    assert lr.max_useful_rank(384, 384, 0.1) == 172
    assert lr.ratio_rank(4, 4, 0.01) == 1


@pytest.mark.parametrize("rank", [3, 10, 20])
def test_ebic_recovers_planted_rank(rank: int) -> None:
    rng = np.random.default_rng(rank)
    w = _low_rank(rng, 120, 200, rank) + 0.05 * rng.standard_normal((120, 200))
    s = lr.svd(w)[1]
    assert lr.ebic_rank(s, 120, 200, max_rank=60) == rank


def test_ebic_larger_gamma_never_increases_rank() -> None:
    rng = np.random.default_rng(3)
    w, s = _decaying(rng, 80, 80, 0.95)
    w = w + 0.01 * rng.standard_normal(w.shape)
    s = lr.svd(w)[1]
    ranks = [lr.ebic_rank(s, 80, 80, gamma=g, max_rank=40) for g in (0.0, 0.5, 1.0, 4.0)]
    assert ranks == sorted(ranks, reverse=True)


def test_randomized_svd_matches_full_on_decaying_spectrum() -> None:
    rng = np.random.default_rng(4)
    w, s = _decaying(rng, 300, 200, 0.9)
    u, sr, vt = lr.randomized_svd(w, 20, oversample=10, power_iterations=2)
    np.testing.assert_allclose(sr, s[:20], rtol=1e-4)
    approx = (u * sr) @ vt
    optimal = np.sqrt(np.sum(s[20:] ** 2))
    assert np.linalg.norm(w - approx) <= 1.001 * optimal


def test_power_iterations_improve_randomized_svd_on_flat_spectrum() -> None:
    rng = np.random.default_rng(5)
    w, s = _decaying(rng, 200, 200, 0.99)
    errs = []
    for q in (0, 2):
        u, sr, vt = lr.randomized_svd(w, 20, oversample=5, power_iterations=q, seed=1)
        errs.append(np.linalg.norm(w - (u * sr) @ vt))
    optimal = np.sqrt(np.sum(s[20:] ** 2))
    assert errs[1] < errs[0]
    assert errs[1] <= 1.05 * optimal


def test_cholesky_factor_is_damped_square_root() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 8))
    x[:, 7] = 0.0  # a dead channel: singular Gram matrix
    g = x.T @ x
    r = lr.cholesky_factor(g, damping=0.01)
    lam = 0.01 * np.mean(np.diag(g))
    np.testing.assert_allclose(r.T @ r, g + lam * np.eye(8), rtol=1e-10, atol=1e-10)
    assert np.allclose(r, np.triu(r))


def test_whitening_lowers_output_error_at_equal_rank() -> None:
    rng = np.random.default_rng(7)
    k, n, rank = 64, 48, 8
    mix = rng.standard_normal((k, k)) * (0.7 ** np.arange(k))  # strongly correlated, anisotropic inputs
    x = rng.standard_normal((2000, k)) @ mix.T
    w = rng.standard_normal((k, n))
    r = lr.cholesky_factor(x.T @ x, damping=1e-6)
    plain = lr.factorize_matrix(w, rank).matrix()
    white = lr.factorize_matrix(w, rank, r_factor=r).matrix()
    err_plain = np.linalg.norm(x @ (w - plain)) / np.linalg.norm(x @ w)
    err_white = np.linalg.norm(x @ (w - white)) / np.linalg.norm(x @ w)
    assert err_white < 0.5 * err_plain
    # and whitened SVD is optimal in the output norm: its error equals the whitened spectrum's tail
    _, s, _ = lr.whitened_svd(w, r)
    assert np.linalg.norm(r @ (w - white)) == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-3)


def test_randomized_whitened_factorization() -> None:
    rng = np.random.default_rng(8)
    w, _ = _decaying(rng, 60, 40, 0.8)
    x = rng.standard_normal((500, 60))
    r = lr.cholesky_factor(x.T @ x)
    full = lr.factorize_matrix(w, 6, r_factor=r).matrix()
    rand = lr.factorize_matrix(w, 6, r_factor=r, method="randomized").matrix()
    np.testing.assert_allclose(rand, full, atol=1e-4)


def test_top_k_sparse_keeps_largest_entries() -> None:
    a = np.array([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    s = lr.top_k_sparse(a, 2)
    np.testing.assert_array_equal(s, [[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]])
    assert not lr.top_k_sparse(a, 0).any()


def test_sparse_lowrank_recovers_planted_outliers() -> None:
    rng = np.random.default_rng(9)
    k, n, rank, nnz = 80, 60, 4, 40
    low = _low_rank(rng, k, n, rank)
    planted = np.zeros((k, n))
    idx = rng.choice(k * n, nnz, replace=False)
    planted.ravel()[idx] = rng.choice([-1.0, 1.0], nnz) * rng.uniform(20, 30, nnz)
    w = low + planted
    d = lr.sparse_lowrank(w, rank, nnz, iterations=30)
    assert set(np.flatnonzero(d.S)) == set(idx)
    assert np.linalg.norm(w - d.matrix()) / np.linalg.norm(w) < 1e-4
    # ... and beats low-rank alone at a larger rank with the same parameter budget
    budget_rank = rank + int(np.ceil(2 * nnz / (k + n)))
    alone = lr.factorize_matrix(w, budget_rank).matrix()
    assert np.linalg.norm(w - alone) > 100 * np.linalg.norm(w - d.matrix())


def test_ebic_selects_planted_rank_and_sparsity() -> None:
    rng = np.random.default_rng(10)
    k, n = 60, 50
    w = _low_rank(rng, k, n, 3) + 0.01 * rng.standard_normal((k, n))
    idx = rng.choice(k * n, 30, replace=False)
    w.ravel()[idx] += rng.choice([-1.0, 1.0], 30) * 15.0
    r, z, d = lr.ebic_sparse_lowrank(w, [1, 2, 3, 5, 8], [0, 15, 30, 60], iterations=20)
    assert (r, z) == (3, 30)
    assert set(np.flatnonzero(d.S)) == set(idx)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        lr.randomized_svd(np.ones((3, 3)), 0)
    with pytest.raises(ValueError, match="method"):
        lr.factorize_matrix(np.ones((3, 3)), 1, method="qr")
    with pytest.raises(ValueError, match="ratio"):
        lr.ratio_rank(3, 3, 0.0)
