"""3D convolutions, channels-last, in two interchangeable forms sharing one parameter layout.

Parameters are ``kernel (k, k, k, Cin, Cout)`` (and a bias added by the caller):

* ``"native"``: ``lax.conv_general_dilated`` in 3D (what ``flax.linen.Conv`` runs);
* ``"depth_sum"``: the CPU form. XLA:CPU runs 3D convs several times slower than 2D ones and
  its conv gradients slower still, so stride-1 convs run as 2D convs over the depth taps (or
  plane-wise matmuls where the channels are few) with a hand-written backward pass (a plane-loop
  kernel gradient), strided ones as a sum of 2D convs over the depth taps (see ``_conv_cpu``).
  It is the default there (``"auto"``); on accelerators ``"auto"`` picks ``"native"``. The
  platform is the one the program is traced for (``target_platform``), not the host's.

This module holds the kernels only; the Flax blocks that use them are in ``layers.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Padding = Sequence[tuple[int, int]]
CONV_IMPLS = ("auto", "native", "depth_sum")

_TARGET_PLATFORM: list[str] = []


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Within this context, tracing decides platform-dependent forms (``conv_impl="auto"``, the
    trilinear sampler's backward) for ``platform`` (``"cpu"``, ``"tpu"``, ``"gpu"``/``"cuda"``)
    instead of ``jax.default_backend()``. Compile-only runs for accelerators (``benchmarks/aot.py``)
    trace on a CPU host, where the default backend is ``cpu``; they wrap ``lower()`` in this.
    ``None`` changes nothing.
    """
    if platform is None:
        yield
        return
    _TARGET_PLATFORM.append(_normalise_platform(platform))
    try:
        yield
    finally:
        _TARGET_PLATFORM.pop()


def _normalise_platform(platform: str) -> str:
    p = str(platform).lower()
    return {"cuda": "gpu", "rocm": "gpu"}.get(p, p)


def current_platform(platform: str | None = None) -> str:
    """The platform that programs traced now are for: ``platform`` if given, else the innermost
    :func:`target_platform`, else ``jax.default_backend()`` (``"gpu"`` for CUDA/ROCm)."""
    if platform is not None:
        return _normalise_platform(platform)
    if _TARGET_PLATFORM:
        return _TARGET_PLATFORM[-1]
    return _normalise_platform(jax.default_backend())


def resolve_conv_impl(conv_impl: str, platform: str | None = None) -> str:
    """``"auto"`` -> ``"depth_sum"`` for the CPU, ``"native"`` for accelerators.

    The platform is the one programs are being traced for (:func:`current_platform`: the
    ``platform`` argument, else an enclosing :func:`target_platform`, else the default backend).
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        return "depth_sum" if current_platform(platform) == "cpu" else "native"
    return conv_impl


def conv3d(x, kernel, strides: int = 1, padding: Padding = ((1, 1),) * 3,
           conv_impl: str = "native"):
    """Cross-correlation of ``x (B,X,Y,Z,Cin)`` with ``kernel (kx,ky,kz,Cin,Cout)``, no bias.

    ``padding`` is explicit ``(lo, hi)`` zero padding per spatial axis (PyTorch's ``padding=p`` is
    ``((p, p),) * 3``; ``"SAME"`` differs from it for stride 2 on even sizes). ``"depth_sum"``
    runs stride-1 convs through :func:`_conv_cpu` (forward form chosen by channel counts, a
    hand-written backward) and strided ones as a sum of 2D convs over the depth taps.
    """
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if resolve_conv_impl(conv_impl) == "native":
        return lax.conv_general_dilated(x, kernel, (strides,) * 3, padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if strides == 1 and all(lo < k and hi < k for (lo, hi), k in zip(padding, kernel.shape)):
        return _conv_cpu(x, kernel, padding)
    return _conv_depth_sum(x, kernel, strides, padding)


# ---------------------------------------------------------------------------------------------
# XLA:CPU forms of the 3D convolution. XLA:CPU has no fast 3D conv and its 2D conv is slow in
# the kernel gradient at large images (a 64^3 48->48 conv: 0.5 s forward, 2.2 s for dK), so
# stride-1 convs get a custom VJP whose pieces are each the fastest of the forms measured on
# this machine kind (benchmarks/run.py --what conv):
#   forward  "depth_sum": 2D convs over the depth taps (Eigen's 2D conv: 65-170 GFLOP/s);
#            "depth_stacked": one 2D conv with the depth taps stacked on the outputs, shifted
#            sums (Cout < 96: a 3x wider matmul);
#            "taps": per output plane one matmul per tap (Cin = 1: the image -> 16 conv; the
#            2x2x2 kernels of the transposed conv);
#            "columns": per 2 planes the taps' windows side by side, one matmul (Cin <= 4:
#            the flow heads' input gradient);
#            "shift_sum": per chunk of planes one matmul to every tap's output, then shifted
#            sums (Cout <= 4, the flow heads);
#   dx       the forward of dy with the flipped, transposed kernel (stride 1);
#   dK       per output plane, one (Y*Z, Cin)^T (Y*Z, Cout) matmul per tap, accumulated
#            ("planes", for planes of >= 256 voxels); where Cout <= 4 < Cin (the flow heads)
#            instead per chunk of input planes one x^T matmul with every tap's window of the
#            padded dy side by side ("dy_columns"); else XLA's own gradient of "depth_sum".
# Only the inputs x and kernel are kept for the backward pass.
_SMALL_CHANNELS = 4
_PLANE_VOXELS_FOR_LOOP = 256
_STACKED_CHUNK_BYTES = 64 * 2 ** 20
_COLUMNS_CHUNK_BYTES = 8 * 2 ** 20


def _mm(a, b, dtype):
    """``a @ b`` over the last axis of ``a``, accumulated in float32, returned as ``dtype``."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)


