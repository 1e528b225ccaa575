"""Warp, integration, composition, resizing: fixtures, a loop reference and properties."""


import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import channels_last, load_fixture
# The package re-exports the function `warp`, so fetch the module itself.
from promptreg_jax import spatial as W

TOL = 2e-5  # float32 round-off on values of order 1-5


def _slow_trilinear(vol, flow):
    """Obviously correct reference: loops over voxels and the 8 corners, zero outside."""
    X, Y, Z = vol.shape
    out = np.zeros_like(vol, dtype=np.float64)
    for x, y, z in itertools.product(range(X), range(Y), range(Z)):
        p = np.array([x, y, z], np.float64) + flow[x, y, z]
        lo = np.floor(p).astype(int)
        for c in itertools.product((0, 1), repeat=3):
            q = lo + np.array(c)
            w = np.prod([p[a] - lo[a] if c[a] else 1 - (p[a] - lo[a]) for a in range(3)])
            if all(0 <= q[a] < vol.shape[a] for a in range(3)):
                out[x, y, z] += w * vol[tuple(q)]
    return out


@pytest.fixture(scope="module")
def ops():
    return load_fixture("reference_ops.npz")


def test_warp_matches_reference(ops):
    out = W.warp(channels_last(ops["image"]), channels_last(ops["flow"]))
    np.testing.assert_allclose(out, channels_last(ops["warp_image_by_flow"]), atol=TOL)


def test_integrate_matches_reference(ops):
    out = W.integrate(0.2 * channels_last(ops["flow"]), steps=7)
    np.testing.assert_allclose(out, channels_last(ops["integrate_flow_7_steps"]), atol=TOL)


def test_upsample_matches_reference(ops):
    flow = channels_last(ops["flow"])
    ref = channels_last(ops["upsample_trilinear_align_corners"])
    np.testing.assert_allclose(W.resize(flow, ref.shape[1:4]), ref, atol=TOL)
    np.testing.assert_allclose(W.upsample_flow(flow), 2 * ref, atol=2 * TOL)
    # numpy input runs in numpy and gives the same numbers.
    out_np = W.resize(np.asarray(flow), ref.shape[1:4])
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, ref, atol=TOL)


def test_warp_equals_slow_loop_reference():
    rng = np.random.default_rng(0)
    vol = rng.random((6, 5, 4)).astype(np.float32)
    flow = rng.normal(0, 1.5, (6, 5, 4, 3)).astype(np.float32)
    out = W.warp(vol[None, ..., None], flow[None])[0, ..., 0]
    np.testing.assert_allclose(out, _slow_trilinear(vol, flow), atol=1e-5)


def test_zero_flow_is_identity_and_integer_shift_is_exact():
    rng = np.random.default_rng(1)
    img = rng.random((2, 7, 6, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(W.warp(img, np.zeros(img.shape[:4] + (3,), np.float32)), img)
    shift = np.zeros(img.shape[:4] + (3,), np.float32)
    shift[..., 0], shift[..., 2] = 2.0, -1.0
    out = np.asarray(W.warp(img, shift))
    np.testing.assert_array_equal(out[:, :-2, :, 1:], img[:, 2:, :, :-1])
    assert np.all(out[:, -2:] == 0) and np.all(out[:, :, :, :1] == 0)  # zero outside


def test_half_voxel_past_edge_gives_half_edge_value():
    img = np.ones((1, 4, 4, 4, 1), np.float32)
    flow = np.zeros((1, 4, 4, 4, 3), np.float32)
    flow[..., 0] = 0.5
    out = np.asarray(W.warp(img, flow))
    np.testing.assert_allclose(out[0, -1, :, :, 0], 0.5)
    np.testing.assert_allclose(out[0, :-1, :, :, 0], 1.0)


def test_nearest_warp_keeps_labels():
    lab = np.arange(60, dtype=np.int32).reshape(1, 5, 4, 3, 1)
    flow = np.full((1, 5, 4, 3, 3), 0.4, np.float32)  # rounds to no shift
    np.testing.assert_array_equal(W.warp(lab, flow, order=0), lab)
    flow[..., 1] = 0.6  # rounds to +1 along axis 1
    out = np.asarray(W.warp(lab, flow, order=0))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :, :-1], lab[:, :, 1:])
    assert np.all(out[:, :, -1] == 0)


