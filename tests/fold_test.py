"""The Z-folded layout (promptreg_jax.fold): same numbers as the unfolded layers and model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promptreg_jax import fold as F
from promptreg_jax.conv import conv3d, conv_transpose3d, target_platform
from promptreg_jax.layers import instance_norm
from promptreg_jax.model import PromptReg, level_folds, resolve_fold


def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_fold_unfold_round_trip_and_layout():
    rng = np.random.default_rng(0)
    a, b = _rand(rng, 2, 4, 3, 16, 2), _rand(rng, 2, 4, 3, 16, 5)
    fa = F.fold(a, 8)
    assert fa.shape == (2, 4, 3, 2, 16)
    # xf[..., j, i*C + c] = x[..., 8j + i, c]
    np.testing.assert_array_equal(fa[1, 2, 1, 1, 3 * 2 + 1], a[1, 2, 1, 8 + 3, 1])
    both = jnp.concatenate([fa, F.fold(b, 8)], -1)
    np.testing.assert_array_equal(F.unfold(both, 8, (2, 5)), jnp.concatenate([a, b], -1))
    with pytest.raises(ValueError, match="does not divide"):
        F.fold(a, 5)
    with pytest.raises(ValueError, match="groups"):
        F.unfold(both, 8, (2, 4))


@pytest.mark.parametrize("groups,cout,k,fold", [((3, 3, 3), 5, 3, 8), ((4,), 3, 3, 4),
                                                ((2, 3), 4, 1, 8), ((2,), 3, 5, 8)])
def test_conv3d_folded_matches_the_unfolded_conv(groups, cout, k, fold):
    rng = np.random.default_rng(1)
    parts = [_rand(rng, 1, 6, 5, 16, c) for c in groups]
    x = jnp.concatenate(parts, -1)
    w = _rand(rng, k, k, k, sum(groups), cout) * 0.3
    pad = ((k // 2, k // 2),) * 3
    xf = jnp.concatenate([F.fold(p, fold) for p in parts], -1)
    ref = conv3d(x, w, 1, pad, "native")
    got = F.unfold(F.conv3d_folded(xf, w, fold, groups), fold)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    # gradients with respect to the input and the kernel
    t = _rand(rng, *ref.shape)
    g_ref = jax.grad(lambda x, w: jnp.sum(conv3d(x, w, 1, pad, "native") * t), (0, 1))(x, w)
    g_got = jax.grad(lambda xf, w: jnp.sum(F.conv3d_folded(xf, w, fold, groups)
                                            * F.fold(t, fold)), (0, 1))(xf, w)
    np.testing.assert_allclose(F.unfold(g_got[0], fold, groups), g_ref[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(g_got[1], g_ref[1], atol=1e-4, rtol=1e-5)


def test_conv3d_folded_rejects_what_it_cannot_do():
    x = jnp.zeros((1, 4, 4, 2, 8 * 3))
    with pytest.raises(ValueError, match="odd kernel"):
        F.conv3d_folded(x, jnp.zeros((2, 2, 2, 3, 3)), 8)
    with pytest.raises(ValueError, match="input channels"):
        F.conv3d_folded(x, jnp.zeros((3, 3, 3, 4, 3)), 8)


@pytest.mark.parametrize("fold,shape", [(8, (1, 3, 4, 8, 5)), (4, (2, 4, 3, 6, 3)),
                                        (2, (1, 2, 2, 3, 2))])
def test_conv_transpose3d_folded_matches_the_transposed_conv(fold, shape):
    """Straight into the folded layout: fold(ConvTranspose3d k4 s2 p1), values and gradients."""
    rng = np.random.default_rng(4)
    x = _rand(rng, *shape)
    w = _rand(rng, 4, 4, 4, 3, shape[-1]) * 0.3
    ref = F.fold(conv_transpose3d(x, w, "native"), fold)
    got = F.conv_transpose3d_folded(x, w, fold)
    assert got.shape == ref.shape == (shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3] // fold,
                                      fold * 3)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    t = _rand(rng, *ref.shape)
    g_ref = jax.grad(lambda x, w: jnp.sum(F.fold(conv_transpose3d(x, w, "native"), fold) * t),
                     (0, 1))(x, w)
    g_got = jax.grad(lambda x, w: jnp.sum(F.conv_transpose3d_folded(x, w, fold) * t), (0, 1))(x, w)
    np.testing.assert_allclose(g_got[0], g_ref[0], atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(g_got[1], g_ref[1], atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="even fold"):
        F.conv_transpose3d_folded(x, w, 3)


def test_instance_norm_folded_matches():
    rng = np.random.default_rng(2)
    x = _rand(rng, 2, 5, 4, 16, 6) * 3.0 + 1.0
    got = F.unfold(F.instance_norm_folded(F.fold(x, 8), 8), 8)
    np.testing.assert_allclose(got, instance_norm(x), atol=2e-5)


def test_level_folds():
    assert level_folds(8) == (8, 0, 0, 0) and level_folds(0, 2) == (0, 0, 0, 0)
    assert level_folds(8, 2) == (8, 4, 0, 0) and level_folds(16, 2) == (16, 8, 0, 0)
    assert level_folds(2, 2) == (2, 0, 0, 0)
    assert level_folds(8, "auto") == (8, 0, 0, 0) and level_folds(8, "2") == (8, 4, 0, 0)
    for bad in (0, 3, "x", 1.5):
        with pytest.raises(ValueError, match="fold_levels="):
            level_folds(8, bad)


def test_remat_candidates_add_the_half_resolution_fold_only_where_it_can_matter():
    from promptreg_jax.train import remat_candidates
    auto = dict(fold="auto", fold_levels="auto")
    assert remat_candidates(auto, "tpu") == [
        ("none", "none", 1), ("none+fold2", "none", 2), ("levels", "levels", 1),
        ("levels+fold2", "levels", 2), ("blocks", "blocks", 1), ("blocks+fold2", "blocks", 2)]
    plain = [("none", "none", 1), ("levels", "levels", 1), ("blocks", "blocks", 1)]
    assert remat_candidates(auto, "cpu") == plain  # "auto" folds nothing off TPU
    assert remat_candidates(dict(auto, fold=0), "tpu") == plain
    assert remat_candidates(dict(fold=8, fold_levels=1), "tpu") == plain
    assert remat_candidates(dict(fold=8, fold_levels="2"), "tpu") == [
        (m, m, 2) for m in ("none", "levels", "blocks")]
    assert remat_candidates(dict(auto, name="voxelmorph"), "tpu") == [
        ("none", "none", 1), ("levels", "levels", 1)]


def test_resolve_fold():
    assert resolve_fold(0) == 0 and resolve_fold("8") == 8 and resolve_fold(16) == 16
    with target_platform("tpu"):
        assert resolve_fold("auto") == 8
    with target_platform("cpu"):
        assert resolve_fold("auto") == 0
    for bad in ("x", -8, 1, 6):
        with pytest.raises(ValueError, match="fold="):
            resolve_fold(bad)


@pytest.mark.slow
def test_folded_model_gives_the_unfolded_models_numbers():
    """Same parameters, same flow, losses and gradients with the full-resolution level folded
    (schedule (1,1,1,2) also runs the folded dconv1); the parameter trees are identical.
    With ``fold_levels=2`` the 1/2 level (encoder block, decoder level) is folded too, by 4."""
    rng = np.random.default_rng(3)
    size = (1, 16, 8, 16, 1)
    moving, fixed = jnp.asarray(rng.random(size), jnp.float32), jnp.asarray(rng.random(size),
                                                                            jnp.float32)
    kw = dict(channels=4, num_tasks=2, schedule=(1, 1, 1, 2), conv_impl="native")
    m0, m8 = PromptReg(fold=0, **kw), PromptReg(fold=8, **kw)
    m84 = PromptReg(fold=8, fold_levels=2, **kw)  # also the 1/2 level, by 4
    params = m0.init(jax.random.key(0), moving, fixed)["params"]
    for m in (m8, m84):
        p8 = m.init(jax.random.key(0), moving, fixed)["params"]
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(p8)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p8)):
            np.testing.assert_array_equal(a, b)
    # flow heads scaled up so the fields are voxels, not 1e-5
    params = jax.tree_util.tree_map(lambda p: p * 300 if p.ndim == 5 and p.shape[-1] == 3
                                    else p, params)

    def loss(model, p):
        out = model.apply({"params": p}, moving, fixed, jnp.array([0]))
        value = jnp.mean((out["warped"] - fixed) ** 2) + 0.1 * jnp.mean(out["flow"] ** 2)
        return value, out

    (l0, o0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(m0, p), has_aux=True))(params)
    assert float(jnp.abs(o0["flow"]).max()) > 0.3
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g0))
    for m in (m8, m84):
        (l8, o8), g8 = jax.jit(jax.value_and_grad(lambda p: loss(m, p), has_aux=True))(params)
        np.testing.assert_allclose(o8["flow"], o0["flow"], atol=2e-5)
        np.testing.assert_allclose(o8["intermediates"]["encoder_moving_level0"],
                                   o0["intermediates"]["encoder_moving_level0"], atol=2e-5)
        np.testing.assert_allclose(l8, l0, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g8)):
            np.testing.assert_allclose(b, a, atol=2e-4 * scale)
