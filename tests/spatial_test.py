"""Warp, integration, composition, resizing: fixtures, a loop reference and properties."""


import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import channels_last, load_fixture
# The package re-exports the function `warp`, so fetch the module itself.
from promptreg_jax import conv, sampling, sharding
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


@pytest.mark.parametrize("sampler", ["scatter", "cells"])
@pytest.mark.parametrize("batch", [1, 2])
def test_custom_vjp_equals_autodiff_of_map_coordinates(batch, sampler):
    """The hand-written backward of trilinear sampling (image and flow), points outside included,
    in the CPU form (8 corner scatters) and the accelerator form (one gather, one scatter)."""
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

    with W.use_sampler(sampler):
        out, vjp = jax.vjp(W.warp, img, flow)
        vjp = jax.jit(vjp)
    ref, vjp_ref = jax.vjp(reference, img, flow)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(vjp(dy), vjp_ref(dy)):
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


def test_border_boundary_extends_fields_by_their_edge_values():
    # A constant velocity integrates to exactly itself, border shell included; zeros lose it there.
    const = np.full((1, 10, 9, 8, 3), 1.5, np.float32)
    np.testing.assert_allclose(W.integrate(const, 6, boundary="border"), const, atol=1e-5)
    assert float(jnp.min(W.integrate(const, 6)[:, -1])) < 1.0
    a = np.full((1, 8, 8, 8, 3), 1.0, np.float32)
    b = np.full((1, 8, 8, 8, 3), 2.0, np.float32)
    np.testing.assert_allclose(W.compose(a, b, boundary="border"), 3.0, atol=1e-6)
    # Inside (where no squaring reaches past the edge) the two boundaries agree; a smooth random
    # velocity of up to ~1 voxel.
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.uniform(-1, 1, (1, 12, 12, 12, 3)), jnp.float32)
    zeros, border = W.integrate(v, 5), W.integrate(v, 5, "border")
    np.testing.assert_allclose(border[:, 3:-3, 3:-3, 3:-3], zeros[:, 3:-3, 3:-3, 3:-3], atol=1e-5)
    assert float(jnp.max(jnp.abs(border - zeros))) > 0.05
    # Gradients: reverse mode against a central finite difference along a random direction.
    d = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
    f = lambda x: jnp.sum(jnp.sin(W.integrate(x, 4, "border")))
    g = jax.grad(f)(v)
    eps = 1e-2
    fd = (f(v + eps * d) - f(v - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=2e-2)
    with pytest.raises(ValueError, match="boundary") as err:
        W.integrate(v, 4, "reflect")
    assert "\n" not in str(err.value)


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


# --------------------------------------------------------------------- sampler forms per target
def _rand(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape), jnp.float32)


def _grads(fn, args, sampler, argnums):
    with W.use_sampler(sampler):
        return jax.jit(jax.value_and_grad(fn, argnums))(*args)


def test_sampler_resolves_per_target_platform():
    from promptreg_jax import conv
    assert W.resolve_sampler("auto", platform="cpu") == "scatter"
    assert W.resolve_sampler("auto", platform="tpu") == "cells"
    assert W.resolve_sampler("auto", platform="cuda") == "cells"
    assert W.resolve_sampler("gather", platform="cpu") == "gather"
    with conv.target_platform("tpu"):
        assert W.resolve_sampler() == "cells"
        with W.use_sampler("scatter"):
            assert W.resolve_sampler() == "scatter"
    with pytest.raises(ValueError, match="sampler"):
        W.resolve_sampler("fft")


def test_sampler_environment_override(monkeypatch):
    monkeypatch.setenv("PROMPTREG_SAMPLER", "mixed")
    assert W.resolve_sampler("auto", platform="tpu") == "mixed"
    assert W.resolve_sampler("scatter", platform="tpu") == "scatter"  # explicit wins
    assert W._form_for("mixed", 3) == "cells" and W._form_for("mixed", 16) == "scatter"


