"""The Z-folded layout of full-resolution feature maps: lane-dense on TPU.

A TPU keeps a convolution's feature map with its channels as the minor-most dimension and pads
that dimension to 128 lanes, so a 160^3 map of 16 channels costs 8x its size (2.05 GiB in
float32 instead of 0.26), one of 48 channels 2.7x. Folding ``fold`` consecutive Z planes into the
channels,

    (B, X, Y, Z, C)  ->  (B, X, Y, Z / fold, fold * C),   xf[..., j, i * C + c] = x[..., fold * j + i, c]

(a plain reshape), gives 128 (C = 16) or 384 (C = 48) channels for ``fold = 8``: no lanes wasted.
A stride-1 3D convolution of the unfolded map is then a convolution of the folded one whose
Z-tap couples the ``fold`` sub-planes by a banded block matrix (:func:`conv3d_folded`), plus two
thin convolutions for the sub-planes that reach into the neighbouring block; instance norm pools
its statistics over the sub-planes (:func:`instance_norm_folded`). The numbers are those of the
unfolded layers (tested); the MXU does about 2.7x the multiply-adds of the unfolded conv for a
3x3x3 kernel, on a program that is memory-bound there.

A folded tensor may hold several maps side by side on its last axis (the decoder's concatenation
of fixed features, warped moving features and upsampled features): each *group* is folded on its
own, ``concat([fold(a), fold(b)], -1)``, and ``groups`` gives their unfolded channel counts.

The transposed conv that brings the 1/2 level's features up (:func:`conv_transpose3d_folded`)
writes its output folded directly, so the full-resolution level has no unfolded 16-channel map
in its forward or backward pass.

``promptreg_jax.model.PromptReg(fold=8)`` runs its full-resolution layers this way
(``model.fold``; ``"auto"`` folds on TPU only, where it pays; XLA:CPU's own conv forms are faster
unfolded), and with ``fold_levels=2`` its 1/2-resolution layers by ``fold / 2``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ("NDHWC", "DHWIO", "NDHWC")


def fold(x, k: int):
    """``(B, X, Y, Z, C) -> (B, X, Y, Z / k, k * C)``; ``k`` must divide Z."""
    B, X, Y, Z, C = x.shape
    if Z % k:
        raise ValueError(f"fold {k} does not divide the Z size {Z} of {x.shape}")
    return x.reshape(B, X, Y, Z // k, k * C)


def unfold(xf, k: int, groups: Sequence[int] | None = None):
    """Inverse of :func:`fold`; with ``groups`` the unfolded maps concatenated on channels."""
    B, X, Y, Zf, L = xf.shape
    groups = _groups(groups, L, k)
    parts, start = [], 0
    for c in groups:
        parts.append(xf[..., start:start + k * c].reshape(B, X, Y, Zf * k, c))
        start += k * c
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)


def _groups(groups, lanes: int, k: int) -> tuple[int, ...]:
    if groups is None:
        if lanes % k:
            raise ValueError(f"{lanes} folded channels are not a multiple of the fold {k}")
        return (lanes // k,)
    groups = tuple(int(g) for g in groups)
    if k * sum(groups) != lanes:
        raise ValueError(f"groups {groups} x fold {k} != {lanes} folded channels")
    return groups


def _tap_matrix(k: int, K: int, shift: int, rows: range, cols: range) -> np.ndarray:
    """0/1 ``S[i, o, d]``: input sub-plane ``rows[i]`` of the block ``shift`` blocks away feeds
    output sub-plane ``cols[o]`` through the kernel's Z-tap ``d``."""
    p = K // 2
    S = np.zeros((len(rows), len(cols), K), np.float32)
    for a, i in enumerate(rows):
        for b, o in enumerate(cols):
            d = k * shift + i - o + p
            if 0 <= d < K:
                S[a, b, d] = 1.0
    return S


