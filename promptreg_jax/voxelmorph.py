"""VoxelMorph baseline: the ``voxelmorph`` package's default U-Net with a diffeomorphic flow head.

Balakrishnan et al. (VoxelMorph) and Dalca et al. (diffeomorphic variant): a U-Net on
``[moving, fixed]`` (encoder 16, 32, 32, 32; decoder 32, 32, 32, 32, 32, 16, 16; conv k3 +
LeakyReLU 0.2; max pooling down, nearest x2 up, skip concatenation as ``voxelmorph.networks.Unet``),
a velocity head initialised N(0, 1e-5), and scaling and squaring with ``int_steps`` squarings.
Unlike ``VxmDense`` (``int_downsize=2``) the velocity is integrated at full resolution.
The output dict has PromptReg's keys, so the training loop can swap the two models.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from promptreg_jax.layers import Conv3D
from promptreg_jax.spatial import integrate, warp


class ConvAct(nn.Module):
    """Conv3d k3 (child ``conv``) -> LeakyReLU; the unit that ``remat`` checkpoints."""
    features: int
    negative_slope: float = 0.2
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Conv3D(self.features, conv_impl=self.conv_impl, dtype=self.dtype, name="conv")(x)
        return nn.leaky_relu(y, self.negative_slope)


def _upsample_nearest(x):
    for axis in (1, 2, 3):
        x = jnp.repeat(x, 2, axis=axis)
    return x


class VoxelMorph(nn.Module):
    """``__call__(moving, fixed, task_id=None)`` -> the dict of ``PromptReg`` (``task_id`` unused).

    ``moving``/``fixed`` ``(B,X,Y,Z,C)``, X, Y, Z divisible by ``2 ** len(enc_features)`` (16).
    ``prompt_weights`` is ``(B,0)``, both prompt losses are 0, ``intermediates`` is empty.
    ``remat`` checkpoints every conv + activation: only block inputs are kept for the backward.
    """
    enc_features: Sequence[int] = (16, 32, 32, 32)
    dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16)
    negative_slope: float = 0.2
    int_steps: int = 7
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, moving, fixed, task_id=None):
        levels = len(self.enc_features)
        if len(self.dec_features) < levels:
            raise ValueError(f"dec_features {self.dec_features} needs at least {levels} entries")
        if moving.ndim != 5 or moving.shape != fixed.shape:
            raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} must both be "
                             f"(B,X,Y,Z,C) with the same shape")
        if any(n % 2 ** levels for n in moving.shape[1:4]):
            raise ValueError(f"spatial size {moving.shape[1:4]} must be divisible by "
                             f"{2 ** levels} ({levels} pooling levels)")
        block_cls = nn.remat(ConvAct) if self.remat else ConvAct
        block = lambda f, name: block_cls(f, self.negative_slope, self.conv_impl, self.dtype,
                                          name=name)
        x = jnp.concatenate([moving, fixed], -1).astype(self.dtype)
        skips = []
        for i, f in enumerate(self.enc_features):
            x = block(f, f"encoder_{i}")(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
        for i, f in enumerate(self.dec_features[:levels]):
            x = block(f, f"decoder_{i}")(x)
            x = jnp.concatenate([_upsample_nearest(x), skips.pop()], -1)
        for i, f in enumerate(self.dec_features[levels:]):
            x = block(f, f"remaining_{i}")(x)
        velocity = Conv3D(3, conv_impl=self.conv_impl, kernel_init=nn.initializers.normal(1e-5),
                          bias_init=nn.initializers.zeros, name="flow")(x.astype(jnp.float32))
        flow = integrate(velocity, self.int_steps)
        zero = jnp.zeros((), jnp.float32)
        return {"flow": flow, "warped": warp(moving, flow),
                "prompt_weights": jnp.zeros((moving.shape[0], 0), jnp.float32),
                "loss_ort": zero, "loss_ts": zero, "intermediates": {}}