def _out_sizes(shape, kshape, padding):
    return tuple(n + lo + hi - k + 1 for n, k, (lo, hi) in zip(shape, kshape, padding))


def _conv_depth_sum(x, kernel, strides, padding):
    """The conv as a sum over the depth taps of 2D convs (depth slices folded into the batch)."""
    B = x.shape[0]
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


def _conv_depth_stacked(x, kernel, padding):
    """Stride 1: a 2D conv of every padded depth plane with the ``kx`` depth taps' kernels
    stacked on the output channels, then the sum of the taps' outputs shifted along depth.

    Runs over chunks of output planes so that the stacked output (``kx`` times the output)
    stays under about ``_STACKED_CHUNK_BYTES``.
    """
    B = x.shape[0]
    kx, cout = kernel.shape[0], kernel.shape[-1]
    Xo, Yo, Zo = _out_sizes(x.shape[1:4], kernel.shape[:3], padding)
    stacked = jnp.moveaxis(kernel, 0, 3).reshape(*kernel.shape[1:3], kernel.shape[3], kx * cout)
    plane_bytes = B * Yo * Zo * kx * cout * x.dtype.itemsize
    chunk = max(1, min(Xo, _STACKED_CHUNK_BYTES // max(plane_bytes, 1)))
    chunk = next(c for c in range(chunk, 0, -1) if Xo % c == 0)

    def planes(w):  # w: (B, chunk + kx - 1, Y, Z, C) input planes -> (B, chunk, Yo, Zo, cout)
        y = lax.conv_general_dilated(w.reshape(-1, *w.shape[2:]), stacked, (1, 1), padding[1:],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y.reshape(B, w.shape[1], *y.shape[1:3], kx, cout)
        return sum(y[:, t:t + chunk, :, :, t] for t in range(kx))

    if chunk == Xo:
        return planes(jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0))))

    def body(i, w, out):
        return lax.dynamic_update_slice_in_dim(out, planes(w), i * chunk, axis=1)

    init = jnp.zeros((B, Xo, Yo, Zo, cout), x.dtype)
    pad3 = (padding[0], (0, 0), (0, 0))
    return _plane_loop(x, kernel.shape[:3], pad3, chunk, body, init)


