"""Instance optimisation of a dense field (ConvexAdam-style): Adam on the field itself, not the net.

    disp = optimize_field(moving, fixed)                    # from identity
    disp = optimize_field(moving, fixed, init_disp=flow)    # refine a network's field

Both images lie on one grid (the fixed grid; the moving image already resampled onto it). The
result is a displacement ``u`` of shape ``(1, X, Y, Z, 3)`` in voxels of that grid, pulling:
``warped(x) = moving(x + u(x))`` (``spatial.warp``).

**Objective.** Per level, with ``M(.)`` the MIND-SSC descriptor (``losses.mind_ssc``, r = d = 2,
12 channels) and ``M_f = M(fixed)`` computed once per level,

    L(v) = sum_x m(x) mean_c (M(moving o phi)(x, c) - M_f(x, c))^2 / sum_x m(x)     (MIND)
         + smooth * (1/3) sum_a mean_x (D_a v)^2                                    (diffusion)
         + dice_weight * (1 - softDice(onehot(moving_label) o phi, onehot(fixed_label)))

with ``m`` the optional mask (1 everywhere by default), ``D_a`` the forward difference along axis
``a`` and the Dice term used only when both label maps are given. The map is
``phi = (id + u0) o (id + w)``, i.e. ``u = w + u0(x + w(x))`` (``spatial.compose``), where ``u0``
is ``init_disp`` (0 by default) and ``w`` the refinement: with ``diffeomorphic=True``
``w = exp(v)`` for a stationary velocity ``v`` (scaling and squaring, ``spatial.integrate``), so
``w`` is invertible up to discretisation; otherwise ``w = v``. Adam (optax) minimises ``L`` over
``v``. That is ``init_mode="compose"``: ``u0`` is kept as it is, roughness included. With
``init_mode="warm"`` ``u0`` is instead the starting point of ``v`` (resampled to the first
level's control grid, read as a velocity when diffeomorphic) and the result is ``w`` alone, so
the diffusion term acts on the whole field: a network's rough field is smoothed, not kept (the
``moving`` image is then the unwarped one). Measured on the demo network's synthetic test pairs
(``experiments/quality_table.py``), warm ended with field IO's smoothness (no folds, SDlogJ as
from the identity) where compose kept the network's SDlogJ of 0.36-0.73 and its folds.

``init_mode="prior"`` starts like warm, but the diffusion term acts on ``v - p`` instead of
``v``, where ``p`` is ``init_disp`` brought to a coarse grid (``prior_factor`` times coarser than
the working grid; default the first level's control grid, ``levels[0] * field_factor``) and
resampled to each level's control grid: the network's large-scale deformation costs nothing,
its fine-scale roughness is not kept, and the result is still ``exp(v)`` (invertible). It helps
exactly as far as the network's field is right. On the seed-42 demo network's test pairs
(800-step recipe; 2026-12-04, 8 per domain, 10 known-field pairs; default ``prior_factor`` 8 /
4, against warm): Dice Cardiac 0.862 / 0.887 against 0.845 (the network alone: 0.897), but
Brain 0.766 / 0.709 against 0.880, Abdominal 0.819 / 0.784 against 0.862, Hippocampus 0.753 /
0.739 against 0.764, Hip 0.869 / 0.858 against 0.889, known field 0.818 / 0.809 against 0.818,
and SDlogJ 0.14-0.33 against 0.10-0.13. Its MIND was as low or lower than warm's where its
Dice was far lower (Brain 0.0360 against 0.0373), so MIND cannot pick between the two per pair.
Not the default. With the 1200-step networks (three seeds) it beat warm on Cardiac (0.867 /
0.846) and the known fields (0.826 / 0.814) only; with a 2400-step one it also tied on Abdominal
and Hip (README, "Registration quality").

**Boundary.** The squarings (and, with ``init_mode="compose"``, the composition) sample fields
past the volume's edge; there they take the edge values (``boundary="border"``), not 0 as in the
network (``spatial``'s default, the reference's). With 0, a velocity pointing out of the volume
is cut down in each squaring near the edge, and the integrated field's Jacobian turns rough in a
shell a few voxels deep: on the 8 synthetic Brain test pairs the whole-field SDlogJ of field IO
alone was 0.217 with 0 and 0.095 with the edge values (Dice 0.879 / 0.880; over the labelled
anatomy 0.057 / 0.055); with 0, the log-Jacobian RMS 2 voxels from the face was 0.23-0.59.

**Coarse to fine.** ``levels`` are downsampling factors of the working grid (default 4, 2, 1):
level ``f`` resizes the images (and one-hot labels, mask, init) to about ``shape / f``
(align-corners, ``spatial.resize``); ``v`` lives on a grid ``field_factor`` times coarser still
(a control grid: cheaper, smoother; its displacement is resized to the level grid), and is carried
to the next level by ``spatial.resample_flow`` (values rescaled to the new voxel size). Adam's
state restarts at each level. The velocity is in voxels of its own grid, so ``lr`` is a step
size in those voxels and the diffusion term is dimensionless (the same across levels).

**Working grid.** A fixed grid with more than ``max_voxels`` voxels is optimised on a grid
scaled down isotropically (in voxels) to at most ``max_voxels``; the result is resampled back to
the fixed grid (``spatial.resample_flow``).

**Compilation.** One module-level jitted function runs all the Adam steps of a level
(``lax.fori_loop``; the step count, learning rate and weights are traced values), so a level
compiles once per (shapes, options) and later calls with the same shapes do not retrace.

**Optimiser details.** Adam's update is normalised, so near a minimum it keeps stepping by about
the learning rate: the rate decays to 0 over each level (cosine), and the loss is multiplied by
the number of field voxels (per-parameter gradients of the same order at any grid size) with
Adam's epsilon ``adam_eps = 0.1`` on that scale, so that float round-off (gradients 1e-7 to 4e-6
where the images agree) does not become full-size steps: on identical 32^3 images the field
drifted by up to 0.28 voxel with epsilon ~1e-3, 0.13 with ~1e-2 and 0.04 with 0.1, for the same
accuracy on the deformed test pair (EPE 0.85-0.87 of 2.24 voxels). (Those drifts were with the
zeros boundary; with "border" it is 0.056 at most, at an edge voxel, and 0.004 on average.)

**Defaults, by measurement.** Pairs from ``benchmarks/field_opt.py``: a subject of
``data/synthetic_anatomy`` and the same subject pulled through a known random diffeomorphism
(RMS 2.5 voxels). Tuned at 64^3 on its first three pairs (brain, abdomen, hip; true-field
SDlogJ 0.146-0.172, EPE 2.49 voxels before), mean over the pairs, 2-core CPU shared with other
jobs (load 12-14), by ``python benchmarks/field_opt.py --sizes 64 --pairs 3 --domains brain
abdomen hip --lr .. --smooth ..`` (the same pairs, through a script calling the same functions):

    smooth  lr (per level)     Dice    EPE    SDlogJ (max)   % folded
    1.0     0.5, 0.25, 0.1     0.902   1.37   0.165 (0.213)  0
    1.0     1.0, 0.5, 0.25     0.919   1.29   0.185 (0.252)  0
    2.0     1.0, 0.5, 0.25     0.901   1.41   0.145 (0.186)  0     <- default

The default trades a little accuracy for SDlogJ <= 0.15 (the issue's target). On rougher fields
(``--smoothness 8``, true SDlogJ 0.17-0.20, smooth 1.0) smooth 0.5 and 0.3 gave EPE 1.35 and 1.36
against 1.48 but SDlogJ 0.22 and 0.24 against 0.18; steps (60, 30, 5) gave EPE 1.51 in ~60 % of
the time. A velocity on the level grid itself (``field_factor=1``) was worse than on a 2x coarser
control grid on the 32^3 test pair (EPE 1.11 against 0.86 of 2.24) and costs more.

The defaults on the full benchmark, ``python benchmarks/field_opt.py --sizes 64 96 --pairs 10 3``
(each shape's first call, with compilation, timed apart; load 12-16 on the 2 cores):

    size  pairs  Dice before->after  EPE (voxels)  % folded  SDlogJ true->est (max)  s/pair
    64^3  10     0.616 -> 0.891      2.55 -> 1.23  0         0.165 -> 0.127 (0.177)  12.7
    96^3   3     0.772 -> 0.944      2.75 -> 1.21  0         0.119 -> 0.112 (0.168)  69.3

Compilation took 45-100 s per image shape (three levels). At 96^3 (the brain pair, 96x110x96, ran
on the 91x105x91 working grid of ``max_voxels = 96**3``) the wall time was 43-92 s on a CPU shared
with ~7x more runnable threads than cores; a rerun of that pair
(``--sizes 96 --pairs 1``, load 9-13) used 48.0 s of process CPU over all threads for 102 s wall,
i.e. 24-48 s alone on the 2 cores. Idle (load 0.6-1.6, ``--sizes 96 --pairs 3``): 13.5-22.3 s
per pair after compilation (the brain pair 22.3 s), Dice 0.770 -> 0.947, EPE 2.76 -> 1.17.

All of the above ran with the zeros boundary (and an older data generator). With "border", the
default since 2026-12-03, the same benchmark (load 1-2) gave 64^3 Dice 0.615 -> 0.886, EPE 2.54
-> 1.21, SDlogJ 0.165 -> 0.125 (max 0.185); 96^3 0.770 -> 0.947, 2.76 -> 1.21, 0.119 -> 0.115
(0.170), 15.7-23.0 s per pair after compilation. On the quality table's synthetic test pairs
(``experiments/quality_table.py --runs RUN --methods "field IO alone" --known-pairs 10
--field-io smooth=W``; 8 pairs per domain and 10 known-field pairs, seed-42 demo network) the
diffusion weight W = 1 / 1.5 / 2 gave mean SDlogJ at most 0.171 / 0.148 / 0.130 over the six data
sets, and Dice 0.866 / 0.866 / 0.859 (Abdominal), 0.879 / 0.878 / 0.880 (Brain), 0.769 / 0.770 /
0.769 (Hippocampus), 0.881 / 0.867 / 0.847 (Cardiac), 0.891 / 0.891 / 0.889 (Hip), 0.840 / 0.827
/ 0.813 (known field; EPE 1.13 / 1.24 / 1.31 voxels). The default stays 2: 1.5 is more accurate
on Cardiac and the known fields but leaves no margin under SDlogJ 0.15.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from promptreg_jax import losses
from promptreg_jax.instance_opt import one_hot
from promptreg_jax.losses import soft_dice_loss
from promptreg_jax.spatial import check_boundary, compose, integrate, resample_flow, resize, warp

# Adam's epsilon, on the loss times the number of field voxels. Where the images agree the
# gradients are float round-off (1e-7 to 4e-6 at identity on the 32^3 test pair, where they are
# 0.1 RMS on the deformed pair): with a tiny epsilon Adam's normalisation turns round-off into
# full-size steps (identical images drifted by 0.28 voxel at ~1e-3; 0.04 at 0.1, same accuracy).
ADAM_EPS = 0.1
DEFAULTS = dict(levels=(4, 2, 1), steps=(80, 40, 10), lr=(1.0, 0.5, 0.25), smooth=2.0,
                field_factor=2, int_steps=6, dice_weight=1.0, max_voxels=96 ** 3,
                adam_eps=ADAM_EPS, boundary="border")
INIT_MODES = ("warm", "compose", "prior")  # register uses warm; the function keeps compose
WARM_MODES = ("warm", "prior")  # init_disp is the starting velocity; moving enters unwarped
TRACE_COUNT = {"level": 0}  # incremented each time the level function is traced (tests use it)


def _as_volume(x, name: str, channels: int | None = 1) -> np.ndarray | jax.Array:
    """``(X,Y,Z)`` / ``(X,Y,Z,C)`` / ``(1,X,Y,Z,C)`` -> ``(1,X,Y,Z,C)`` float32 (a new array)."""
    a = jnp.asarray(x, jnp.float32)
    if channels == 1 and a.ndim == 3:
        a = a[None, ..., None]
    elif a.ndim == 4 and (channels is None or a.shape[-1] == channels):
        a = a[None]
    if a.ndim != 5 or a.shape[0] != 1 or (channels is not None and a.shape[-1] != channels):
        want = "(X,Y,Z) or (1,X,Y,Z,1)" if channels == 1 else f"(1,X,Y,Z,{channels})"
        raise ValueError(f"optimize_field: {name} must be {want}, got shape {np.shape(x)}")
    return a


def _on_grid(x, shape) -> bool:
    """``x`` is ``shape``, ``(1, *shape)`` or ``(1, *shape, 1)``."""
    return tuple(np.shape(x)) in (shape, (1, *shape), (1, *shape, 1))


def _per_level(value, n: int, name: str) -> tuple:
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(vals) != n:
        raise ValueError(f"optimize_field: {name} has {len(vals)} entries for {n} levels")
    return vals


def working_shape(shape: Sequence[int], max_voxels: int | None) -> tuple:
    """``shape`` scaled isotropically (in voxels) to at most ``max_voxels`` voxels (never up)."""
    shape = tuple(int(n) for n in shape)
    if not max_voxels or math.prod(shape) <= max_voxels:
        return shape
    scale = (max_voxels / math.prod(shape)) ** (1.0 / 3.0)
    return tuple(max(8, int(math.floor(n * scale))) for n in shape)


def _scaled(shape, factor: float, floor: int = 8) -> tuple:
    return tuple(max(min(n, floor), int(round(n / factor))) for n in shape)


def _refinement(v, level_shape, diffeomorphic: bool, int_steps: int, boundary: str):
    """``w`` on the level grid from the velocity (or displacement) ``v`` on its control grid."""
    w = integrate(v, int_steps, boundary) if diffeomorphic else v
    return resample_flow(w, level_shape) if tuple(v.shape[1:4]) != tuple(level_shape) else w


def _total(v, init, level_shape, diffeomorphic: bool, int_steps: int, boundary: str):
    w = _refinement(v, level_shape, diffeomorphic, int_steps, boundary)
    return w if init is None else compose(init, w, boundary)


def _level_loss(v, moving, fixed_mind, init, prior, m_oh, f_oh, mask, smooth, dice_weight,
                diffeomorphic, int_steps, boundary):
    u = _total(v, init, moving.shape[1:4], diffeomorphic, int_steps, boundary)
    dist = jnp.mean((losses.mind_ssc(warp(moving, u)) - fixed_mind) ** 2, axis=-1)
    sim = jnp.mean(dist) if mask is None else jnp.sum(dist * mask[..., 0]) / jnp.maximum(
        jnp.sum(mask), 1e-6)
    total = sim + smooth * losses.smoothness_loss(v if prior is None else v - prior)
    if m_oh is not None:
        total = total + dice_weight * soft_dice_loss(warp(m_oh, u), f_oh)
    return total


def _run_level_impl(v, n_steps, lr, adam_eps, smooth, dice_weight, moving, fixed_mind, init,
                    prior, m_oh, f_oh, mask, *, diffeomorphic: bool, int_steps: int, boundary: str):
    """``n_steps`` Adam steps on ``v``; returns ``(v, loss before the last update)``."""
    TRACE_COUNT["level"] += 1
    tx = optax.scale_by_adam(eps=adam_eps)
    # The loss times the number of field voxels: per-parameter gradients of the same order
    # whatever the grid sizes, so that ``adam_eps`` has a fixed meaning.
    scale = float(math.prod(v.shape[1:4]))
    grad_fn = jax.value_and_grad(lambda *a: scale * _level_loss(*a))

    def body(t, carry):
        v, state, _ = carry
        loss, g = grad_fn(v, moving, fixed_mind, init, prior, m_oh, f_oh, mask, smooth,
                          dice_weight, diffeomorphic, int_steps, boundary)
        direction, state = tx.update(g, state, v)
        # Cosine decay to 0 over the level: Adam's steps stay ~lr near a minimum (its update is
        # normalised), so without decay the field ends jittering by about lr around it.
        rate = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t / jnp.maximum(n_steps, 1)))
        return v - rate * direction, state, loss

    carry = (v, tx.init(v), jnp.zeros((), jnp.float32))
    v, _, loss = jax.lax.fori_loop(0, n_steps, body, carry)
    return v, loss / scale


_run_level = jax.jit(_run_level_impl, static_argnames=("diffeomorphic", "int_steps", "boundary"))
_mind = jax.jit(losses.mind_ssc)


def mind_similarity(warped, fixed, mask=None) -> float:
    """Mean squared MIND-SSC descriptor distance (lower is better; 0 for identical images).

    ``mean_{x,c} (M(warped) - M(fixed))^2`` (mask-weighted mean over ``x`` if ``mask``): the
    quantity ``optimize_field`` lowers, for a "do no harm" check of a field against identity.
    """
    w, f = _as_volume(warped, "warped"), _as_volume(fixed, "fixed")
    if w.shape != f.shape:
        raise ValueError(f"mind_similarity: warped {np.shape(warped)} and fixed "
                         f"{np.shape(fixed)} differ in shape")
    dist = jnp.mean((_mind(w) - _mind(f)) ** 2, axis=-1)[0]
    if mask is None:
        return float(jnp.mean(dist))
    m = jnp.asarray(mask, jnp.float32).reshape(dist.shape)
    return float(jnp.sum(dist * m) / jnp.maximum(jnp.sum(m), 1e-6))


def _check(moving, fixed, levels, steps, lr, smooth, field_factor, int_steps):
    if moving.shape != fixed.shape:
        raise ValueError(f"optimize_field: moving {moving.shape} and fixed {fixed.shape} must be "
                         f"on the same grid (resample the moving image onto the fixed grid)")
    if min(fixed.shape[1:4]) < 8:
        raise ValueError(f"optimize_field: images must be at least 8 voxels per axis, got "
                         f"{fixed.shape[1:4]}")
    if not bool(jnp.all(jnp.isfinite(moving)) & jnp.all(jnp.isfinite(fixed))):
        raise ValueError("optimize_field: moving or fixed contains NaN or infinity")
    if not levels or any(not (float(f) >= 1) for f in levels):
        raise ValueError(f"optimize_field: levels must be downsampling factors >= 1, got {levels}")
    if any(int(s) < 0 for s in steps) or any(not float(r) > 0 for r in lr):
        raise ValueError(f"optimize_field: steps must be >= 0 and lr > 0, got {steps}, {lr}")
    if not float(smooth) >= 0 or int(field_factor) < 1 or int(int_steps) < 0:
        raise ValueError(f"optimize_field: need smooth >= 0, field_factor >= 1, int_steps >= 0; "
                         f"got {smooth}, {field_factor}, {int_steps}")


def optimize_field(moving, fixed, init_disp=None, *, levels=DEFAULTS["levels"],
                   steps=DEFAULTS["steps"], lr=DEFAULTS["lr"], smooth=DEFAULTS["smooth"],
                   diffeomorphic: bool = True, moving_label=None, fixed_label=None,
                   num_classes: int | None = None, dice_weight=DEFAULTS["dice_weight"],
                   mask=None, field_factor: int = DEFAULTS["field_factor"],
                   int_steps: int = DEFAULTS["int_steps"],
                   max_voxels: int | None = DEFAULTS["max_voxels"],
                   adam_eps: float = DEFAULTS["adam_eps"], boundary: str = DEFAULTS["boundary"],
                   init_mode: str = "compose", prior_factor: float | None = None,
                   return_info: bool = False):
    """Optimises a displacement taking ``moving`` onto ``fixed``; see the module docstring.

    ``moving``, ``fixed``: ``(X,Y,Z)`` or ``(1,X,Y,Z,1)`` float images on the same grid.
    ``init_disp``: ``(1,X,Y,Z,3)`` or ``(X,Y,Z,3)`` voxels on that grid (e.g. a network's field,
    ``spatial.resample_flow`` -ed to it): composed with the refinement (``init_mode="compose"``,
    ``moving`` already pulled through it) or the refinement's starting point (``"warm"``,
    ``moving`` not warped; ``"prior"``: the starting point and the diffusion term's reference,
    smoothed to a grid ``prior_factor`` times coarser than the working grid). ``levels``:
    downsampling factors, coarse to fine; ``steps``, ``lr``: one value or one per level.
    ``moving_label``, ``fixed_label``: integer maps on the grid (both or neither) for the
    soft-Dice term (``num_classes`` default max label + 1). ``mask``: fixed-grid weights of the
    MIND term. ``field_factor``: control-grid coarsening per level; ``int_steps``: squarings;
    ``max_voxels``: bound on the working grid (None: none); ``boundary``: how fields extend past
    the volume in the squarings and compositions ("border": their edge values; "zeros": 0, the
    network's convention). Inputs are never modified.
    Returns ``(1, X, Y, Z, 3)`` float32 (with ``return_info``: ``(disp, info)``, ``info`` holding
    the level shapes and each level's last loss).
    """
    if init_mode not in INIT_MODES:
        raise ValueError(f"optimize_field: init_mode must be one of {INIT_MODES}, got "
                         f"{init_mode!r}")
    check_boundary(boundary, "optimize_field")
    if prior_factor is not None and not prior_factor >= 1:
        raise ValueError(f"optimize_field: prior_factor must be >= 1, got {prior_factor!r}")
    moving, fixed = _as_volume(moving, "moving"), _as_volume(fixed, "fixed")
    levels = tuple(levels) if isinstance(levels, (tuple, list)) else (levels,)
    steps, lr = _per_level(steps, len(levels), "steps"), _per_level(lr, len(levels), "lr")
    _check(moving, fixed, levels, steps, lr, smooth, field_factor, int_steps)
    shape = tuple(fixed.shape[1:4])
    if init_disp is not None:
        init_disp = _as_volume(init_disp, "init_disp", channels=3)
        if init_disp.shape[1:4] != shape:
            raise ValueError(f"optimize_field: init_disp {init_disp.shape} is not on the image "
                             f"grid {shape}")
    if (moving_label is None) != (fixed_label is None):
        raise ValueError("optimize_field: give both moving_label and fixed_label, or neither")
    m_oh = f_oh = None
    if moving_label is not None:
        for name, lab in (("moving_label", moving_label), ("fixed_label", fixed_label)):
            if not _on_grid(lab, shape):
                raise ValueError(f"optimize_field: {name} shape {np.shape(lab)} is not the "
                                 f"image grid {shape}")
        n = int(num_classes or max(int(np.max(moving_label)), int(np.max(fixed_label))) + 1)
        m_oh = jnp.asarray(one_hot(np.reshape(moving_label, shape), n))
        f_oh = jnp.asarray(one_hot(np.reshape(fixed_label, shape), n))
    if mask is not None:
        if not _on_grid(mask, shape):
            raise ValueError(f"optimize_field: mask shape {np.shape(mask)} is not the image "
                             f"grid {shape}")
        mask = jnp.asarray(mask, jnp.float32).reshape(1, *shape, 1)

    warm = init_disp is not None and init_mode in WARM_MODES
    work = working_shape(shape, max_voxels)
    coarse_prior = None
    if init_disp is not None and init_mode == "prior":
        pf = float(prior_factor or levels[0] * field_factor)
        coarse_prior = resample_flow(init_disp, _scaled(work, pf, floor=4))
    info = {"working_shape": work, "levels": []}
    v = None
    for factor, n_steps, rate in zip(levels, steps, lr):
        lshape = _scaled(work, float(factor))
        fshape = _scaled(lshape, float(field_factor), floor=4)
        mov = resize(moving, lshape)
        fmind = _mind(resize(fixed, lshape))
        init = None if init_disp is None or warm else resample_flow(init_disp, lshape)
        lm, lf = (None, None) if m_oh is None else (resize(m_oh, lshape), resize(f_oh, lshape))
        lmask = None if mask is None else resize(mask, lshape)
        if v is None:  # the first level: from zero, or (warm) from init_disp as the velocity
            v = (resample_flow(init_disp, fshape) if warm else
                 jnp.zeros((1, *fshape, 3), jnp.float32))
        else:
            v = resample_flow(v, fshape)
        prior = None if coarse_prior is None else resample_flow(coarse_prior, fshape)
        v, loss = _run_level(v, jnp.int32(n_steps), jnp.float32(rate), jnp.float32(adam_eps),
                             jnp.float32(smooth),
                             jnp.float32(dice_weight), mov, fmind, init, prior, lm, lf, lmask,
                             diffeomorphic=bool(diffeomorphic), int_steps=int(int_steps),
                             boundary=boundary)
        info["levels"].append({"shape": lshape, "field_shape": fshape, "steps": int(n_steps),
                               "last_loss": float(loss)})
    # The refinement goes straight from its control grid to the fixed grid, and is composed
    # with the full-resolution init there (no round trip of the init through the working grid).
    disp = _refinement(v, shape, bool(diffeomorphic), int(int_steps), boundary)
    disp = disp if init_disp is None or warm else compose(init_disp, disp, boundary)
    return (disp, info) if return_info else disp
