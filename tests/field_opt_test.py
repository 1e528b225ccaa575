"""Dense-field instance optimisation (``promptreg_jax.field_opt``) on small synthetic pairs.

Compilations are few on purpose: the optimisation tests share one shape (32^3) and one set of
levels, so the jitted level function compiles once per level shape and path (without labels,
with labels), plus one 16^3 program for the jit-versus-eager check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from promptreg_jax import field_opt
from promptreg_jax.field_opt import mind_similarity, optimize_field
from promptreg_jax.metrics import dice, jacobian_determinant, sdlogj
from promptreg_jax.spatial import integrate, warp

N = 32
OPTS = dict(levels=(2, 1), steps=(60, 30), lr=(0.5, 0.25), smooth=1.0)


def blobby_image(n: int, seed: int) -> np.ndarray:
    """Random Gaussian blobs plus a smoothed-noise texture, float32 ``(n, n, n)``."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij"), -1)
    img = np.zeros((n, n, n), np.float32)
    for _ in range(40):
        c, s, a = rng.uniform(2, n - 3, 3), rng.uniform(1.5, 4.0), rng.uniform(-1, 1)
        img += a * np.exp(-np.sum((grid - c) ** 2, -1) / (2 * s * s))
    return img + 0.3 * ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.0).astype(
        np.float32)


def smooth_velocity(n: int, rms: float, seed: int) -> jnp.ndarray:
    """A smooth velocity whose exponential has RMS magnitude ``rms`` voxels."""
    rng = np.random.default_rng(seed)
    v = np.stack([ndimage.gaussian_filter(rng.standard_normal((n,) * 3), n / 5, mode="wrap")
                  for _ in range(3)], -1)[None].astype(np.float32)
    v = jnp.asarray(v)
    return v * rms / jnp.sqrt(jnp.mean(jnp.sum(integrate(v) ** 2, -1)))


@pytest.fixture(scope="module")
def pair():
    """``fixed``, ``moving = fixed o exp(-v)`` and the true displacement ``exp(v)``."""
    fixed = blobby_image(N, 0)
    v = smooth_velocity(N, 2.5, 1)
    moving = np.asarray(warp(jnp.asarray(fixed)[None, ..., None], integrate(-v)))[0, ..., 0]
    return moving, fixed, np.asarray(integrate(v))


@pytest.fixture(scope="module")
def recovered(pair):
    moving, fixed, _ = pair
    m_copy, f_copy = moving.copy(), fixed.copy()
    disp = optimize_field(moving, fixed, **OPTS)
    assert np.array_equal(moving, m_copy) and np.array_equal(fixed, f_copy), "inputs modified"
    return np.asarray(disp)


def _epe(disp, true, crop=3):
    err = np.linalg.norm(np.asarray(disp)[0] - true[0], axis=-1)
    return float(err[crop:-crop, crop:-crop, crop:-crop].mean())


def test_recovers_known_deformation_without_folds(pair, recovered):
    _, _, true = pair
    assert recovered.shape == (1, N, N, N, 3) and recovered.dtype == np.float32
    before, after = _epe(np.zeros_like(true), true), _epe(recovered, true)
    assert before > 1.5, before
    assert after < 0.4 * before, (before, after)
    det = jacobian_determinant(recovered[0])
    assert det.min() > 0, det.min()


def test_mind_similarity_drops_after_registration(pair, recovered):
    moving, fixed, _ = pair
    warped = warp(jnp.asarray(moving)[None, ..., None], jnp.asarray(recovered))
    assert mind_similarity(fixed, fixed) == 0.0
    assert mind_similarity(warped, fixed) < 0.6 * mind_similarity(moving, fixed)
    # A mask selects the voxels compared.
    mask = np.zeros((N, N, N), bool)
    mask[8:24, 8:24, 8:24] = True
    assert mind_similarity(moving, fixed, mask=mask) != mind_similarity(moving, fixed)