def _plane_loop(x, kshape, padding, chunk, plane_fn, init):
    """``fori_loop`` over chunks of ``chunk`` output depth planes of a stride-1 conv.

    ``plane_fn(i, window, carry)``: ``window`` = the padded input's planes feeding output planes
    ``i*chunk ... i*chunk+chunk-1`` (``chunk + kx - 1`` planes); returns the new carry.
    """
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    Xo = xp.shape[1] - kshape[0] + 1
    width = chunk + kshape[0] - 1
    return lax.fori_loop(0, Xo // chunk, lambda i, carry: plane_fn(
        i, lax.dynamic_slice_in_dim(xp, i * chunk, width, axis=1), carry), init)


def _conv_taps(x, kernel, padding):
    """Forward, small Cin: per output plane, one matmul per kernel tap, accumulated."""
    kx, ky, kz = kernel.shape[:3]
    Xo, Yo, Zo = _out_sizes(x.shape[1:4], kernel.shape[:3], padding)

    def plane(i, w, out):
        acc = sum(_mm(w[:, a:a + 1, b:b + Yo, c:c + Zo], kernel[a, b, c], jnp.float32)
                  for a in range(kx) for b in range(ky) for c in range(kz))
        return lax.dynamic_update_slice_in_dim(out, acc.astype(x.dtype), i, axis=1)

    init = jnp.zeros((x.shape[0], Xo, Yo, Zo, kernel.shape[-1]), x.dtype)
    return _plane_loop(x, kernel.shape[:3], padding, 1, plane, init)


def _conv_shift_sum(x, kernel, padding):
    """Forward, small Cout: one matmul to all taps' outputs per chunk of planes, shifted sums."""
    kx, ky, kz, cin, cout = kernel.shape
    Xo, Yo, Zo = _out_sizes(x.shape[1:4], kernel.shape[:3], padding)
    chunk = next(c for c in (4, 2, 1) if Xo % c == 0)
    w_all = jnp.moveaxis(kernel, 3, 0).reshape(cin, kx * ky * kz * cout)

    def plane(i, w, out):
        y = _mm(w, w_all, jnp.float32).reshape(*w.shape[:4], kx * ky * kz, cout)
        taps = itertools.product(range(kx), range(ky), range(kz))
        acc = sum(y[:, a:a + chunk, b:b + Yo, c:c + Zo, t] for t, (a, b, c) in enumerate(taps))
        return lax.dynamic_update_slice_in_dim(out, acc.astype(x.dtype), i * chunk, axis=1)

    init = jnp.zeros((x.shape[0], Xo, Yo, Zo, cout), x.dtype)
    return _plane_loop(x, kernel.shape[:3], padding, chunk, plane, init)


def _conv_columns(x, kernel, padding):
    """Forward, small Cin > 1: per 2 planes, the taps' windows side by side, one matmul."""
    kx, ky, kz, cin, cout = kernel.shape
    Xo, Yo, Zo = _out_sizes(x.shape[1:4], kernel.shape[:3], padding)
    chunk = next(c for c in (2, 1) if Xo % c == 0)
    w_all = kernel.reshape(kx * ky * kz * cin, cout)

    def plane(i, w, out):
        cols = jnp.concatenate([w[:, a:a + chunk, b:b + Yo, c:c + Zo] for a in range(kx)
                                for b in range(ky) for c in range(kz)], axis=-1)
        return lax.dynamic_update_slice_in_dim(out, _mm(cols, w_all, x.dtype), i * chunk, axis=1)

    init = jnp.zeros((x.shape[0], Xo, Yo, Zo, cout), x.dtype)
    return _plane_loop(x, kernel.shape[:3], padding, chunk, plane, init)


def _cpu_forward_form(kernel_shape) -> str:
    """The fastest forward form measured for this kernel shape on XLA:CPU."""
    k, cin, cout = kernel_shape[0], kernel_shape[3], kernel_shape[4]
    if cin == 1:
        return "taps"
    if cin <= _SMALL_CHANNELS:
        return "columns"
    if cout <= _SMALL_CHANNELS:
        return "shift_sum"
    if k < 3:  # the transposed conv's 2x2x2 form: Eigen's 2D conv is slow for 2x2 kernels
        return "taps"
    if cout < 96:  # narrow outputs: stacking the depth taps widens the matmul 3x
        return "depth_stacked"
    return "depth_sum"


