"""Trilinear and nearest sampling of a flattened volume at points: the kernels behind
``promptreg_jax.spatial`` (``sample``, ``warp``, ``integrate``), with custom VJPs, in forms chosen
per platform.

Forms of trilinear sampling (``resolve_sampler``; the same numbers, tested):

* ``scatter`` (CPU): the 8 corners gathered one by one; the image gradient a scatter-add.
* ``cells`` (TPU/GPU): one gather of each point's 8-corner cell; the gradient for the points is
  the analytic derivative of the weights; the image gradient one scatter of 8-corner rows and 8
  fixed shifts, none when the image is not differentiated.
* ``mixed``: ``cells`` for volumes of at most 4 channels, ``scatter`` for feature maps.
* ``gather`` (opt-in, approximate image gradient ``g(y - u(y))``).

``auto`` resolves to ``scatter`` on a CPU target and ``cells`` on accelerators (the platform of
``conv.target_platform`` when set, else the default backend); ``$PROMPTREG_SAMPLER`` or
``use_sampler(...)`` override it. ``spatial`` states the conventions (pull, zeros outside).
"""

from __future__ import annotations

import functools
import os

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from promptreg_jax.sharding import active_space_size


# Every index this module gathers or scatters at is in range by construction (clipped corners,
# cells on the padded cell grid). So on the CPU and TPU gathers use ``mode="clip"``, which lowers
# to a bare XLA gather (XLA clamps natively), and scatters skip negative-index wrapping:
# ``jnp.take``'s default ("fill") wraps negative indices and masks out-of-range rows with a select
# over the gathered values, three times the HLO per gather (8 -> 26 instructions). Same numbers.
# Measured: the optimised HLO of the 64^3 CPU training step (c = 16, remat) fell from 152,534 to
# 120,088 instructions with this and to 90,010 with ``_corners``' batched corners (the loaded
# executable holds about 4 KB of host memory per instruction: README, "Speed and memory"); TPU
# v5e, 160^3 float32, ``--remat none --fold-levels 2``: buffer assignment 15.02 -> 14.63 GiB
# (``levels``: 14.21 both ways). GPUs keep jnp's defaults: with the bare forms a T4 description's
# 160^3 step needed 11.33 / 7.96 GiB (``none`` / ``levels``) against 11.25 / 7.78.
_IN_RANGE_PLATFORMS = ("cpu", "tpu")


def _in_range_forms() -> bool:
    from promptreg_jax.conv import current_platform
    return current_platform() in _IN_RANGE_PLATFORMS


def _take(table, flat, axis: int = 0):
    """``jnp.take(table, flat, axis)`` for indices known to be in range."""
    return jnp.take(table, flat, axis=axis, mode="clip" if _in_range_forms() else None)


def _scatter_add(base, index, values):
    """``base.at[index].add(values)`` for non-negative indices known to be in range."""
    return base.at[index].add(values, wrap_negative_indices=not _in_range_forms())