def _folded_kernel(kernel, k, groups, shift, rows, cols):
    """The (Kx, Ky, 1, len(rows) * Cin, len(cols) * Cout) kernel of one Z-block shift."""
    Kx, Ky, K, _, Cout = kernel.shape
    S = jnp.asarray(_tap_matrix(k, K, shift, rows, cols), kernel.dtype)
    parts, start = [], 0
    for c in groups:
        w = kernel[:, :, :, start:start + c]
        start += c
        wf = jnp.einsum("abdxy,iod->abixoy", w, S)   # (Kx, Ky, i, Cin_g, o, Cout)
        parts.append(wf.reshape(Kx, Ky, 1, len(rows) * c, len(cols) * Cout))
    return jnp.concatenate(parts, axis=3)


def _sub_planes(xf, k, groups, rows):
    """The channels of sub-planes ``rows`` of every group, grouped as :func:`_folded_kernel`."""
    parts, start = [], 0
    for c in groups:
        parts.append(xf[..., start + rows.start * c:start + rows.stop * c])
        start += k * c
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)


def conv3d_folded(xf, kernel, k: int, groups: Sequence[int] | None = None):
    """The stride-1, zero-padded (``K // 2``) 3D convolution of the unfolded input, on the folded.

    ``xf (B, X, Y, Z/k, k * sum(groups))`` is :func:`fold` of ``x (B, X, Y, Z, Cin)`` (per group);
    ``kernel (K, K, K, Cin, Cout)`` with K odd and ``K // 2 < k``. Returns the folded output
    ``(B, X, Y, Z/k, k * Cout)``: ``fold(conv3d(x, kernel), k)``. One conv couples the sub-planes
    of each block (a banded ``k Cin x k Cout`` matrix per in-plane tap); two thin convs add what
    the first ``K // 2`` sub-planes take from the block before and the last take from the next.
    """
    Kx, Ky, K, Cin, Cout = kernel.shape
    if K % 2 == 0 or K // 2 >= k or Kx % 2 == 0 or Ky % 2 == 0:
        raise ValueError(f"conv3d_folded needs odd kernel sizes with K // 2 < fold {k}, "
                         f"got {kernel.shape[:3]}")
    groups = _groups(groups, xf.shape[-1], k)
    if sum(groups) != Cin:
        raise ValueError(f"kernel has {Cin} input channels, groups {groups} hold {sum(groups)}")
    p, px, py = K // 2, Kx // 2, Ky // 2
    kernel = kernel.astype(xf.dtype)
    pad = ((px, px), (py, py), (0, 0))
    y = lax.conv_general_dilated(xf, _folded_kernel(kernel, k, groups, 0, range(k), range(k)),
                                 (1, 1, 1), pad, dimension_numbers=_DN)
    if p == 0:
        return y
    # The last p sub-planes of the block before feed the first p outputs, the first p of the
    # block after the last p outputs (zero past the volume: the conv's zero padding).
    prev = _sub_planes(xf, k, groups, range(k - p, k))
    nxt = _sub_planes(xf, k, groups, range(0, p))
    prev = jnp.pad(prev, ((0, 0),) * 3 + ((1, 0), (0, 0)))[:, :, :, :-1]
    nxt = jnp.pad(nxt, ((0, 0),) * 3 + ((0, 1), (0, 0)))[:, :, :, 1:]
    head = lax.conv_general_dilated(
        prev, _folded_kernel(kernel, k, groups, -1, range(k - p, k), range(0, p)),
        (1, 1, 1), pad, dimension_numbers=_DN)
    tail = lax.conv_general_dilated(
        nxt, _folded_kernel(kernel, k, groups, 1, range(0, p), range(k - p, k)),
        (1, 1, 1), pad, dimension_numbers=_DN)
    middle = jnp.zeros(y.shape[:-1] + ((k - 2 * p) * Cout,), y.dtype)
    return y + jnp.concatenate([head, middle, tail], -1)


# ``ConvTranspose3d(k=4, stride=2, padding=1)`` per axis: output 2m + a takes input m + a - 1 + t
# through kernel tap _UP_TAPS[a][t] (t = 0, 1); the taps are PyTorch's, as conv.conv_transpose3d.
_UP_TAPS = ((3, 1), (2, 0))