_FORWARD_FORMS = {"depth_stacked": _conv_depth_stacked, "taps": _conv_taps, "columns": _conv_columns, "shift_sum": _conv_shift_sum,
                  "depth_sum": lambda x, kernel, padding: _conv_depth_sum(x, kernel, 1, padding)}


def _conv_forward(x, kernel, padding, form=None):
    return _FORWARD_FORMS[form or _cpu_forward_form(kernel.shape)](x, kernel, padding)


def _kernel_grad_planes(x, dy, kshape, padding):
    """dK of a stride-1 conv: per output plane, one ``window^T dy`` matmul per tap, accumulated."""
    kx, ky, kz = kshape
    Yo, Zo, cout = dy.shape[2:]
    cin = x.shape[-1]

    def plane(i, w, acc):
        d = lax.dynamic_slice_in_dim(dy, i, 1, axis=1).reshape(-1, cout)
        grads = [_mm(w[:, a:a + 1, b:b + Yo, c:c + Zo].reshape(-1, cin).T, d, jnp.float32)
                 for a in range(kx) for b in range(ky) for c in range(kz)]
        return acc + jnp.stack(grads).reshape(kx, ky, kz, cin, cout)

    init = jnp.zeros((*kshape, cin, cout), jnp.float32)
    return _plane_loop(x, kshape, padding, 1, plane, init)


def _transposed_padding(padding, kshape):
    """The padding of ``dy`` under which a stride-1 conv's transpose is a plain conv:
    ``(k - 1 - lo, k - 1 - hi)`` per axis (so ``dyp[r + k - 1 - a] = dy[r + lo - a]``)."""
    return tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(padding, kshape))