@pytest.mark.parametrize("sampler", ["scatter", "cells"])
def test_bfloat16_backward_has_no_implicit_downcast(sampler):
    """bfloat16 images and features (``model.dtype``): each form's scatter-add of float32
    weights times bfloat16 cotangents casts explicitly (an implicit float32 -> bfloat16 scatter is
    a FutureWarning in jax 0.10-0.11 that says it will become an error), and the gradient stays close
    to float32's. Channels 2 and 16 cover the cells form's channel-first and row layouts."""
    import warnings
    for channels in (2, 16):
        img, flow = _rand((1, 6, 5, 7, channels), 30), _rand((1, 6, 5, 7, 3), 31, 1.5)
        fn = lambda a, b: jnp.sum(W.warp(a, b).astype(jnp.float32) ** 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            v16, (gi16, gf16) = _grads(fn, (img.astype(jnp.bfloat16), flow), sampler, (0, 1))
        v32, (gi32, gf32) = _grads(fn, (img, flow), sampler, (0, 1))
        assert gi16.dtype == jnp.bfloat16 and gf16.dtype == jnp.float32
        np.testing.assert_allclose(float(v16), float(v32), rtol=3e-2)
        for a, b in ((gi16, gi32), (gf16, gf32)):
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=5e-2 * scale)


def test_mixed_form_equals_scatter_form():
    img, flow = _rand((1, 6, 5, 7, 8), 20), _rand((1, 6, 5, 7, 3), 21, 2.0)
    fn = lambda a, b: jnp.sum(W.warp(a, b) ** 2) + jnp.sum(W.integrate(b, 3) ** 2)
    (v0, g0), (v1, g1) = (_grads(fn, (img, flow), s, (0, 1)) for s in ("scatter", "mixed"))
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("shape,channels", [((9, 8, 7), 3), ((6, 10, 5), 16)])
def test_cells_form_equals_scatter_form(shape, channels):
    """Values and both gradients of warp, off-grid sample and compose: equal to float round-off
    (only the order of the float sums differs)."""
    img = _rand((1, *shape, channels), 0)
    flow = _rand((1, *shape, 3), 1, 2.5)   # many points partly or wholly outside
    r = _rand((1, *shape, channels), 2)
    crd = jnp.asarray(np.random.default_rng(4).uniform(-1.5, np.array(shape) + 0.5,
                                                       (1, 4, 5, 3, 3)), jnp.float32)
    r2 = _rand((1, 4, 5, 3, channels), 5)
    cases = [(lambda a, b: jnp.sum(W.warp(a, b) * r), (img, flow)),
             (lambda a, b: jnp.sum(W.sample(a, b) * r2), (img, crd)),
             (lambda a, b: jnp.sum(W.compose(a, b) ** 2), (flow, 0.5 * flow))]
    for fn, args in cases:
        (v0, g0), (v1, g1) = (_grads(fn, args, s, (0, 1)) for s in ("scatter", "cells"))
        np.testing.assert_allclose(v1, v0, rtol=1e-5)
        for a, b in zip(g1, g0):
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(a, b, atol=2e-6 * scale + 1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_cells_form_in_y_slabs_equals_scatter_form(batch, monkeypatch):
    """A wide on-grid warp past ``_SLAB_BYTES`` runs its cells passes in a loop over Y slabs
    (the 160^3 feature warp on TPU): values and both gradients as the scatter form."""
    shape, channels = (6, 10, 5), 16
    monkeypatch.setattr(sampling, "_SLAB_BYTES", {"cpu": 40_000})
    assert sampling._y_slabs(shape, channels) == 5 and sampling._y_slabs(shape, 3) == 1
    monkeypatch.setattr(sampling, "_SLAB_BYTES", {"tpu": 2**30, "cpu": 40_000})
    with conv.target_platform("tpu"):   # the 160^3 feature warp: 1.95 GiB of rows, 2 slabs
        assert sampling._y_slabs((160,) * 3, 16) == 2 and sampling._y_slabs((160,) * 3, 16, 2) == 1
    with conv.target_platform("gpu"):
        assert sampling._y_slabs((160,) * 3, 16) == 1
    mesh = sharding.make_mesh({"data": 1, "space": 2}, jax.devices()[:2])
    with sharding.spatial_mesh(mesh):   # a space-sharded step keeps the single pass
        assert sampling._y_slabs(shape, channels) == 1
    img = _rand((batch, *shape, channels), 30)
    flow = _rand((batch, *shape, 3), 31, 2.5)
    r = _rand((batch, *shape, channels), 32)
    fn = lambda a, b: jnp.sum(W.warp(a, b) * r)
    with W.use_sampler("cells"):
        hlo = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(img, flow).as_text(dialect="hlo")
    assert hlo.count(" while(") == 3  # forward, coordinate gradient, image gradient
    (v0, g0), (v1, g1) = (_grads(fn, (img, flow), s, (0, 1)) for s in ("scatter", "cells"))
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.max(jnp.abs(b))) + 1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_cells_form_integrate_gradient_equals_scatter_form(batch):
    """The accelerator form's squaring loop (channel-first carry, one-residual self-warp) equals
    today's loop in value and gradient."""
    v = _rand((batch, 10, 9, 8, 3), 6, 4.0)
    r = _rand((batch, 10, 9, 8, 3), 7)
    fn = lambda v: jnp.sum(W.integrate(v, 7) * r)
    (v0, g0), (v1, g1) = (_grads(fn, (v,), s, 0) for s in ("scatter", "cells"))
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(g1, g0, atol=1e-5 * float(jnp.max(jnp.abs(g0))))