def identity_grid(shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Voxel coordinates of a grid, ``(*shape, ndim)``; the identity map."""
    axes = [jnp.arange(n, dtype=dtype) for n in shape]
    return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


# Corner k of a trilinear cell has offsets (k >> 2 & 1, k >> 1 & 1, k & 1), shape (8, 1, 3).
_CORNER_BITS = np.array([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(8)], np.int32)[:, None]


def _corners(coords_Px3, shape):
    """The 8 trilinear corners of each point: ``(flat index, weight, d weight / d coords)``,
    corner by corner.

    Out-of-volume corners get weight 0 (and a clipped, valid index). The indices and weights of
    all 8 corners are computed at once (arrays of 8 rows): one set of operations instead of one
    per corner (the 64^3 remat step: 120,088 -> 90,010 HLO instructions), the same numbers bit
    for bit (multiplying by a sign of +-1 is exact).
    """
    lo = jnp.floor(coords_Px3)
    frac = coords_Px3 - lo
    lo = lo.astype(jnp.int32)
    sizes = jnp.asarray(shape, jnp.int32)
    strides = jnp.asarray([shape[1] * shape[2], shape[2], 1], jnp.int32)
    idx = lo[None] + _CORNER_BITS                                            # (8, P, 3)
    valid = jnp.all((idx >= 0) & (idx < sizes), axis=-1).astype(coords_Px3.dtype)
    flat = jnp.sum(jnp.clip(idx, 0, sizes - 1) * strides, axis=-1)          # (8, P)
    f = jnp.where(_CORNER_BITS == 1, frac[None], 1.0 - frac[None])           # (8, P, 3)
    f0, f1, f2 = f[..., 0], f[..., 1], f[..., 2]
    weight = f0 * f1 * f2 * valid
    sign = (2 * _CORNER_BITS - 1).astype(coords_Px3.dtype)
    dweight = sign * jnp.stack([f1 * f2, f0 * f2, f0 * f1], axis=-1) * valid[..., None]
    for corner in range(8):
        yield flat[corner], weight[corner], dweight[corner]


def _linear_forward(volume_NxC, coords_Px3, shape):
    out = 0.0
    for flat, weight, _ in _corners(coords_Px3, shape):
        out = out + weight[:, None] * _take(volume_NxC, flat, axis=0)
    return out.astype(volume_NxC.dtype)


def _linear_backward(volume_NxC, coords_Px3, shape, g):
    """(d volume, d coords): the 8 corners re-gathered, scatter-added; no batched ops."""
    d_volume = jnp.zeros(volume_NxC.shape, g.dtype)
    d_coords = jnp.zeros(coords_Px3.shape, jnp.float32)
    for flat, weight, dweight in _corners(coords_Px3, shape):
        rows = _take(volume_NxC, flat, axis=0)
        d_coords = d_coords + dweight * jnp.sum(rows * g, axis=-1, keepdims=True)
        d_volume = _scatter_add(d_volume, flat, (weight[:, None] * g).astype(d_volume.dtype))
    return d_volume.astype(volume_NxC.dtype), d_coords


def _cells(coords_Px3, shape):
    """Each point's base cell on the ``(X+1, Y+1, Z+1)`` grid of cells ``-1..n-1`` per axis (flat
    index), its 8 corner weights ``(P, 8)`` and their derivatives ``(P, 8, 3)``; points with no
    corner inside get weight 0. Corner ``k`` has offsets ``(k >> 2 & 1, k >> 1 & 1, k & 1)``.
    """
    X, Y, Z = shape
    lo = jnp.floor(coords_Px3)
    frac = coords_Px3 - lo
    lo = lo.astype(jnp.int32)
    inside = jnp.all((lo >= -1) & (lo <= jnp.asarray(shape, jnp.int32) - 1), axis=-1)
    cell = jnp.clip(lo + 1, 0, jnp.asarray(shape, jnp.int32))
    flat = (cell[:, 0] * (Y + 1) + cell[:, 1]) * (Z + 1) + cell[:, 2]
    weights, dweights = [], []
    for corner in range(8):
        bits = [(corner >> 2) & 1, (corner >> 1) & 1, corner & 1]
        f = [frac[:, d] if bits[d] else 1.0 - frac[:, d] for d in range(3)]
        sign = [1.0 if b else -1.0 for b in bits]
        weights.append(f[0] * f[1] * f[2])
        dweights.append(jnp.stack([sign[0] * f[1] * f[2], sign[1] * f[0] * f[2],
                                   sign[2] * f[0] * f[1]], axis=-1))
    mask = inside.astype(coords_Px3.dtype)
    return (flat, jnp.stack(weights, axis=-1) * mask[:, None],
            jnp.stack(dweights, axis=1) * mask[:, None, None])


def _cell_table(volume_NxC, shape, reverse: bool = False):
    """``(cells, 8 C)``: each cell's 8 corner values side by side (zero outside the volume), so
    one gather per point fetches all 8. On TPU this costs no memory over the volume itself (the
    minor dimension is padded to 128 lanes either way) and makes 8x fewer gathered indices."""
    X, Y, Z = shape
    C = volume_NxC.shape[-1]
    vp = jnp.pad(volume_NxC.reshape(X, Y, Z, C), ((1, 1), (1, 1), (1, 1), (0, 0)))
    slabs = []
    for corner in (range(7, -1, -1) if reverse else range(8)):
        bx, by, bz = (corner >> 2) & 1, (corner >> 1) & 1, corner & 1
        slabs.append(vp[bx:bx + X + 1, by:by + Y + 1, bz:bz + Z + 1])
    return jnp.concatenate(slabs, axis=-1).reshape(-1, 8 * C)


# Volumes of at most this many channels use channel-first cell tables ``(8 C, cells)`` and gather
# / scatter along the voxel axis: on TPU a minor dimension of 8 C <= 32 would be padded to 128
# lanes (a 4-16x larger transient); wider volumes (features) use ``(cells, 8 C)`` rows.
_NARROW = 4


def _corner_values(volume_NxC, flat, shape, table=None):
    """The 8 corner values of each point's cell, ``(P, 8, C)``, by one gather (from ``table``,
    the volume's ``_cell_table``, where given)."""
    C = volume_NxC.shape[-1]
    if table is not None:
        return _take(table, flat, axis=0).reshape(-1, 8, C)
    if C <= _NARROW:
        table = _cell_table_cf(volume_NxC.T, shape)                       # (8 C, cells)
        return jnp.moveaxis(_take(table, flat, axis=1).reshape(8, C, -1), -1, 0)
    return _take(_cell_table(volume_NxC, shape), flat, axis=0).reshape(-1, 8, C)