def _up_selection(planes: int, k: int) -> np.ndarray:
    """0/1 ``S[e, n, tap]``: input plane ``e - 1`` of a block of ``planes`` (e = 0 and
    ``planes + 1``: the planes just before and after it) feeds output sub-plane ``n`` of a
    block of ``k = 2 * planes`` through kernel tap ``tap``."""
    S = np.zeros((planes + 2, k, 4), np.float32)
    for m in range(planes):
        for a in range(2):
            for t in range(2):
                S[m + a + t, 2 * m + a, _UP_TAPS[a][t]] = 1.0
    return S


def conv_transpose3d_folded(x, kernel, k: int):
    """``fold(conv.conv_transpose3d(x, kernel), k)`` computed straight into the folded layout.

    ``x (B, X, Y, Z, I)`` (unfolded, half resolution), ``kernel (4, 4, 4, O, I)`` as
    :func:`promptreg_jax.conv.conv_transpose3d`; returns ``(B, 2X, 2Y, 2Z/k, k O)``. The input is
    folded by ``k / 2`` (its block of ``k / 2`` planes makes one output block of ``k``) and
    widened by the plane before and after each block; one stride-1 conv with a 3x3 in-plane
    kernel gives all four in-plane output parities of a block side by side, which are then
    interleaved on the two major axes. No array has the O output channels minor-most (a TPU
    pads a 16-channel map laid out so 8x). It costs multiply-adds: the 3x3 in-plane kernel is
    2.25x the 2x2 each parity needs and the banded plane coupling 3x, so 6.75x those of the
    transposed conv itself (at 160^3, c = 16: 113 instead of 16.8 GMAC forward, once per step).
    """
    if k % 2 or k < 2:
        raise ValueError(f"conv_transpose3d_folded needs an even fold, got {k}")
    B, X, Y, Z, I = x.shape
    h = k // 2
    O = kernel.shape[3]
    if kernel.shape != (4, 4, 4, O, I):
        raise ValueError(f"kernel {kernel.shape} must be (4, 4, 4, O, {I})")
    xh = fold(x, h)                                              # (B, X, Y, Z/h, h I)
    prev = jnp.pad(xh[..., (h - 1) * I:], ((0, 0),) * 3 + ((1, 0), (0, 0)))[:, :, :, :-1]
    nxt = jnp.pad(xh[..., :I], ((0, 0),) * 3 + ((0, 1), (0, 0)))[:, :, :, 1:]
    ext = jnp.concatenate([prev, xh, nxt], -1)                   # (B, X, Y, Z/h, (h+2) I)
    w = jnp.swapaxes(kernel, 3, 4).astype(x.dtype)               # (4, 4, 4, I, O)
    sxy = jnp.asarray(_up_selection(1, 2), x.dtype)              # (3 offsets, 2 parities, tap)
    sz = jnp.asarray(_up_selection(h, k), x.dtype)               # (h + 2, k, tap)
    wf = jnp.einsum("xyzio,uax,vby,enz->uveiabno", w, sxy, sxy, sz)
    wf = wf.reshape(3, 3, 1, (h + 2) * I, 4 * k * O)
    y = lax.conv_general_dilated(ext, wf, (1, 1, 1), ((1, 1), (1, 1), (0, 0)),
                                 dimension_numbers=_DN)          # (B, X, Y, Z/h, 4 k O)
    y = y.reshape(B, X, Y, Z // h, 2, 2, k * O).transpose(0, 1, 4, 2, 5, 3, 6)
    return y.reshape(B, 2 * X, 2 * Y, Z // h, k * O)


def instance_norm_folded(xf, k: int, eps: float = 1e-5):
    """``fold(instance_norm(unfold(xf)))``: per sample and channel over all voxels, float32
    statistics, no affine; the result has ``xf``'s dtype."""
    B, L = xf.shape[0], xf.shape[-1]
    C = L // k
    x32 = xf.astype(jnp.float32)
    per_lane = lambda v: jnp.tile(v.reshape(B, k, C).mean(1), (1, k)).reshape(B, 1, 1, 1, L)
    mean = per_lane(jnp.mean(x32, axis=(1, 2, 3)))
    var = per_lane(jnp.mean(jnp.square(x32 - mean), axis=(1, 2, 3)))
    return ((x32 - mean) * lax.rsqrt(var + eps)).astype(xf.dtype)
