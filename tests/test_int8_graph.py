"""The int8 graph's rounding (GPTQ, smoothing, asymmetric steps), on synthetic weights and activations."""

import numpy as np
import pytest

from retro_dask.text.int8_graph import gptq, smoothing, stat_groups


def activations(rng, tokens=4000, channels=96):
    """Correlated channels with a few outliers, as a transformer's hidden states have."""
    mix = rng.normal(size=(channels, channels)) * 0.3 + np.eye(channels)
    x = rng.normal(size=(tokens, channels)) @ mix
    x[:, :3] *= 20.0
    return x


def dequantized(q, scale, zero):
    return (q.astype(np.float64) - zero[:, None]) * scale[:, None]


def test_gptq_output_error_below_nearest_rounding():
    rng = np.random.default_rng(0)
    x = activations(rng)
    w = rng.normal(size=(64, 96))  # [out, in]
    q, scale, zero = gptq(w, x.T @ x)
    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    assert np.allclose(scale, (hi - lo) / 255.0, rtol=1e-6)
    nearest = (np.clip(np.rint(w / scale[:, None]) + zero[:, None], 0, 255) - zero[:, None]) * scale[:, None]
    err_gptq = np.linalg.norm(x @ (w - dequantized(q, scale, zero)).T)
    err_nearest = np.linalg.norm(x @ (w - nearest).T)
    assert err_gptq < 0.7 * err_nearest, (err_gptq, err_nearest)
    assert q.dtype == np.uint8 and zero.dtype == np.uint8 and scale.dtype == np.float32


def test_gptq_keeps_zero_rows_and_dead_channels():
    rng = np.random.default_rng(1)
    x = activations(rng, channels=16)
    x[:, 5] = 0.0  # a channel that never fires
    w = rng.normal(size=(8, 16))
    w[2] = 0.0
    q, scale, zero = gptq(w, x.T @ x)
    back = dequantized(q, scale, zero)
    assert np.all(back[2] == 0) and np.all(np.isfinite(back))
    assert np.abs(back[:, 5]).max() == 0  # a dead channel's weights do not matter and are zeroed


def test_smoothing_keeps_the_product_and_tames_outliers():
    rng = np.random.default_rng(2)
    x = activations(rng, tokens=500, channels=32)
    w = rng.normal(size=(32, 48))  # [in, out], as the graph's MatMul holds it
    s = smoothing(np.abs(x).max(0), w)
    assert np.allclose((x / s) @ (w * s[:, None]), x @ w)
    ratio = lambda a: np.abs(a).max(0).max() / np.median(np.abs(a).max(0))  # noqa: E731
    assert ratio(x / s) < ratio(x) / 3


class _Init:
    def __init__(self, name, dims):
        self.name, self.dims = name, dims


class _Graph:
    def __init__(self, inits):
        self.initializer = inits


class _Model:
    def __init__(self, inits):
        self.graph = _Graph(inits)


@pytest.mark.parametrize("budget_mb, groups", [(512, 1), (1, 3)])
def test_statistics_are_gathered_in_groups_that_fit_the_budget(monkeypatch, budget_mb, groups):
    import retro_dask.text.int8_graph as int8_graph

    monkeypatch.setattr(int8_graph, "STATS_BYTES", budget_mb << 20)
    model = _Model([_Init("a", [384, 1152]), _Init("b", [384, 384]), _Init("c", [1536, 384])])
    out = stat_groups(model, [("x1", "a"), ("x2", "b"), ("x3", "c")])
    assert len(out) == groups and [m for g in out for m in g] == [("x1", "a"), ("x2", "b"), ("x3", "c")]
