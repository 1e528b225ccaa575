"""Convolutions (native vs depth-sum vs loop references of PyTorch's ops), norms and blocks."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from promptreg_jax import conv as C
from promptreg_jax import layers as L


# "rbg" keys: threefry's bit generator takes seconds to compile on XLA:CPU.
KEY = jax.random.key(0, impl="rbg")


def _normal(seed, shape):
    """Test inputs from numpy: eager jax.random costs a compile per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def _torch_conv3d(x, w, stride, pad):
    """``F.conv3d`` by loops: x (Cin,X,Y,Z), w (Cout,Cin,k,k,k), symmetric zero padding."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0),) + ((pad, pad),) * 3)
    out_shape = [(n + 2 * pad - k) // stride + 1 for n in x.shape[1:]]
    out = np.zeros((w.shape[0], *out_shape))
    for i, j, l in itertools.product(*map(range, out_shape)):
        a, b, c = i * stride, j * stride, l * stride
        patch = xp[:, a:a + k, b:b + k, c:c + k]
        out[:, i, j, l] = np.einsum("cxyz,ocxyz->o", patch, w)
    return out


def _torch_conv_transpose3d(x, w):
    """``F.conv_transpose3d(stride=2, padding=1)`` by scattering: x (I,X,Y,Z), w (I,O,4,4,4)."""
    X, Y, Z = x.shape[1:]
    out = np.zeros((w.shape[1], 2 * X + 2, 2 * Y + 2, 2 * Z + 2))
    for i, j, l in itertools.product(range(X), range(Y), range(Z)):
        out[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4, 2 * l:2 * l + 4] += np.einsum(
            "c,cokmn->okmn", x[:, i, j, l], w)
    return out[:, 1:-1, 1:-1, 1:-1]


@pytest.mark.parametrize("stride,k,shape", [(1, 3, (7, 6, 5)), (2, 3, (7, 6, 5)),
                                            (2, 3, (8, 6, 4)), (1, 1, (5, 4, 3))])
def test_conv3d_matches_pytorch_loop(stride, k, shape):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, *shape)), rng.normal(size=(4, 3, k, k, k))
    ref = np.moveaxis(_torch_conv3d(x, w, stride, k // 2), 0, -1)[None]
    xl = jnp.asarray(np.moveaxis(x, 0, -1)[None], jnp.float32)
    kernel = jnp.asarray(np.transpose(w, (2, 3, 4, 1, 0)), jnp.float32)
    for impl in ("native", "depth_sum"):
        out = C.conv3d(xl, kernel, stride, ((k // 2, k // 2),) * 3, impl)
        assert out.shape == ref.shape
        assert _rel(out, ref) < 1e-5, impl


def test_conv_transpose3d_matches_pytorch_loop():
    """Also fixes the converter's layout: PyTorch (I,O,4,4,4) -> (4,4,4,O,I), no flip."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 4, 4))
    ref = np.moveaxis(_torch_conv_transpose3d(x, w), 0, -1)[None]
    xl = jnp.asarray(np.moveaxis(x, 0, -1)[None], jnp.float32)
    kernel = jnp.asarray(np.transpose(w, (2, 3, 4, 1, 0)), jnp.float32)
    for impl in ("native", "depth_sum"):
        out = C.conv_transpose3d(xl, kernel, impl)
        assert out.shape == (1, 6, 8, 10, 3)
        assert _rel(out, ref) < 1e-5, impl


@pytest.mark.parametrize("stride,k,pad", [(1, 3, ((1, 1),) * 3), (2, 3, ((1, 1),) * 3),
                                          (1, 1, ((0, 0),) * 3), (1, 2, ((1, 0), (0, 1), (1, 0)))])