def test_cells_form_drops_the_scatter_when_the_image_is_not_differentiated():
    """A fixed input image (the final warp of the moving image): only gathers remain."""
    img, flow = _rand((1, 8, 8, 8, 1), 8), _rand((1, 8, 8, 8, 3), 9)
    with W.use_sampler("cells"):
        only_flow = jax.jit(jax.grad(lambda f: jnp.sum(W.warp(img, f) ** 2))).lower(flow)
        both = jax.jit(jax.grad(lambda i, f: jnp.sum(W.warp(i, f) ** 2), (0, 1))).lower(img, flow)
    ops = lambda lowered: lowered.as_text(dialect="hlo").count(" scatter(")
    assert ops(only_flow) == 0
    assert ops(both) == 1  # one scatter of 8-corner rows


def test_gather_form_is_exact_for_translations_and_close_for_smooth_small_fields():
    """The opt-in gather-only image gradient: exact for a constant displacement (away from the
    border), an approximation otherwise (the volume change of x -> x + u(x) is ignored)."""
    n = 16
    r = _rand((1, n, n, n, 2), 10)
    img = _rand((1, n, n, n, 2), 11)
    const = jnp.full((1, n, n, n, 3), 0.37, jnp.float32)
    fn = lambda i, f: jnp.sum(W.warp(i, f) * r)
    g_exact = _grads(fn, (img, const), "scatter", 0)[1]
    g_gather = _grads(fn, (img, const), "gather", 0)[1]
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(g_gather[inner], g_exact[inner], atol=1e-5)
    # A smooth field with small derivatives (at most 0.04 voxel/voxel): a few percent off (the
    # error is first order, about 1.3x the largest derivative; measured 0.28 at 0.21).
    x = np.arange(n, dtype=np.float32)
    wave = 0.1 * np.sin(2 * np.pi * x / n)
    smooth = jnp.asarray(np.stack(np.broadcast_arrays(wave[:, None, None], wave[None, :, None],
                                                      wave[None, None, :]), -1)[None])
    g_exact = _grads(fn, (img, smooth), "scatter", 0)[1]
    g_gather = _grads(fn, (img, smooth), "gather", 0)[1]
    rel = float(jnp.linalg.norm((g_gather - g_exact)[inner]) / jnp.linalg.norm(g_exact[inner]))
    assert rel < 0.08, rel


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_self_warp_gather_layouts_agree(layout, monkeypatch):
    monkeypatch.setattr(sampling, "_SELF_WARP_LAYOUT", [layout])
    v = _rand((1, 7, 6, 5, 3), 12, 3.0)
    r = _rand((1, 7, 6, 5, 3), 13)
    fn = lambda v: jnp.sum(W.integrate(v, 3) * r)
    (v0, g0), (v1, g1) = (_grads(fn, (v,), s, 0) for s in ("scatter", "cells"))
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(g1, g0, atol=1e-5 * float(jnp.max(jnp.abs(g0))))