def _kernel_grad_dy_columns(x, dy, kshape, padding):
    """dK of a stride-1 conv, small Cout: per chunk of *input* planes, every tap's shifted window
    of the zero-padded ``dy`` side by side (``kx*ky*kz*Cout`` columns), one ``x^T cols`` matmul.

    ``dK[a,b,c] = sum_r x[r] dy[r + lo - (a,b,c)]`` over the input grid ``r`` (``dy`` zero
    outside its grid), so nothing of ``x`` is copied, and each matmul is ``Cin x 27 Cout`` wide
    instead of the plane loop's 27 matmuls per plane of width ``Cout`` (3 for a flow head).
    """
    kx, ky, kz = kshape
    B, X, Y, Z, cin = x.shape
    cout = dy.shape[-1]
    taps = list(itertools.product(range(kx), range(ky), range(kz)))
    dyp = jnp.pad(dy, ((0, 0), *_transposed_padding(padding, kshape), (0, 0)))
    chunk = max(1, min(X, _COLUMNS_CHUNK_BYTES // (B * Y * Z * len(taps) * cout * 4)))
    chunk = next(c for c in range(chunk, 0, -1) if X % c == 0)

    def body(i, acc):
        xs = lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1).reshape(-1, cin)
        w = lax.dynamic_slice_in_dim(dyp, i * chunk, chunk + kx - 1, axis=1)
        cols = jnp.concatenate([w[:, kx - 1 - a:kx - 1 - a + chunk, ky - 1 - b:ky - 1 - b + Y,
                                  kz - 1 - c:kz - 1 - c + Z] for a, b, c in taps], axis=-1)
        return acc + lax.dot_general(xs, cols.reshape(-1, len(taps) * cout),
                                     (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    g = lax.fori_loop(0, X // chunk, body, jnp.zeros((cin, len(taps) * cout), jnp.float32))
    return g.reshape(cin, kx, ky, kz, cout).transpose(1, 2, 3, 0, 4)


def _kernel_grad(x, dy, kernel, padding, form=None):
    if form is None:  # XLA's own dK is slow on large planes and for 2x2x2 kernels
        big = dy.shape[2] * dy.shape[3] >= _PLANE_VOXELS_FOR_LOOP or min(kernel.shape[:3]) < 3
        form = "planes" if big else "autodiff"
        if big and kernel.shape[-1] <= _SMALL_CHANNELS < kernel.shape[3]:
            form = "dy_columns"  # flow heads: 3-10x faster than "planes" (64^3 to 16^3, 48-192 -> 3)
    if form == "planes":
        return _kernel_grad_planes(x, dy, kernel.shape[:3], padding).astype(kernel.dtype)
    if form == "dy_columns":
        return _kernel_grad_dy_columns(x, dy, kernel.shape[:3], padding).astype(kernel.dtype)
    return jax.vjp(lambda k: _conv_depth_sum(x, k, 1, padding), kernel)[1](dy)[0]


def _input_grad(dy, kernel, padding, form=None):
    """dx of a stride-1 conv = the conv of dy with the flipped kernel, in/out swapped."""
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    return _conv_forward(dy, flipped, _transposed_padding(padding, kernel.shape[:3]), form)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpu(x, kernel, padding):
    """Stride-1 3D conv for XLA:CPU (forms above); padding ``lo, hi < k`` per axis."""
    return _conv_forward(x, kernel, padding)


def _conv_cpu_fwd(x, kernel, padding):
    return _conv_forward(x, kernel, padding), (x, kernel)


def _conv_cpu_bwd(padding, res, dy):
    x, kernel = res
    return _input_grad(dy, kernel, padding), _kernel_grad(x, dy, kernel, padding)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


# ConvTranspose k4 s2 p1, one axis: out[2m] = x[m-1] W[3] + x[m] W[1] and
# out[2m+1] = x[m] W[2] + x[m+1] W[0]. With x zero-padded by one plane on each side (x' = pad x),
# out[2m + a] = x'[m + a] W[taps_a[0]] + x'[m + a + 1] W[taps_a[1]]: a 2-tap correlation at
# offset a. All 8 output parities are one 2x2x2 conv with their kernels stacked on Cout.
_PHASE_TAPS = ((3, 1), (2, 0))


def conv_transpose3d(x, kernel, conv_impl: str = "native"):
    """PyTorch ``ConvTranspose3d(k=4, stride=2, padding=1)`` of ``x (B,X,Y,Z,I)``, no bias.

    ``kernel (4,4,4,O,I)`` is Flax's ``transpose_kernel=True`` layout: PyTorch's ``(I,O,4,4,4)``
    weight moved to ``(4,4,4,O,I)``, no flip. Output ``(B,2X,2Y,2Z,O)``. ``"native"`` is
    ``lax.conv_transpose``; ``"depth_sum"`` computes its 8 output parities as one 2x2x2 stride-1
    conv of the padded input with the parities' kernels stacked on the output channels (no
    multiplications by inserted zeros), then interleaves them.
    """
    if kernel.shape[:3] != (4, 4, 4):
        raise ValueError(f"conv_transpose3d supports 4x4x4 kernels only, got {kernel.shape}")
    if resolve_conv_impl(conv_impl) == "native":
        return lax.conv_transpose(x, kernel, (2, 2, 2), ((2, 2),) * 3,
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                  transpose_kernel=True)
    B, X, Y, Z, _ = x.shape
    O = kernel.shape[3]
    w = jnp.swapaxes(kernel, 3, 4)  # (4,4,4,I,O): correlation layout
    parities = list(itertools.product(range(2), repeat=3))
    stacked = jnp.concatenate([w[np.ix_(_PHASE_TAPS[a], _PHASE_TAPS[b], _PHASE_TAPS[c])]
                               for a, b, c in parities], axis=-1)  # (2,2,2,I,8*O)
    y = conv3d(x, stacked, 1, ((1, 1),) * 3, conv_impl)  # (B,X+1,Y+1,Z+1,8*O)
    out = jnp.stack([y[:, a:a + X, b:b + Y, c:c + Z, i * O:(i + 1) * O]
                     for i, (a, b, c) in enumerate(parities)], 0)
    out = out.reshape(2, 2, 2, B, X, Y, Z, O)
    return out.transpose(3, 4, 0, 5, 1, 6, 2, 7).reshape(B, 2 * X, 2 * Y, 2 * Z, O)
