"""Stateless registration maths: warp, integrate, compose, resize, resample.

The contract, stated once for the whole package:

* Arrays are channels-last. Images are ``(B, X, Y, Z, C)``; displacement fields are
  ``(B, X, Y, Z, 3)`` in **voxels** of the grid they live on, channel ``i`` along array axis ``i``.
* Warping pulls: ``warped(x) = moving(x + u(x))``, trilinear, with every out-of-volume corner
  sample counting as 0 (so half a voxel past the edge gives half the edge value). This equals
  PyTorch ``grid_sample(align_corners=True, padding_mode="zeros")`` as the reference uses it and
  ``jax.scipy.ndimage.map_coordinates(order=1, mode="constant")``.
* A field sampled past the volume (``compose``, and the squarings of ``integrate``) counts as 0
  there by default (``boundary="zeros"``, the reference's and the network's convention);
  ``boundary="border"`` extends it by its edge values instead. Field IO uses "border": with zeros,
  the squarings of a velocity that points out of the volume read zeros at the edge, and the
  integrated field's Jacobian is rough in a shell a few voxels deep (field IO on the 8 synthetic
  Brain test pairs: whole-field SDlogJ 0.217 with zeros, 0.095 with "border", same Dice).
* Resizing maps corners to corners (``align_corners=True``): index ``i`` of an ``n``-voxel axis sits
  at ``i * (m - 1) / (n - 1)`` on an ``m``-voxel axis covering the same extent.

Every function here works under ``jit``, ``grad`` (reverse mode: trilinear sampling has a
custom VJP) and ``vmap``; ``resize`` also takes numpy arrays
and then runs in numpy (the data pipeline uses it outside JAX).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The sampling kernels; ``identity_grid``, ``resolve_sampler``, ``use_sampler`` and ``SAMPLERS`` are
# part of this module's API too.
from promptreg_jax.sampling import (SAMPLERS, _form_for, _sample_linear, _sample_nearest,  # noqa: F401
                                    _self_warp_cf, identity_grid, resolve_sampler, use_sampler)

BOUNDARIES = ("zeros", "border")

__all__ = ["BOUNDARIES", "SAMPLERS", "check_boundary", "compose", "identity_grid", "integrate",
           "resample_flow", "resize", "resolve_sampler", "sample", "upsample_flow", "use_sampler",
           "warp"]


def sample(volume, coords, order: int = 1):
    """Samples ``volume (B, X, Y, Z, C)`` at absolute voxel ``coords (B, *S, 3)``, zero outside.

    ``order=1`` is trilinear (differentiable in both arguments, reverse mode), ``order=0``
    nearest (labels keep their dtype). The output grid ``S`` may differ from the volume's grid.
    """
    if volume.ndim != 5 or coords.shape[-1] != 3 or coords.shape[0] != volume.shape[0]:
        raise ValueError(f"sample: volume {volume.shape} must be (B,X,Y,Z,C) and coords "
                         f"{coords.shape} (B,...,3) with the same batch")
    if order not in (0, 1):
        raise ValueError(f"sample: order must be 0 or 1, got {order}")
    shape = tuple(volume.shape[1:4])
    out_shape = coords.shape[1:-1]
    if order == 1:
        form = _form_for(resolve_sampler(), volume.shape[-1])
        fn = lambda vol, pts, shape: _sample_linear(vol, pts, shape, False, form)
    else:
        fn = _sample_nearest

    return _per_sample(fn, volume, coords.astype(jnp.float32), shape, out_shape)


def _per_sample(fn, volume, points, shape, out_shape):
    """``fn(volume (N, C), points (P, 3), shape)`` per batch entry, reshaped to ``out_shape``."""
    C = volume.shape[-1]

    def one(vol, pts):
        return fn(vol.reshape(-1, C), pts.reshape(-1, 3), shape).reshape(*out_shape, C)

    if volume.shape[0] == 1:  # no vmap: XLA:CPU runs batched gathers several times slower
        return one(volume[0], points[0])[None]
    return jax.vmap(one)(volume, points)


def warp(image, flow, order: int = 1):
    """``warped(x) = image(x + flow(x))``: image ``(B,X,Y,Z,C)``, flow ``(B,X,Y,Z,3)`` voxels."""
    if flow.shape[:4] != image.shape[:4] or flow.shape[-1] != 3:
        raise ValueError(f"warp: flow {flow.shape} must be (B,X,Y,Z,3) on the image grid "
                         f"{image.shape}")
    if order == 1:
        shape = tuple(image.shape[1:4])
        form = _form_for(resolve_sampler(), image.shape[-1])
        warp_fn = lambda vol, disp, shape: _sample_linear(vol, disp, shape, True, form)
        return _per_sample(warp_fn, image, flow.astype(jnp.float32), shape, shape)
    return sample(image, identity_grid(flow.shape[1:4], flow.dtype)[None] + flow, order)


def check_boundary(boundary: str, where: str) -> None:
    """One-line ``ValueError`` naming ``where`` unless ``boundary`` is one of ``BOUNDARIES``."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"{where}: boundary must be one of {BOUNDARIES}, got {boundary!r}")


def _field_at(u, w, boundary: str):
    """``u(x + w(x))``: ``u`` sampled on its own grid, extended past it by ``boundary``."""
    if boundary == "zeros":
        return warp(u, w)
    shape = u.shape[1:4]
    hi = jnp.asarray([n - 1 for n in shape], jnp.float32)
    coords = jnp.clip(identity_grid(shape)[None] + w.astype(jnp.float32), 0.0, hi)
    return sample(u, coords)