def test_identity_on_identical_images_and_no_retrace(pair, recovered):
    _, fixed, _ = pair
    traces = field_opt.TRACE_COUNT["level"]
    disp = optimize_field(fixed, fixed, **OPTS)
    # Adam on round-off: 0.056 voxel at most (an edge voxel), 0.004 on average.
    assert float(jnp.max(jnp.abs(disp))) < 0.08 and float(jnp.mean(jnp.abs(disp))) < 0.01
    # Same shapes and path: no new trace, whatever the step counts and learning rates.
    optimize_field(fixed, fixed, **dict(OPTS, steps=(3, 2), lr=(0.1, 0.1)))
    assert field_opt.TRACE_COUNT["level"] == traces


def test_working_grid_bounds_size(pair, recovered):
    moving, fixed, true = pair
    disp, info = optimize_field(moving, fixed, levels=(1,), steps=60, lr=0.5, smooth=1.0,
                                max_voxels=16 ** 3, return_info=True)
    assert info["working_shape"] == (16, 16, 16) and info["levels"][0]["shape"] == (16, 16, 16)
    assert disp.shape == (1, N, N, N, 3)
    assert _epe(disp, true) < 0.6 * _epe(np.zeros_like(true), true)


def test_dice_term_improves_label_overlap(pair):
    """Identical images (MIND gives no gradient) but a shifted label: only Dice can move it."""
    _, fixed, _ = pair
    grid = np.stack(np.meshgrid(*[np.arange(N)] * 3, indexing="ij"), -1)
    ball = lambda c: (np.sum((grid - np.asarray(c)) ** 2, -1) <= 7 ** 2).astype(np.int32)
    fixed_label, moving_label = ball((16, 16, 16)), ball((18, 15, 16))
    disp = optimize_field(fixed, fixed, moving_label=moving_label, fixed_label=fixed_label,
                          dice_weight=1.0, **OPTS)
    warped = np.asarray(warp(jnp.asarray(moving_label)[None, ..., None], disp, order=0))[0, ..., 0]
    before, after = dice(fixed_label, moving_label, [1])[0], dice(fixed_label, warped, [1])[0]
    assert after > before + 0.05 and after > 0.9, (before, after)
    assert jacobian_determinant(np.asarray(disp)[0]).min() > 0


def test_warm_start_smooths_a_rough_initial_field(pair, recovered):
    """``init_mode="warm"``: a rough start (the true field plus voxel-wise noise, as a network's
    field can be) is the initial velocity, so the result is regularised as a whole: closer to
    the truth than the start, no folds. ``"compose"`` keeps the noise. From a zero start, warm is
    exactly the optimisation from the identity (same program, no new trace)."""
    moving, fixed, true = pair
    rng = np.random.default_rng(5)
    rough = (true + rng.normal(0, 1.0, true.shape)).astype(np.float32)
    traces = field_opt.TRACE_COUNT["level"]
    zero = optimize_field(moving, fixed, np.zeros_like(true), init_mode="warm", **OPTS)
    np.testing.assert_array_equal(np.asarray(zero), recovered)
    assert field_opt.TRACE_COUNT["level"] == traces
    warm = np.asarray(optimize_field(moving, fixed, rough, init_mode="warm", **OPTS))
    start = _epe(rough, true)
    assert _epe(warm, true) < 0.5 * start, (start, _epe(warm, true))
    assert jacobian_determinant(warm[0]).min() > 0
    composed = np.asarray(optimize_field(moving, fixed, rough, init_mode="compose",
                                         **dict(OPTS, steps=(2, 2))))
    assert jacobian_determinant(composed[0]).min() < 0  # the noise is kept, and folds