def _linear_forward_cells(volume_NxC, coords_Px3, shape, table=None):
    """Trilinear samples with one gather of 8-corner values per point (the cell table)."""
    flat, w, _ = _cells(coords_Px3, shape)
    rows = _corner_values(volume_NxC, flat, shape, table)
    out = jnp.einsum("pk,pkc->pc", w, rows.astype(w.dtype))
    return out.astype(volume_NxC.dtype)


def _coords_grad_cells(volume_NxC, coords_Px3, shape, g):
    """d coords: the derivative of the 8 weights times the corner values, one gather."""
    flat, _, dw = _cells(coords_Px3, shape)
    rows = _corner_values(volume_NxC, flat, shape)
    gv = jnp.einsum("pkc,pc->pk", rows.astype(jnp.float32), g.astype(jnp.float32))
    return jnp.einsum("pk,pkd->pd", gv, dw)


def _volume_grad_cells(coords_Px3, shape, g):
    """d volume with ONE scatter-add: each point adds its 8 weighted cotangents, side by side
    (8 C values), to its base cell; each corner's slab is then shifted onto the grid and
    summed. The same sums as 8 corner scatters (exact up to float summation order), with 8x
    fewer scattered indices: what accelerators pay for (TPU sorts the indices of a scatter).
    """
    X, Y, Z = shape
    C = g.shape[-1]
    n_cells = (X + 1) * (Y + 1) * (Z + 1)
    flat, w, _ = _cells(coords_Px3, shape)
    if C <= _NARROW:  # channel-first: (8 C, cells), scattered along the voxel axis
        cols = (w.T[:, None, :] * g.T[None, :, :]).reshape(8 * C, -1)
        cells = _scatter_add(jnp.zeros((8 * C, n_cells), g.dtype), (slice(None), flat),
                             cols.astype(g.dtype))
        cells = cells.reshape(2, 2, 2, C, X + 1, Y + 1, Z + 1)
        out = _shift_sum(cells, lambda bx, by, bz, ys, zs: (bx, by, bz, slice(None), slice(None),
                                                             ys, zs), shape, axis=1)
        return out.reshape(C, -1).T
    rows = (w[:, :, None] * g[:, None, :]).reshape(-1, 8 * C)
    cells = _scatter_add(jnp.zeros((n_cells, 8 * C), g.dtype), flat, rows.astype(g.dtype))
    return _rows_to_grid(cells, shape, C)


def _rows_to_grid(cells, shape, C):
    """The ``(N, C)`` volume gradient from a ``(cells, 8 C)`` table of scattered corner rows."""
    X, Y, Z = shape
    cells = cells.reshape(X + 1, Y + 1, Z + 1, 2, 2, 2, C)
    out = _shift_sum(cells, lambda bx, by, bz, ys, zs: (slice(None), ys, zs, bx, by, bz),
                     shape, axis=0)
    return out.reshape(-1, C)


