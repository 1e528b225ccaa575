"""The building blocks of PromptReg (SPEC 1.1) as Flax modules, channels-last.

The convolutions themselves (``"native"`` and the CPU ``"depth_sum"`` form, one parameter tree:
``kernel (k, k, k, Cin, Cout)``, ``bias (Cout,)``) are in ``promptreg_jax.conv``.

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

from promptreg_jax.conv import conv3d, conv_transpose3d
from promptreg_jax.fold import conv3d_folded, conv_transpose3d_folded, instance_norm_folded

Dtype = Any


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Conv/Linear init of weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
    ``fold`` > 0: ``x`` and the result are Z-folded (``promptreg_jax.fold``; stride 1, default
    padding), ``groups`` the unfolded channels of the maps side by side in ``x``; the parameters
    are the same as unfolded.
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
    fold: int = 0
    groups: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        cin = x.shape[-1] // max(self.fold, 1)
        if self.fold and (self.strides != 1 or self.padding not in (None, k // 2)):
            raise ValueError("a folded Conv3D needs stride 1 and padding kernel_size // 2")
        default = torch_uniform(cin * k ** 3)
        kernel = self.param("kernel", self.kernel_init or default,
                            (k, k, k, cin, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init or default, (self.features,), self.param_dtype)
        if self.fold:
            y = conv3d_folded(x.astype(self.dtype), kernel.astype(self.dtype), self.fold,
                              self.groups)
            return y + jnp.tile(bias.astype(self.dtype), self.fold)
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
    fold: int = 0

    @nn.compact
    def __call__(self, x):
        """``x`` unfolded; with ``fold`` the output is Z-folded (``fold.conv_transpose3d_folded``)."""
        init = torch_uniform(self.features * 4 ** 3)
        kernel = self.param("kernel", init, (4, 4, 4, self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", init, (self.features,), self.param_dtype)
        if self.fold:
            y = conv_transpose3d_folded(x.astype(self.dtype), kernel.astype(self.dtype), self.fold)
            return y + jnp.tile(bias.astype(self.dtype), self.fold)
        y = conv_transpose3d(x.astype(self.dtype), kernel.astype(self.dtype), self.conv_impl)
        return y + bias.astype(self.dtype)


class ConvInsBlock(nn.Module):
    """Conv3d (k, stride 1, padding k//2, bias) -> InstanceNorm -> LeakyReLU (0.01 in PromptReg).

    ``fold``/``groups``: on Z-folded maps (see :class:`Conv3D`), same parameters and numbers.
    """
    features: int
    kernel_size: int = 3
    negative_slope: float = 0.01
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    fold: int = 0
    groups: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x):
        y = Conv3D(self.features, self.kernel_size, conv_impl=self.conv_impl, dtype=self.dtype,
                   fold=self.fold, groups=self.groups, name="conv")(x)
        y = instance_norm_folded(y, self.fold) if self.fold else instance_norm(y)
        return nn.leaky_relu(y, self.negative_slope)


class ConvInsBlocks(nn.Module):
    """A ``Sequential`` of ConvInsBlocks, children ``block0``, ``block1``, ...

    ``kernel_sizes`` defaults to 3 for every block (the RPG's ``fusion`` uses (3, 1)).
    ``remat``: each block keeps only its input for the backward pass (``nn.remat``, i.e.
    ``jax.checkpoint``; same parameters and numbers). It lowers the peak on TPU and GPU, where a
    full-resolution block's conv, norm and activation temporaries dominate; XLA:CPU merges the
    recomputation back (see ``promptreg_jax.remat``), so there it changes nothing.
    ``fold``: Z-folded maps in and out; ``groups`` describes the input of the first block.
    """
    features: Sequence[int]
    kernel_sizes: Sequence[int] | None = None
    negative_slope: float = 0.01
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    remat: bool = False
    fold: int = 0
    groups: Sequence[int] | None = None

    @nn.compact
    def __call__(self, x):
        sizes = self.kernel_sizes or (3,) * len(self.features)
        block = nn.remat(ConvInsBlock) if self.remat else ConvInsBlock
        for i, (f, k) in enumerate(zip(self.features, sizes)):
            x = block(f, k, self.negative_slope, self.conv_impl, self.dtype, self.fold,
                      self.groups if i == 0 else None, name=f"block{i}")(x)
        return x


class ResBlock(nn.Module):
    """VoxRes, pre-activation: ``y = x + conv(lrelu(IN(x)))``, then ``lrelu(IN(y))``; slope 0.1.

    ``fold``: on a Z-folded map (see :class:`Conv3D`), same parameters and numbers.
    """
    negative_slope: float = 0.1
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    fold: int = 0

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        norm = (lambda v: instance_norm_folded(v, self.fold)) if self.fold else instance_norm
        h = nn.leaky_relu(norm(x), self.negative_slope)
        h = Conv3D(x.shape[-1] // max(self.fold, 1), conv_impl=self.conv_impl, dtype=self.dtype,
                   fold=self.fold, name="conv")(h)
        return nn.leaky_relu(norm(h + x), self.negative_slope)


class UpConvBlock(nn.Module):
    """ConvTranspose3d k4 s2 p1 -> InstanceNorm -> LeakyReLU(0.1); doubles each spatial size.

    ``fold``: the output Z-folded (the input stays unfolded), same parameters and numbers."""
    features: int
    negative_slope: float = 0.1
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    fold: int = 0

    @nn.compact
    def __call__(self, x):
        y = ConvTranspose3D(self.features, self.conv_impl, self.dtype, fold=self.fold,
                            name="upconv")(x)
        y = instance_norm_folded(y, self.fold) if self.fold else instance_norm(y)
        return nn.leaky_relu(y, self.negative_slope)