def test_prior_mode_keeps_a_right_initial_field_that_warm_shrinks(pair):
    """``init_mode="prior"``: the diffusion term acts on the difference from the (coarsened)
    initial field, so with a heavy weight a right start survives (measured: EPE 0.37 voxels of
    2.31 at weight 20) where warm, which regularises the whole field, pulls it towards a
    constant (1.36). Also: still invertible, and a bad ``prior_factor`` is one clear error."""
    moving, fixed, true = pair
    opts = dict(OPTS, smooth=20.0)
    prior = np.asarray(optimize_field(moving, fixed, true, init_mode="prior", **opts))
    warm = np.asarray(optimize_field(moving, fixed, true, init_mode="warm", **opts))
    assert _epe(prior, true) < 0.6 and _epe(warm, true) > 1.0, (_epe(prior, true),
                                                                _epe(warm, true))
    assert jacobian_determinant(prior[0]).min() > 0
    with pytest.raises(ValueError, match="prior_factor must be >= 1"):
        optimize_field(moving, fixed, true, init_mode="prior", prior_factor=0.5, **OPTS)


def test_border_boundary_keeps_a_translation_smooth_at_the_edge():
    # Anatomy in a ball on an empty background, translated by t: the true field is t everywhere,
    # pointing out of the volume at the faces x = 0 and y = 0. With the field extended by its edge
    # values in the squarings (the default), field IO recovers it up to the edge; with zeros there
    # the squarings shrink it in a shell a few voxels deep, and the Jacobian turns rough there.
    t = np.array([-3.0, -1.0, 0.5], np.float32)
    r = np.sqrt(((np.indices((N,) * 3) - (N - 1) / 2) ** 2).sum(0))
    fixed = (blobby_image(N, 6) * (r < 0.3 * N)).astype(np.float32)
    moving = ndimage.shift(fixed, t, order=1).astype(np.float32)  # fixed(x) = moving(x + t)
    out = {}
    for boundary in ("border", "zeros"):
        disp = np.asarray(optimize_field(moving, fixed, boundary=boundary, **OPTS))[0]
        err = np.linalg.norm(disp - t, axis=-1)[r < 0.3 * N - 2]  # over the anatomy
        out[boundary] = (sdlogj(disp), float(np.median(err)),
                         float(disp[0, :, :, 0].mean()))
    sd, err, face = out["border"]
    assert sd < 0.08 and err < 0.3 and abs(face - t[0]) < 0.5, out
    assert sd < 0.5 * out["zeros"][0] and abs(out["zeros"][2] - t[0]) > 2 * abs(face - t[0]), out


def test_jit_matches_eager():
    fixed = blobby_image(16, 2)
    moving = np.roll(fixed, 1, axis=0)
    init = np.full((1, 16, 16, 16, 3), 0.2, np.float32)
    kw = dict(levels=(1,), steps=2, lr=0.3, field_factor=1, int_steps=2)
    jitted = optimize_field(moving, fixed, init, **kw)
    with jax.disable_jit():
        eager = optimize_field(moving, fixed, init, **kw)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-4)
    assert float(jnp.max(jnp.abs(jitted - init))) > 0.1  # the steps did something


@pytest.mark.parametrize("call, match", [
    (lambda m, f: optimize_field(m[:, :, :-1], f), "same grid"),
    (lambda m, f: optimize_field(m, f, moving_label=(m > 0).astype(int)), "both"),
    (lambda m, f: optimize_field(m, f, init_disp=np.zeros((N, N, N, 2))), "init_disp"),
    (lambda m, f: optimize_field(m, f, steps=(1, 2)), "levels"),
    (lambda m, f: optimize_field(m * np.nan, f), "NaN"),
    (lambda m, f: mind_similarity(m[:-1], f), "differ"),
    (lambda m, f: optimize_field(m, f, init_mode="start"), "init_mode"),
    (lambda m, f: optimize_field(m, f, boundary="wrap"), "boundary"),
])
def test_bad_input_raises_one_line(pair, call, match):
    moving, fixed, _ = pair
    with pytest.raises(ValueError, match=match) as err:
        call(moving, fixed)
    assert "\n" not in str(err.value)