def _shift_sum(cells, key, shape, axis: int):
    """The grid sum of the 8 corner slabs of a cell-gradient table: ``cells[key(bx, by, bz, ys,
    zs)]`` is corner ``(bx, by, bz)``'s slab cut to ``ys``, ``zs`` on the Y and Z cell axes, with
    the X cell axis at ``axis``. Corner b of cell index i (cell i - 1) lands on grid voxel
    i - 1 + b, so cell index i + 1 - b feeds voxel i. Static slices, no scatter: first the Y and
    Z shifts (local when X is sharded), then the two X shifts of the partial sums (v5e 160^3, 4
    chips on space: 15.62 -> 14.64 GiB against 8 shifted slabs)."""
    X, Y, Z = shape
    part = [sum(cells[key(bx, by, bz, slice(1 - by, 1 - by + Y), slice(1 - bz, 1 - bz + Z))]
                for by in range(2) for bz in range(2)) for bx in range(2)]
    lead = (slice(None),) * axis
    return part[0][lead + (slice(1, X + 1),)] + part[1][lead + (slice(0, X),)]


# On-grid warps of wide volumes (features) with the ``cells`` form run in slabs of the Y axis
# on a single TPU chip when their 8-corner rows (points x 8 x C values) exceed the platform's
# figure here: a loop over slabs keeps one slab's rows alive instead of the whole volume's (1.95
# GiB for a 16-channel 160^3 float32 warp, which XLA otherwise keeps from the recomputed forward
# pass to the backward). Measured with benchmarks/aot.py: v5e, 160^3 float32, remat=levels
# 15.16 -> 14.21 GiB (the full compile fits: 12.89); a T4 description, 160^3 float32 11.25 ->
# 11.38 GiB, so GPUs, whose arrays are not tiled to 128 lanes, keep the single pass; v5e:2x2
# with space=4, 256^3 float32 levels 87.70 -> 94.74 GiB, so a space-sharded step keeps it too
# (each chip's warp reads the whole volume's table there).
_SLAB_BYTES = {"tpu": 1024 * 2**20}


def _y_slabs(shape, channels: int, itemsize: int = 4) -> int:
    """How many Y slabs an on-grid ``cells`` pass over a ``channels``-channel volume uses."""
    from promptreg_jax.conv import current_platform
    limit = _SLAB_BYTES.get(current_platform())
    X, Y, Z = shape
    rows = X * Y * Z * 8 * channels * itemsize
    if limit is None or channels <= _NARROW or rows <= limit or active_space_size() > 1:
        return 1
    return next((k for k in range(2, Y + 1) if Y % k == 0 and rows <= limit * k), Y)


def _slab(x_PxC, shape, j, yc):
    """Y slab ``j`` (``yc`` planes) of per-point values on the grid, ``(X yc Z, C)``."""
    X, Y, Z = shape
    x = x_PxC.reshape(X, Y, Z, -1)
    return jax.lax.dynamic_slice_in_dim(x, j * yc, yc, axis=1).reshape(-1, x.shape[-1])


def _slab_coords(disp_Px3, shape, j, yc):
    """Absolute coordinates of Y slab ``j`` of an on-grid displacement."""
    X, _, Z = shape
    d = _slab(disp_Px3, shape, j, yc)
    zero = jnp.zeros((), d.dtype)
    offset = jnp.stack([zero, (j * yc).astype(d.dtype), zero])
    return identity_grid((X, yc, Z), d.dtype).reshape(-1, 3) + offset + d


def _over_y_slabs(fn, disp_Px3, shape, k, out_channels, dtype):
    """``fn(j, slab coordinates) -> (slab points, out_channels)`` for the ``k`` Y slabs ``j``,
    one at a time (a loop), assembled into ``(P, out_channels)``."""
    X, Y, Z = shape
    yc = Y // k

    def body(j, out):
        val = fn(j, _slab_coords(disp_Px3, shape, j, yc)).astype(dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, val.reshape(X, yc, Z, out_channels),
                                                   j * yc, axis=1)

    out = jax.lax.fori_loop(0, k, body, jnp.zeros((X, Y, Z, out_channels), dtype))
    return out.reshape(-1, out_channels)