def test_jit_batch_and_gradients():
    rng = np.random.default_rng(2)
    img = rng.random((2, 8, 7, 6, 1)).astype(np.float32)
    flow = rng.normal(0, 1, (2, 8, 7, 6, 3)).astype(np.float32)
    a = W.warp(img, flow)
    np.testing.assert_allclose(jax.jit(W.warp)(img, flow), a, atol=1e-6)
    single = np.concatenate([W.warp(img[i:i + 1], flow[i:i + 1]) for i in range(2)])
    np.testing.assert_allclose(single, a, atol=1e-6)
    g = jax.grad(lambda f: jnp.sum(W.warp(img, f) ** 2))(flow)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # Gradient against a central finite difference in one coordinate.
    e = np.zeros_like(flow)
    e[0, 3, 3, 3, 1] = 1e-2
    f = lambda fl: float(jnp.sum(W.warp(img, fl) ** 2))
    fd = (f(flow + e) - f(flow - e)) / 2e-2
    np.testing.assert_allclose(g[0, 3, 3, 3, 1], fd, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("batch", [1, 2])
def test_custom_vjp_equals_autodiff_of_map_coordinates(batch):
    """The hand-written backward of trilinear sampling (image and flow), points outside included."""
    from jax.scipy.ndimage import map_coordinates
    rng = np.random.default_rng(3)
    img = jnp.asarray(rng.normal(size=(batch, 6, 7, 5, 2)), jnp.float32)
    flow = jnp.asarray(rng.normal(0, 2.0, (batch, 6, 7, 5, 3)), jnp.float32)  # many outside
    dy = jnp.asarray(rng.normal(size=img.shape), jnp.float32)

    def reference(img, flow):
        crd = W.identity_grid(img.shape[1:4])[None] + flow
        return jnp.stack([jnp.stack([map_coordinates(img[b, ..., c], jnp.moveaxis(crd[b], -1, 0),
                                                     order=1, mode="constant")
                                     for c in range(img.shape[-1])], -1)
                          for b in range(img.shape[0])])

    out, vjp = jax.vjp(W.warp, img, flow)
    ref, vjp_ref = jax.vjp(reference, img, flow)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(jax.jit(vjp)(dy), vjp_ref(dy)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_integrate_and_compose_properties():
    zero = np.zeros((1, 6, 6, 6, 3), np.float32)
    np.testing.assert_array_equal(W.integrate(zero), zero)
    const = np.full((1, 12, 12, 12, 3), 0.3, np.float32)
    # Away from the far border (where zero fill enters) a constant velocity integrates to
    # itself, a translation.
    np.testing.assert_allclose(W.integrate(const)[:, :6, :6, :6], 0.3, atol=1e-5)
    # Composition of two translations adds them (interior).
    a = np.full((1, 8, 8, 8, 3), 1.0, np.float32)
    b = np.full((1, 8, 8, 8, 3), 2.0, np.float32)
    np.testing.assert_allclose(W.compose(a, b)[:, :5, :5, :5], 3.0, atol=1e-6)


def test_resize_nearest_is_legacy_torch_nearest():
    lab = np.arange(5 * 3 * 2).reshape(1, 5, 3, 2, 1)
    out = W.resize(lab, (8, 4, 3), order=0)
    for ax, (n_in, n_out) in enumerate([(5, 8), (3, 4), (2, 3)]):
        src = np.floor(np.arange(n_out) * n_in / n_out).astype(int)
        assert out.shape[ax + 1] == n_out
        lab = np.take(lab, src, axis=ax + 1)
    np.testing.assert_array_equal(out, lab)
    assert out.dtype == lab.dtype


def test_resize_linear_hits_corners_and_linear_ramp():
    ramp = np.linspace(0, 1, 9, dtype=np.float32)[None, :, None, None, None] * np.ones((1, 9, 4, 4, 1),
                                                                                       np.float32)
    out = W.resize(ramp, (17, 5, 3))
    np.testing.assert_allclose(out[0, :, 0, 0, 0], np.linspace(0, 1, 17), atol=1e-6)


def test_resample_flow_translation_between_grids():
    # A translation by t network voxels along axis 0 on a 16^3 grid, fixed original 31 voxels
    # along that axis: align-corners scaling makes it 2t fixed voxels.
    flow = np.zeros((1, 16, 16, 16, 3), np.float32)
    flow[..., 0] = 1.5
    d = np.asarray(W.resample_flow(flow, (31, 16, 46)))
    np.testing.assert_allclose(d[..., 0], 3.0, atol=1e-5)
    np.testing.assert_allclose(d[..., 1:], 0.0, atol=1e-5)
    # Different moving and fixed originals: the identity network field maps fixed corners to
    # moving corners.
    d = np.asarray(W.resample_flow(np.zeros_like(flow), (31, 16, 46), moving_shape=(11, 16, 46)))
    grid = np.arange(31, dtype=np.float32)
    np.testing.assert_allclose(grid + d[0, :, 0, 0, 0], grid * 10 / 30, atol=1e-5)