def compose(u, w, boundary: str = "zeros"):
    """``u(x + w(x)) + w(x)``: the increment ``w`` is applied first (reference's composition).

    ``boundary``: how ``u`` extends past the volume, "zeros" (the reference) or "border" (its edge
    values).
    """
    check_boundary(boundary, "compose")
    return _field_at(u, w, boundary) + w


def integrate(velocity, steps: int = 7, boundary: str = "zeros"):
    """Scaling and squaring: ``v / 2**steps``, then ``steps`` times ``u <- u + u(x + u)``.

    ``boundary``: how ``u`` extends past the volume in the squarings, "zeros" (the reference, the
    network) or "border" (its edge values; field IO). "border" runs the generic sampler on every
    platform.
    """
    check_boundary(boundary, "integrate")
    u = velocity / (2.0 ** steps)
    form = _form_for(resolve_sampler(), 3)
    if form == "scatter" or boundary == "border":
        # A loop, not unrolled Python: XLA compiles one squaring body (about 5x faster to compile
        # for 7 steps with gradients; the same numbers).
        return jax.lax.fori_loop(0, steps, lambda _, u: u + _field_at(u, u, boundary), u)
    # Accelerators: the loop carries the field channel-first, (3, X*Y*Z), so the per-step fields
    # kept for the backward pass are not padded from 3 to 128 lanes on TPU (42x); the squaring
    # uses the one-gather, one-scatter sampler.
    shape = tuple(velocity.shape[1:4])

    def one(v):
        u_cf = jnp.moveaxis(v, -1, 0).reshape(3, -1)
        u_cf = jax.lax.fori_loop(0, steps, lambda _, w: w + _self_warp_cf(w, shape, form), u_cf)
        return jnp.moveaxis(u_cf.reshape(3, *shape), 0, -1)

    if velocity.shape[0] == 1:
        return one(u[0])[None]
    return jax.vmap(one)(u)


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def _linear_axis(x, axis: int, n_out: int):
    """Align-corners linear interpolation of one axis to ``n_out`` samples."""
    xp = _xp(x)
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    if n_in == 1:
        return xp.repeat(x, n_out, axis=axis)
    pos = np.linspace(0.0, n_in - 1.0, n_out) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    frac = (pos - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    a = xp.take(x, lo, axis=axis)
    b = xp.take(x, lo + 1, axis=axis)
    return a * (1.0 - frac) + b * frac


def _nearest_axis(x, axis: int, n_out: int):
    """PyTorch's legacy ``mode='nearest'``: source index ``floor(i * n_in / n_out)``."""
    xp = _xp(x)
    n_in = x.shape[axis]
    src = np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1)
    return xp.take(x, src, axis=axis)


def resize(volume, shape: Sequence[int], order: int = 1):
    """Resizes the three spatial axes of ``volume (B,X,Y,Z,C)`` to ``shape``.

    ``order=1``: align-corners trilinear (``F.interpolate(mode='trilinear', align_corners=True)``),
    computed separably, which is exact for trilinear interpolation. ``order=0``: the reference's
    legacy nearest for labels (``src = floor(dst * in / out)``), dtype kept. numpy in, numpy out.
    ``jax.image.resize`` is *not* equivalent: it uses half-pixel centres.
    """
    if volume.ndim != 5:
        raise ValueError(f"resize: expected (B,X,Y,Z,C), got shape {volume.shape}")
    if len(shape) != 3:
        raise ValueError(f"resize: target shape must have 3 entries, got {shape}")
    fn = {0: _nearest_axis, 1: _linear_axis}[order]
    out = volume
    for axis, n in zip((1, 2, 3), shape):
        out = fn(out, axis, int(n))
    return out


def upsample_flow(flow):
    """x2 per axis, align-corners trilinear, magnitude doubled (the RDP level change)."""
    return 2.0 * resize(flow, [2 * n for n in flow.shape[1:4]], order=1)


def resample_flow(flow, shape: Sequence[int], moving_shape: Sequence[int] | None = None):
    """Expresses a field predicted on one grid on another grid covering the same extent.

    ``flow (B,X,Y,Z,3)`` maps grid point ``x`` to ``x + flow(x)`` on its own grid (the network
    grid, where fixed and moving were both resized to the same shape). The result lives on the
    fixed image's original grid ``shape`` and, in its voxels, points into the moving image's
    original grid ``moving_shape`` (default: ``shape``): ``moving_orig(y + d(y))`` is the
    correspondence the network found for fixed voxel ``y``. Grids are related by align-corners
    scaling, as ``resize`` relates them. For equal shapes this is the Learn2Reg convention.
    """
    net_shape = np.asarray(flow.shape[1:4], np.float64)
    shape = tuple(int(n) for n in shape)
    moving_shape = shape if moving_shape is None else tuple(int(n) for n in moving_shape)
    fixed_scale = (np.asarray(shape) - 1.0) / np.maximum(net_shape - 1.0, 1.0)
    moving_scale = (np.asarray(moving_shape) - 1.0) / np.maximum(net_shape - 1.0, 1.0)
    flow_up = resize(flow, shape, order=1)
    xp = _xp(flow)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape],
                                indexing="ij"), axis=-1)[None]
    # Network-grid position of each fixed voxel, then where it lands in the moving original.
    net_pos = grid / fixed_scale.astype(np.float32)
    moving_pos = (net_pos + flow_up) * moving_scale.astype(np.float32)
    return xp.asarray(moving_pos - grid, dtype=flow.dtype)