def _forward_cells_slabs(volume_NxC, disp_Px3, shape, k):
    """:func:`_linear_forward_cells` of an on-grid warp, Y slab by Y slab."""
    table = _cell_table(volume_NxC, shape)
    fn = lambda j, coords: _linear_forward_cells(volume_NxC, coords, shape, table)
    return _over_y_slabs(fn, disp_Px3, shape, k, volume_NxC.shape[-1], volume_NxC.dtype)


def _coords_grad_cells_slabs(volume_NxC, disp_Px3, shape, k, g):
    """:func:`_coords_grad_cells` of an on-grid warp, Y slab by Y slab. Its cell table lists
    the corners in reverse order: a table of its own, built here, where the forward's would be
    shared by XLA and kept alive from the (recomputed) forward pass to this point. The body
    spells out :func:`_coords_grad_cells` instead of calling it: so written, the loop takes the
    table before the cotangent, and that operand order alone moved the v5e buffer assignment of
    the 160^3 step by 0.22 GiB (14.21 here, 14.43 the other way)."""
    table = _cell_table(volume_NxC, shape, reverse=True)
    C = volume_NxC.shape[-1]
    yc = shape[1] // k

    def fn(j, coords):
        flat, _, dw = _cells(coords, shape)
        dw = dw[:, ::-1]
        rows = _take(table, flat, axis=0).reshape(-1, 8, C)
        gv = jnp.einsum("pkc,pc->pk", rows.astype(jnp.float32),
                        _slab(g, shape, j, yc).astype(jnp.float32))
        return jnp.einsum("pk,pkd->pd", gv, dw)

    return _over_y_slabs(fn, disp_Px3, shape, k, 3, jnp.float32)


def _volume_grad_cells_slabs(disp_Px3, shape, k, g):
    """:func:`_volume_grad_cells` (rows form) of an on-grid warp: the slabs' 8-corner rows
    scatter-added into one cell table, one slab at a time."""
    X, Y, Z = shape
    C = g.shape[-1]
    yc = Y // k

    def body(j, cells):
        flat, w, _ = _cells(_slab_coords(disp_Px3, shape, j, yc), shape)
        rows = (w[:, :, None] * _slab(g, shape, j, yc)[:, None, :]).reshape(-1, 8 * C)
        return _scatter_add(cells, flat, rows.astype(g.dtype))

    cells = jax.lax.fori_loop(0, k, body, jnp.zeros(((X + 1) * (Y + 1) * (Z + 1), 8 * C), g.dtype))
    return _rows_to_grid(cells, shape, C)


def _volume_grad_adjoint_gather(displacement_Px3, shape, g):
    """Approximate d volume of an on-grid warp by gathers only: ``g`` pulled back through the
    inverse displacement, ``d volume(y) ~ g(y - u(y))`` (trilinear, zero outside).

    Exact for a constant displacement (the trilinear kernel is symmetric); for a varying one the
    error grows with the displacement's spatial derivatives (it ignores the volume change of
    ``x -> x + u(x)``). Opt-in only (``sampler="gather"``): measured, not the default.
    """
    coords = _grid_coords(-displacement_Px3, shape)
    return _linear_forward_cells(g, coords, shape)


# The sampler's backward form, chosen per target platform (like the conv form):
#   "scatter": the 8 corners scatter-added one by one (fastest on XLA:CPU);
#   "cells":   one scatter of 8-corner rows onto base cells + 8 static shifts (exact, 8x fewer
#              scattered indices: accelerators);
#   "gather":  on-grid warps get the approximate gather-only volume gradient above; off-grid
#              samples use "cells". Never chosen by "auto".
#   "mixed":   "cells" for volumes of at most 4 channels (fields, images), "scatter" for wider
#              ones (features: the cell table and its scatter are one more feature-sized buffer).
SAMPLERS = ("auto", "scatter", "cells", "gather", "mixed")
_SAMPLER_OVERRIDE: list[str] = []


