"""Streaming observers: exact/near-exact results, batch invariance, bounded state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcomp.calibration.observers import (
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
    SymmetricHistogram,
    make_observer,
)
from onnxcomp.errors import CalibrationError


def _data(seed: int = 0, n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[::997] *= 25.0  # a few outliers
    return x


def _feed(obs, x: np.ndarray, batch: int):
    for start in range(0, x.size, batch):
        obs.update(x[start : start + batch])
    return obs


@pytest.mark.parametrize("kind", ["minmax", "percentile", "entropy", "mse"])
def test_results_do_not_depend_on_batching(kind: str) -> None:
    # growing magnitudes force several histogram re-binnings in the small-batch runs
    x = _data() * np.linspace(0.01, 1.0, 20_000, dtype=np.float32)
    results = []
    hists = []
    for batch in (1, 7, 1000, x.size):
        obs = _feed(make_observer(kind), x, batch)
        results.append(obs.range())
        if hasattr(obs, "hist"):
            hists.append(obs.hist.counts.copy())
    assert all(r == results[0] for r in results), results
    for h in hists[1:]:
        np.testing.assert_array_equal(h, hists[0])


def test_minmax_is_exact() -> None:
    x = _data()
    obs = _feed(MinMaxObserver(), x, 333)
    assert obs.range() == (float(x.min()), float(x.max()))
    assert obs.count == x.size


def test_histogram_regrow_is_exact_merge() -> None:
    rng = np.random.default_rng(1)
    small = rng.uniform(-0.3, 0.3, 5000).astype(np.float32)
    large = rng.uniform(-700, 700, 5000).astype(np.float32)
    a = SymmetricHistogram(1024)
    a.update(small)
    a.update(large)
    b = SymmetricHistogram(1024)
    b.update(np.concatenate([small, large]))
    assert a.radius == b.radius == 1024.0
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.counts.sum() == 10_000
    # each bin really holds the values inside its edges
    edges = b.edges()
    np.testing.assert_array_equal(b.counts, np.histogram(np.concatenate([small, large]), edges)[0])


def test_state_is_bounded() -> None:
    obs = PercentileObserver(bins=2048)
    rng = np.random.default_rng(0)
    for k in range(50):
        obs.update(rng.standard_normal(1000) * (k + 1))
    assert obs.hist.counts.shape == (2048,)
    assert obs.count == 50_000


def test_percentile_matches_numpy_within_a_bin() -> None:
    x = _data(3, 100_000)
    obs = _feed(PercentileObserver(percentile=99.9), x, 4096)
    lo, hi = obs.range()
    width = obs.hist.width
    assert abs(lo - np.percentile(x, 0.1)) <= 2 * width
    assert abs(hi - np.percentile(x, 99.9)) <= 2 * width
    full = _feed(PercentileObserver(percentile=100.0), x, 4096)
    assert full.range() == (float(x.min()), float(x.max()))


def test_percentile_of_relu_output_starts_at_zero() -> None:
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(50_000), 0).astype(np.float32)
    obs = PercentileObserver(percentile=99.99)
    obs.update(x)
    lo, hi = obs.range()
    assert lo == 0.0
    assert 3.0 < hi <= float(x.max())


def test_entropy_clips_outliers_of_a_gaussian() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:20] = 60.0  # rare far outliers
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert lo == -hi  # symmetric threshold
    assert 2.5 < hi < 20.0


def test_entropy_on_relu_output_keeps_zero_and_is_not_degenerate() -> None:
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal(200_000), 0).astype(np.float32)
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert lo == 0.0
    assert 2.0 < hi <= float(x.max())


def _quant_mse(x: np.ndarray, lo: float, hi: float, bits: int = 8) -> float:
    s = (hi - lo) / (2**bits - 1)
    q = np.clip(np.round((x - lo) / s), 0, 2**bits - 1) * s + lo
    return float(np.mean((q - x) ** 2))


def test_mse_range_beats_minmax_on_heavy_tails() -> None:
    rng = np.random.default_rng(0)
    x = rng.laplace(size=100_000).astype(np.float32)
    x[:5] = [80, -90, 70, 75, -60]
    mse, mm = MSEObserver(bits=4), MinMaxObserver()
    mse.update(x)
    mm.update(x)
    lo, hi = mse.range()
    assert float(x.min()) <= lo < hi <= float(x.max())
    assert hi < 40.0
    assert _quant_mse(x, lo, hi, 4) < 0.5 * _quant_mse(x, *mm.range(), 4)


def test_mse_keeps_full_range_for_uniform_data() -> None:
    x = np.random.default_rng(0).uniform(-1, 1, 100_000).astype(np.float32)
    obs = MSEObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert lo < -0.95 and hi > 0.95


def test_nonfinite_values_are_counted_and_ignored() -> None:
    obs = MinMaxObserver()
    obs.update(np.array([1.0, np.nan, -2.0, np.inf], dtype=np.float32))
    assert obs.range() == (-2.0, 1.0)
    assert obs.nonfinite == 2


@pytest.mark.parametrize("kind", ["minmax", "percentile", "entropy", "mse"])
def test_no_values_is_an_error(kind: str) -> None:
    obs = make_observer(kind)
    obs.update(np.array([np.nan], dtype=np.float32))
    with pytest.raises(CalibrationError, match="no finite values"):
        obs.range()


def test_all_zero_tensor() -> None:
    for kind in ("minmax", "percentile", "entropy", "mse"):
        obs = make_observer(kind)
        obs.update(np.zeros(100, dtype=np.float32))
        assert obs.range() == (0.0, 0.0)


def test_integer_and_half_inputs() -> None:
    obs = make_observer("percentile", percentile=100.0)
    obs.update(np.arange(-5, 6, dtype=np.int64))
    obs.update(np.array([7.5], dtype=np.float16))
    assert obs.range() == (-5.0, 7.5)


def test_per_channel_minmax() -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    obs = PerChannelMinMaxObserver(axis=1)
    obs.update(x[:2])
    obs.update(x[2:])
    lo, hi = obs.ranges()
    np.testing.assert_array_equal(lo, x.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(hi, x.max(axis=(0, 2, 3)))
    assert obs.range() == (float(x.min()), float(x.max()))
    with pytest.raises(CalibrationError, match="channels"):
        obs.update(np.zeros((1, 4, 2, 2), dtype=np.float32))


def test_unknown_observer_and_bad_options() -> None:
    with pytest.raises(CalibrationError, match="unknown observer 'kl'"):
        make_observer("kl")
    with pytest.raises(CalibrationError, match="percentile must be in"):
        make_observer("percentile", percentile=20.0)
    with pytest.raises(CalibrationError, match="observer 'minmax'"):
        make_observer("minmax", percentile=99.0)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32), min_size=1, max_size=200
    ),
    cut=st.integers(min_value=1, max_value=50),
)
def test_histogram_batch_invariance_property(values: list[float], cut: int) -> None:
    x = np.asarray(values, dtype=np.float32)
    one = PercentileObserver(percentile=99.0, bins=256)
    one.update(x)
    many = _feed(PercentileObserver(percentile=99.0, bins=256), x, cut)
    np.testing.assert_array_equal(one.hist.counts, many.hist.counts)
    assert one.range() == many.range()


def _kl_loop(hist: np.ndarray, i: int, levels: int) -> float:
    """Straightforward TensorRT KL for one threshold (reference for the vectorized version)."""
    p = hist[:i].astype(np.float64).copy()
    p[-1] += hist[i:].sum()
    groups = (np.arange(i) * levels) // i
    q = np.zeros(i)
    for g in range(levels):
        members = np.nonzero((groups == g) & (hist[:i] > 0))[0]
        if members.size:
            q[members] = hist[:i][groups == g].sum() / members.size
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], 1e-12))))


def test_vectorized_kl_matches_a_plain_loop() -> None:
    from onnxcomp.calibration.observers import _kl_divergences

    rng = np.random.default_rng(0)
    hist = np.abs(rng.standard_normal(600) * 50).astype(np.int64) * (rng.random(600) > 0.2)
    hist[590:] = 0
    hist[400] = 3
    cands = np.array([16, 17, 40, 99, 128, 333, 401, 450])
    got = _kl_divergences(hist, cands, 16)
    want = [_kl_loop(hist, int(i), 16) for i in cands]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_mse_prefix_sums_match_brute_force() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.laplace(size=50_000), [40.0, -35.0]]).astype(np.float32)
    obs = MSEObserver(bits=4, candidates=64)
    obs.update(x)
    lo, hi = obs.range()
    h = obs.hist
    counts = h.counts.astype(np.float64)
    centres = np.clip(-h.radius + (np.arange(h.bins) + 0.5) * h.width, obs.min, obs.max)
    best, best_err = None, np.inf
    for t in max(-obs.min, obs.max) * np.linspace(1 / 64, 1.0, 64):
        a, b = max(obs.min, -t), min(obs.max, t)
        clip = np.clip(a - centres, 0, None) + np.clip(centres - b, 0, None)
        s = (b - a) / 15
        err = np.sum(counts * clip**2) + counts[clip == 0].sum() * s * s / 12
        if err < best_err:
            best, best_err = (a, b), err
    assert (lo, hi) == pytest.approx(best)


def test_histogram_growth_by_a_huge_factor() -> None:
    """From all-zero (smallest radius) to large values: bins collapse exactly into the two middle ones."""
    x = np.array([0.0, -1e-30, 3.0, -2.0, 0.0], dtype=np.float32)
    for cut in (1, 2, 5):
        obs = _feed(PercentileObserver(percentile=100.0, bins=256), x, cut)
        whole = PercentileObserver(percentile=100.0, bins=256)
        whole.update(x)
        np.testing.assert_array_equal(obs.hist.counts, whole.hist.counts)
        assert obs.hist.counts.sum() == 5


def test_histogram_tiny_negative_is_batch_invariant() -> None:
    """A negative denormal whose x / w underflows to -0 still lands below zero, batched or not."""
    x = np.array([-1.401298464324817e-45, 128.0], dtype=np.float32)
    one = PercentileObserver(percentile=99.0, bins=256)
    one.update(x)
    many = _feed(PercentileObserver(percentile=99.0, bins=256), x, 1)
    np.testing.assert_array_equal(one.hist.counts, many.hist.counts)
    assert one.hist.counts[127] == 1
