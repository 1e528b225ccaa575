"""Convolutions and the building blocks of PromptReg (SPEC 1.1), channels-last.

Two interchangeable implementations of the 3D convolution share one parameter tree
(``kernel (k, k, k, Cin, Cout)``, ``bias (Cout,)``):

* ``"native"``: ``lax.conv_general_dilated`` in 3D (what ``flax.linen.Conv`` runs);
* ``"depth_sum"``: the 3D conv as a sum over the depth taps of 2D convs, with the depth slices
  folded into the batch. XLA:CPU runs 3D convs several times slower than 2D ones (STACK.md 3), so
  this form is the default there (``"auto"``); on accelerators ``"auto"`` picks ``"native"``.

Initialisation copies PyTorch's defaults (kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))
for weight and bias), so a fresh network is statistically like the reference. Instance norm has no
affine parameters and eps 1e-5, as PyTorch's ``InstanceNorm3d`` defaults; its statistics are
always computed in float32, whatever the compute ``dtype``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Dtype = Any
Padding = Sequence[tuple[int, int]]
CONV_IMPLS = ("auto", "native", "depth_sum")


def resolve_conv_impl(conv_impl: str) -> str:
    """``"auto"`` -> ``"depth_sum"`` on the CPU backend, ``"native"`` elsewhere."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "depth_sum" if jax.default_backend() == "cpu" else "native"
    return conv_impl


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Conv/Linear init of weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv3d(x, kernel, strides: int = 1, padding: Padding = ((1, 1),) * 3,
           conv_impl: str = "native"):
    """Cross-correlation of ``x (B,X,Y,Z,Cin)`` with ``kernel (kx,ky,kz,Cin,Cout)``, no bias.

    ``padding`` is explicit ``(lo, hi)`` zero padding per spatial axis (PyTorch's ``padding=p`` is
    ``((p, p),) * 3``; ``"SAME"`` differs from it for stride 2 on even sizes).
    """
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if resolve_conv_impl(conv_impl) == "native":
        return lax.conv_general_dilated(x, kernel, (strides,) * 3, padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    B, X = x.shape[:2]
    kx = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
    Xo = (xp.shape[1] - kx) // strides + 1
    out = None
    for t in range(kx):
        # Depth slices t, t+s, ... that meet kernel tap t, folded into the batch.
        xs = lax.slice_in_dim(xp, t, t + (Xo - 1) * strides + 1, stride=strides, axis=1)
        y = lax.conv_general_dilated(xs.reshape(B * Xo, *x.shape[2:]), kernel[t], (strides,) * 2,
                                     padding[1:], dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = y if out is None else out + y
    return out.reshape(B, Xo, *out.shape[1:])


# ConvTranspose k4 s2 p1, one axis: out[2m] = x[m-1] W[3] + x[m] W[1] and
# out[2m+1] = x[m] W[2] + x[m+1] W[0]; per output parity: (taps, padding) of a 2-tap correlation.
_PHASES = (((3, 1), (1, 0)), ((2, 0), (0, 1)))


def conv_transpose3d(x, kernel, conv_impl: str = "native"):
    """PyTorch ``ConvTranspose3d(k=4, stride=2, padding=1)`` of ``x (B,X,Y,Z,I)``, no bias.

    ``kernel (4,4,4,O,I)`` is Flax's ``transpose_kernel=True`` layout: PyTorch's ``(I,O,4,4,4)``
    weight moved to ``(4,4,4,O,I)``, no flip. Output ``(B,2X,2Y,2Z,O)``. ``"native"`` is
    ``lax.conv_transpose``; ``"depth_sum"`` splits it into its 8 output phases, each a 2x2x2
    stride-1 conv (no multiplications by inserted zeros), interleaved afterwards.
    """
    if kernel.shape[:3] != (4, 4, 4):
        raise ValueError(f"conv_transpose3d supports 4x4x4 kernels only, got {kernel.shape}")
    if resolve_conv_impl(conv_impl) == "native":
        return lax.conv_transpose(x, kernel, (2, 2, 2), ((2, 2),) * 3,
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                  transpose_kernel=True)
    w = jnp.swapaxes(kernel, 3, 4)  # (4,4,4,I,O): correlation layout
    phases = []
    for a in range(2):
        for b in range(2):
            for c in range(2):
                (ta, pa), (tb, pb), (tc, pc) = _PHASES[a], _PHASES[b], _PHASES[c]
                k = w[np.ix_(ta, tb, tc)]
                phases.append(conv3d(x, k, 1, (pa, pb, pc), conv_impl))
    B, X, Y, Z, O = phases[0].shape
    out = jnp.stack(phases, 0).reshape(2, 2, 2, B, X, Y, Z, O)
    return out.transpose(3, 4, 0, 5, 1, 6, 2, 7).reshape(B, 2 * X, 2 * Y, 2 * Z, O)


def instance_norm(x, eps: float = 1e-5):
    """``InstanceNorm3d`` defaults: per sample and channel over space, biased variance, no affine.

    Statistics in float32; the result has ``x``'s dtype.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 3), keepdims=True)
    return ((x32 - mean) * lax.rsqrt(var + eps)).astype(x.dtype)


class Conv3D(nn.Module):
    """``nn.Conv3d(Cin, features, kernel_size, stride, padding)``; params ``kernel``, ``bias``.

    ``padding`` is symmetric, default ``kernel_size // 2``. Computes in ``dtype`` with
    ``param_dtype`` parameters. Default init is PyTorch's (``fan_in = Cin * k^3``).
    """
    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | None = None
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable | None = None
    bias_init: Callable | None = None

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        default = torch_uniform(cin * k ** 3)
        kernel = self.param("kernel", self.kernel_init or default,
                            (k, k, k, cin, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init or default, (self.features,), self.param_dtype)
        p = k // 2 if self.padding is None else self.padding
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                   ((p, p),) * 3, self.conv_impl)
        return y + bias.astype(self.dtype)


class ConvTranspose3D(nn.Module):
    """``nn.ConvTranspose3d(Cin, features, 4, stride=2, padding=1)``: doubles each spatial size.

    ``kernel (4,4,4,features,Cin)`` (PyTorch ``(Cin,features,4,4,4)`` moved, not flipped).
    PyTorch computes the transposed conv's fan_in from ``weight.size(1) * 4^3 = features * 64``.
    """
    features: int
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = torch_uniform(self.features * 4 ** 3)
        kernel = self.param("kernel", init, (4, 4, 4, self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", init, (self.features,), self.param_dtype)
        y = conv_transpose3d(x.astype(self.dtype), kernel.astype(self.dtype), self.conv_impl)
        return y + bias.astype(self.dtype)


class ConvInsBlock(nn.Module):
    """Conv3d (k, stride 1, padding k//2, bias) -> InstanceNorm -> LeakyReLU (0.01 in PromptReg)."""
    features: int
    kernel_size: int = 3
    negative_slope: float = 0.01
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Conv3D(self.features, self.kernel_size, conv_impl=self.conv_impl, dtype=self.dtype,
                   name="conv")(x)
        return nn.leaky_relu(instance_norm(y), self.negative_slope)


class ConvInsBlocks(nn.Module):
    """A ``Sequential`` of ConvInsBlocks, children ``block0``, ``block1``, ...

    ``kernel_sizes`` defaults to 3 for every block (the RPG's ``fusion`` uses (3, 1)).
    """
    features: Sequence[int]
    kernel_sizes: Sequence[int] | None = None
    negative_slope: float = 0.01
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        sizes = self.kernel_sizes or (3,) * len(self.features)
        for i, (f, k) in enumerate(zip(self.features, sizes)):
            x = ConvInsBlock(f, k, self.negative_slope, self.conv_impl, self.dtype,
                             name=f"block{i}")(x)
        return x


class ResBlock(nn.Module):
    """VoxRes, pre-activation: ``y = x + conv(lrelu(IN(x)))``, then ``lrelu(IN(y))``; slope 0.1."""
    negative_slope: float = 0.1
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        h = nn.leaky_relu(instance_norm(x), self.negative_slope)
        h = Conv3D(x.shape[-1], conv_impl=self.conv_impl, dtype=self.dtype, name="conv")(h)
        return nn.leaky_relu(instance_norm(h + x), self.negative_slope)


class UpConvBlock(nn.Module):
    """ConvTranspose3d k4 s2 p1 -> InstanceNorm -> LeakyReLU(0.1); doubles each spatial size."""
    features: int
    negative_slope: float = 0.1
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = ConvTranspose3D(self.features, self.conv_impl, self.dtype, name="upconv")(x)
        return nn.leaky_relu(instance_norm(y), self.negative_slope)