def resolve_sampler(sampler: str = "auto", platform: str | None = None) -> str:
    """``"auto"`` -> ``"scatter"`` for the CPU, ``"cells"`` for TPU/GPU; the platform is the
    one being traced for (``conv.current_platform``), so compile-only runs get the target's.

    ``"auto"`` can be redirected by :class:`use_sampler` or, for a whole run (the trainer), by
    ``$PROMPTREG_SAMPLER`` (e.g. ``mixed``: 1.3 GiB less than ``cells`` at the 160^3 bfloat16
    remat step on TPU v5e, measured with ``benchmarks/aot.py``).
    """
    from promptreg_jax.conv import current_platform
    if sampler == "auto" and _SAMPLER_OVERRIDE:
        sampler = _SAMPLER_OVERRIDE[-1]
    if sampler == "auto" and os.environ.get("PROMPTREG_SAMPLER"):
        sampler = os.environ["PROMPTREG_SAMPLER"]
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "auto":
        return "scatter" if current_platform(platform) == "cpu" else "cells"
    return sampler


class use_sampler:
    """``with use_sampler("cells"): ...``: what ``"auto"`` resolves to while tracing inside
    (benchmarks and tests; the model always asks for ``"auto"``)."""

    def __init__(self, sampler: str):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler = sampler

    def __enter__(self):
        _SAMPLER_OVERRIDE.append(self.sampler)
        return self

    def __exit__(self, *exc):
        _SAMPLER_OVERRIDE.pop()


def _form_for(form: str, channels: int) -> str:
    """A resolved sampler form for a volume of ``channels`` channels."""
    if form == "mixed":
        return "cells" if channels <= _MIXED_MAX_CHANNELS else "scatter"
    return form


_MIXED_MAX_CHANNELS = 4


def _grid_coords(flow_Px3, shape):
    return identity_grid(shape, flow_Px3.dtype).reshape(-1, 3) + flow_Px3


# Trilinear sampling has a custom VJP: the backward pass re-gathers the 8 corners instead of
# keeping them (8 P C floats per call) and uses no batched gather/scatter (slow on XLA:CPU).
# With ``on_grid`` the points are ``grid + points`` (a displacement on the volume's own grid), so
# only (volume, displacement) are kept: a squaring step ``u + warp(u, u)`` keeps one field.
# ``form`` is a resolved sampler (``resolve_sampler``): how the volume's gradient is formed.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _sample_linear(volume_NxC, points_Px3, shape, on_grid=False, form="scatter"):
    """Trilinear samples of a flattened ``(N, C)`` volume at ``(P, 3)`` voxel coordinates
    (``on_grid``: at the grid plus these displacements)."""
    if form == "scatter":
        coords = _grid_coords(points_Px3, shape) if on_grid else points_Px3
        return _linear_forward(volume_NxC, coords, shape)
    k = _y_slabs(shape, volume_NxC.shape[-1], volume_NxC.dtype.itemsize) if on_grid else 1
    if k > 1:
        return _forward_cells_slabs(volume_NxC, points_Px3, shape, k)
    coords = _grid_coords(points_Px3, shape) if on_grid else points_Px3
    return _linear_forward_cells(volume_NxC, coords, shape)


def _sample_linear_fwd(volume_NxC, points_Px3, shape, on_grid, form):
    return (_sample_linear(volume_NxC, points_Px3, shape, on_grid, form),
            (volume_NxC, points_Px3))


def _sample_linear_bwd(shape, on_grid, form, res, g):
    volume_NxC, points_Px3 = res
    coords = _grid_coords(points_Px3, shape) if on_grid else points_Px3
    if form == "scatter":
        d_volume, d_coords = _linear_backward(volume_NxC, coords, shape, g)
    else:
        # d coords by gathers; d volume by one scatter (or, on-grid "gather", none). When the
        # volume is not differentiated (an input image) XLA drops this part entirely. Wide
        # on-grid warps go Y slab by Y slab (_y_slabs).
        k = _y_slabs(shape, volume_NxC.shape[-1], volume_NxC.dtype.itemsize) if on_grid else 1
        if k > 1:
            d_coords = _coords_grad_cells_slabs(volume_NxC, points_Px3, shape, k, g)
        else:
            d_coords = _coords_grad_cells(volume_NxC, coords, shape, g)
        if form == "gather" and on_grid:
            d_volume = _volume_grad_adjoint_gather(points_Px3, shape, g)
        elif k > 1:
            d_volume = _volume_grad_cells_slabs(points_Px3, shape, k, g)
        else:
            d_volume = _volume_grad_cells(coords, shape, g)
        d_volume = d_volume.astype(volume_NxC.dtype)
    return d_volume, d_coords.astype(points_Px3.dtype)