def test_depth_sum_equals_native_forward_and_gradient(stride, k, pad):
    x, kernel = _normal(0, (2, 9, 6, 7, 3)), _normal(1, (k, k, k, 3, 5))
    target = _normal(2, jax.eval_shape(lambda: C.conv3d(x, kernel, stride, pad)).shape)

    def loss(x, kernel, impl):
        return jnp.sum(C.conv3d(x, kernel, stride, pad, impl) * target)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    ref, out = fn(x, kernel, "native"), fn(x, kernel, "depth_sum")
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("cin,cout,k,pad", [
    (3, 5, 3, ((1, 1),) * 3),            # depth_stacked forward (Cout < 96)
    (5, 96, 3, ((1, 1),) * 3),           # depth_sum forward
    (1, 6, 3, ((1, 1),) * 3),            # "taps" forward (Cin = 1)
    (2, 6, 3, ((1, 1),) * 3),            # "columns" forward (Cin <= 4)
    (6, 3, 3, ((1, 1),) * 3),            # "shift_sum" forward (Cout <= 4)
    (5, 6, 1, ((0, 0),) * 3),            # 1x1x1
    (5, 6, 2, ((1, 0), (0, 1), (1, 1)))])  # the transposed conv's 2x2x2 form
def test_cpu_conv_custom_vjp_equals_native(cin, cout, k, pad):
    """The CPU conv's automatic forms (forward by channels, dK by plane loop on 16x16 planes)."""
    x, kernel = _normal(0, (2, 5, 16, 16, cin)), _normal(1, (k, k, k, cin, cout))
    target = _normal(2, jax.eval_shape(lambda: C.conv3d(x, kernel, 1, pad)).shape)

    def loss(x, kernel, impl):
        return jnp.sum(C.conv3d(x, kernel, 1, pad, impl) * target)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    ref, out = fn(x, kernel, "native"), fn(x, kernel, "depth_sum")
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        assert _rel(a, b) < 2e-5


def test_cpu_conv_every_form_equals_native(monkeypatch):
    """Each forward form and each dK form, forced, on one small problem."""
    monkeypatch.setattr(C, "_STACKED_CHUNK_BYTES", 1)  # "depth_stacked" one plane at a time
    monkeypatch.setattr(C, "_COLUMNS_CHUNK_BYTES", 1)  # "dy_columns" one input plane at a time
    pad = ((1, 0), (1, 1), (0, 1))
    x, kernel = _normal(0, (2, 6, 5, 7, 3)), _normal(1, (3, 3, 3, 3, 4))
    dy = _normal(2, jax.eval_shape(lambda: C.conv3d(x, kernel, 1, pad)).shape)
    y_ref, vjp = jax.vjp(lambda x, k: C.conv3d(x, k, 1, pad, "native"), x, kernel)
    dx_ref, dk_ref = vjp(dy)
    for form in ("depth_sum", "depth_stacked", "taps", "columns", "shift_sum"):
        assert _rel(jax.jit(C._conv_forward, static_argnums=(2, 3))(x, kernel, pad, form),
                    y_ref) < 1e-5, form
        assert _rel(jax.jit(C._input_grad, static_argnums=(2, 3))(dy, kernel, pad, form),
                    dx_ref) < 1e-5, form
    for form in ("planes", "dy_columns", "autodiff"):
        assert _rel(jax.jit(C._kernel_grad, static_argnums=(3, 4))(x, dy, kernel, pad, form),
                    dk_ref) < 1e-5, form


def test_conv_transpose_depth_sum_equals_native_gradient():
    x = _normal(0, (2, 3, 4, 5, 6))
    kernel = _normal(1, (4, 4, 4, 5, 6))
    target = _normal(2, (2, 6, 8, 10, 5))
    grad = lambda impl: jax.jit(jax.grad(
        lambda x, k: jnp.sum(C.conv_transpose3d(x, k, impl) * target), argnums=(0, 1)))(x, kernel)
    for a, b in zip(grad("depth_sum"), grad("native")):
        assert _rel(a, b) < 1e-5


def test_modules_share_one_parameter_tree_across_impls():
    x = _normal(0, (1, 8, 8, 6, 4))
    for module in (lambda impl: L.Conv3D(5, strides=2, padding=1, conv_impl=impl),
                   lambda impl: L.UpConvBlock(3, conv_impl=impl)):
        params = jax.jit(module("native").init)(KEY, x)
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
            jax.eval_shape(module("depth_sum").init, KEY, x))
        out = jax.jit(module("depth_sum").apply)(params, x)
        assert _rel(out, jax.jit(module("native").apply)(params, x)) < 1e-5