_sample_linear.defvjp(_sample_linear_fwd, _sample_linear_bwd)


def _cell_table_cf(u_CxN, shape):
    """:func:`_cell_table` from a channel-first ``(C, N)`` volume."""
    X, Y, Z = shape
    C = u_CxN.shape[0]
    vp = jnp.pad(u_CxN.reshape(C, X, Y, Z), ((0, 0), (1, 1), (1, 1), (1, 1)))
    slabs = [vp[:, bx:bx + X + 1, by:by + Y + 1, bz:bz + Z + 1]
             for bx, by, bz in ((k >> 2 & 1, k >> 1 & 1, k & 1) for k in range(8))]
    return jnp.stack(slabs, 0).reshape(8 * C, -1)   # (8 C, cells), corner-major


def _self_warp_rows(u_3xN, shape, layout):
    """The 8 corner values of every point of ``u(x + u(x))``: ``(P, 8, 3)`` float32, plus the
    cells' weights and their derivatives."""
    coords = _grid_coords(u_3xN.T, shape)
    flat, w, dw = _cells(coords, shape)
    table = _cell_table_cf(u_3xN, shape)
    if layout == "rows":
        rows = _take(table.T, flat, axis=0).reshape(-1, 8, 3)
    else:  # "columns": gather along the minor (voxel) axis of the channel-first table
        rows = _take(table, flat, axis=1).T.reshape(-1, 8, 3)
    return coords, rows, w, dw


# How a squaring step gathers its corner rows: "columns" (along the voxel axis of the
# channel-first table) or "rows" (rows of the transposed table). Measured for TPU v5e, one
# integrate() forward + backward at 64^3: 3.41 GiB accessed ("columns") vs 4.86 GiB ("rows").
_SELF_WARP_LAYOUT = ["columns"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _self_warp_cf(u_3xN, shape, form):
    """``u(x + u(x))`` of a channel-first field ``(3, N)`` on its own grid (a squaring step):
    one residual, the field itself, kept compact (3 x N, no 128-lane padding of a minor 3)."""
    _, rows, w, _ = _self_warp_rows(u_3xN, shape, _SELF_WARP_LAYOUT[0])
    return jnp.einsum("pk,pkc->cp", w, rows)


def _self_warp_cf_fwd(u_3xN, shape, form):
    return _self_warp_cf(u_3xN, shape, form), u_3xN


def _self_warp_cf_bwd(shape, form, u_3xN, g_3xP):
    coords, rows, _, dw = _self_warp_rows(u_3xN, shape, _SELF_WARP_LAYOUT[0])
    g = g_3xP.T
    d_points = jnp.einsum("pk,pkd->pd", jnp.einsum("pkc,pc->pk", rows, g), dw)
    if form == "gather":
        d_volume = _volume_grad_adjoint_gather(u_3xN.T, shape, g)
    else:
        d_volume = _volume_grad_cells(coords, shape, g)
    return ((d_volume + d_points).T.astype(u_3xN.dtype),)


_self_warp_cf.defvjp(_self_warp_cf_fwd, _self_warp_cf_bwd)


def _sample_nearest(volume_NxC, coords_Px3, shape):
    """Nearest-voxel samples (round half up, as SciPy's order 0), zero outside."""
    idx = jnp.floor(coords_Px3 + 0.5).astype(jnp.int32)
    sizes = jnp.asarray(shape, jnp.int32)
    valid = jnp.all((idx >= 0) & (idx < sizes), axis=-1)
    strides = jnp.asarray([shape[1] * shape[2], shape[2], 1], jnp.int32)
    flat = jnp.sum(jnp.clip(idx, 0, sizes - 1) * strides, axis=-1)
    vals = _take(volume_NxC, flat, axis=0)
    return jnp.where(valid[:, None], vals, jnp.zeros((), vals.dtype))