def test_resolve_conv_impl():
    assert C.resolve_conv_impl("auto") == ("depth_sum" if jax.default_backend() == "cpu"
                                           else "native")
    with pytest.raises(ValueError, match="conv_impl"):
        C.resolve_conv_impl("fft")


def test_conv_impl_follows_the_target_platform_not_the_host():
    # Compiling for an accelerator from a CPU host: the target decides ("auto" -> "native").
    assert C.resolve_conv_impl("auto", platform="tpu") == "native"
    assert C.resolve_conv_impl("auto", platform="cuda") == "native"
    assert C.resolve_conv_impl("auto", platform="cpu") == "depth_sum"
    with C.target_platform("tpu"):
        assert C.current_platform() == "tpu"
        assert C.resolve_conv_impl("auto") == "native"
        assert C.resolve_conv_impl("depth_sum") == "depth_sum"
        with C.target_platform("cpu"):
            assert C.resolve_conv_impl("auto") == "depth_sum"
        # What is traced inside the context uses the native 3D conv.
        x, k = jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((3, 3, 3, 2, 3))
        jaxpr = str(jax.make_jaxpr(lambda a, b: C.conv3d(a, b, conv_impl="auto"))(x, k))
        assert jaxpr.count("conv_general_dilated") == 1
    with C.target_platform(None):
        assert C.current_platform() == C.current_platform(jax.default_backend())


def test_pytorch_default_init_bounds():
    x = jnp.zeros((1, 4, 4, 4, 16))
    p = jax.jit(L.Conv3D(32).init)(KEY, x)["params"]
    bound = 1 / np.sqrt(16 * 27)
    assert p["kernel"].shape == (3, 3, 3, 16, 32) and p["bias"].shape == (32,)
    assert np.abs(p["kernel"]).max() <= bound and np.abs(p["kernel"]).max() > 0.95 * bound
    np.testing.assert_allclose(np.std(p["kernel"]), bound / np.sqrt(3), rtol=0.05)
    assert np.abs(p["bias"]).max() <= bound
    # Transposed conv: PyTorch takes fan_in from weight.size(1) = out channels.
    p = jax.jit(L.ConvTranspose3D(8).init)(KEY, x)["params"]
    assert p["kernel"].shape == (4, 4, 4, 8, 16)
    bound = 1 / np.sqrt(8 * 64)
    assert bound * 0.95 < np.abs(p["kernel"]).max() <= bound


def test_instance_norm_matches_flax_and_definition():
    x = 3.0 + 2.0 * _normal(0, (2, 5, 4, 3, 6))
    ref = jax.jit(nn.InstanceNorm(epsilon=1e-5, use_bias=False, use_scale=False).apply)({}, x)
    y = jax.jit(L.instance_norm)(x)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(np.mean(y, axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(np.var(y, axis=(1, 2, 3)), 1, atol=1e-3)


def test_blocks_shapes_jit_and_bf16():
    x = _normal(0, (2, 8, 6, 4, 4))
    res = L.ResBlock()
    p = jax.jit(res.init)(KEY, x)
    np.testing.assert_allclose(jax.jit(res.apply)(p, x), res.apply(p, x), atol=1e-5)
    up = L.UpConvBlock(3)
    assert jax.eval_shape(lambda x: up.init_with_output(KEY, x)[0], x).shape == (
        2, 16, 12, 8, 3)
    block = L.ConvInsBlock(5, negative_slope=0.01)
    p = jax.jit(block.init)(KEY, x)
    y32 = jax.jit(block.apply)(p, x)
    y16 = jax.jit(L.ConvInsBlock(5, dtype=jnp.bfloat16).apply)(p, x)
    assert jax.tree_util.tree_leaves(p)[0].dtype == jnp.float32
    assert y16.dtype == jnp.bfloat16 and y16.shape == (2, 8, 6, 4, 5)
    assert np.abs(np.asarray(y16, np.float32) - y32).max() < 0.1
    z = jax.jit(lambda p, x: L.instance_norm(L.Conv3D(5).apply({"params": p}, x)))(
        p["params"]["conv"], x)
    np.testing.assert_allclose(y32, np.where(z > 0, z, 0.01 * z), atol=1e-6)
