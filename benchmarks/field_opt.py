"""CPU benchmark of ``promptreg_jax.field_opt.optimize_field`` on pairs with a known deformation.

    python benchmarks/field_opt.py [--sizes 64 96] [--pairs 10 3] [--amplitude 2.5]
        [--steps 80 40 10] [--lr 1 0.5 0.25] [--smooth 2] [--levels 4 2 1]
        [--field-factor 2] [--int-steps 6] [--dice-weight 0] [--smoothness 6] [--json OUT]

Each pair: a subject of the synthetic generator (``data/synthetic_anatomy.make_subject``,
domains taken in turn from ``DOMAINS``, subject index = pair number) is the fixed image; the
moving image is that subject pulled through a known random diffeomorphism: a stationary velocity
``v`` (Gaussian-smoothed noise, sigma = size / ``--smoothness``, scaled so that the true
displacement ``u* = exp(v)`` has RMS ``--amplitude`` voxels) and ``moving = warp(fixed, exp(-v))``,
so that ``moving(x + u*(x)) ~ fixed(x)``. Labels go the same way (nearest). Per pair it prints
Dice (mean over the labels present) before and after, the end-point error ``|u - u*|`` over the
labelled foreground before (``u = 0``) and after, the % of voxels with a Jacobian determinant
<= 0, SDlogJ of the true and estimated fields (``promptreg_jax.metrics``), and seconds per pair
after compilation: wall, and process CPU over all threads (on a shared machine CPU seconds / 2
estimates the wall time the 2 cores would take alone). The first call of each shape includes
compilation; it is reported apart and the pair timed again. The Dice term is off by default
(``--dice-weight 0``): the labels are only scored. Defaults are ``field_opt.DEFAULTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

# Compiled levels are kept between runs (one compile per level shape; options are traced values).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "jax_bench"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from scipy import ndimage  # noqa: E402

from promptreg_jax import metrics  # noqa: E402
from promptreg_jax.data.synthetic_anatomy import DOMAINS, make_subject  # noqa: E402
from promptreg_jax.field_opt import DEFAULTS, optimize_field  # noqa: E402
from promptreg_jax.spatial import integrate, warp  # noqa: E402


def random_velocity(shape, amplitude: float, seed: int, smoothness: float = 6.0) -> np.ndarray:
    """A smooth stationary velocity whose exponential has RMS ``amplitude`` voxels."""
    rng = np.random.default_rng(seed)
    sigma = max(shape) / smoothness
    v = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
                  for _ in range(3)], axis=-1).astype(np.float32)[None]
    v *= amplitude / np.sqrt(np.mean(np.sum(np.asarray(integrate(jnp.asarray(v))) ** 2, -1)))
    # One correction, as exp is not linear in v.
    u = np.asarray(integrate(jnp.asarray(v)))
    v *= amplitude / np.sqrt(np.mean(np.sum(u ** 2, -1)))
    return v


def make_pair(domain: str, size: int, index: int, amplitude: float, seed: int = 0,
              smoothness: float = 6.0):
    """``(moving, fixed, moving_label, fixed_label, true_disp)``, images float32 ``(X,Y,Z)``."""
    phases, shape, _, _ = make_subject(domain, size, seed, index)
    image, label = next(iter(phases.values()))
    fixed = image.astype(np.float32)
    v = random_velocity(shape, amplitude, seed=1000 * size + index, smoothness=smoothness)
    true = integrate(jnp.asarray(v))
    back = integrate(jnp.asarray(-v))
    moving = np.asarray(warp(jnp.asarray(fixed)[None, ..., None], back))[0, ..., 0]
    mlabel = np.asarray(warp(jnp.asarray(label, jnp.int32)[None, ..., None], back, order=0))
    return moving, fixed, mlabel[0, ..., 0], label.astype(np.int32), np.asarray(true)[0]


def mean_dice(fixed_label, label) -> float:
    present = [int(l) for l in np.unique(fixed_label) if l > 0]
    return float(np.nanmean(metrics.dice(fixed_label, label, present)))


def evaluate(disp, moving_label, fixed_label, true) -> dict:
    disp = np.asarray(disp)[0]
    warped = np.asarray(warp(jnp.asarray(moving_label)[None, ..., None], jnp.asarray(disp)[None],
                             order=0))[0, ..., 0]
    fg = fixed_label > 0
    return dict(dice=mean_dice(fixed_label, warped),
                epe=float(np.linalg.norm(disp - true, axis=-1)[fg].mean()),
                folded_pct=100.0 * metrics.fraction_nonpositive_jacobian(disp),
                sdlogj=metrics.sdlogj(disp))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--pairs", type=int, nargs="+", default=[10, 3], help="pairs per size")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS))
    p.add_argument("--amplitude", type=float, default=2.5, help="RMS true displacement, voxels")
    p.add_argument("--smoothness", type=float, default=6.0,
                   help="sigma of the random velocity = size / this")
    p.add_argument("--levels", type=float, nargs="+", default=list(DEFAULTS["levels"]))
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULTS["steps"]))
    p.add_argument("--lr", type=float, nargs="+", default=list(DEFAULTS["lr"]))
    p.add_argument("--smooth", type=float, default=DEFAULTS["smooth"])
    p.add_argument("--field-factor", type=int, default=DEFAULTS["field_factor"])
    p.add_argument("--int-steps", type=int, default=DEFAULTS["int_steps"])
    p.add_argument("--dice-weight", type=float, default=0.0)
    p.add_argument("--displacement", action="store_true", help="diffeomorphic=False")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    opts = dict(levels=tuple(args.levels), steps=tuple(args.steps), lr=tuple(args.lr),
                smooth=args.smooth, field_factor=args.field_factor, int_steps=args.int_steps,
                diffeomorphic=not args.displacement, dice_weight=args.dice_weight)
    print(f"# load average {os.getloadavg()[0]:.1f} (timings scale with it on a shared CPU)")
    print(f"# jax {jax.__version__} {jax.default_backend()} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; options {opts}")
    rows, compiled = [], set()
    header = (f"{'size':>4} {'domain':<12} {'shape':<13} {'dice':>13} {'epe':>11} "
              f"{'%fold':>6} {'sdlogj true->est':>16} {'s/pair':>6}")
    print(header)
    for size, n_pairs in zip(args.sizes, args.pairs + [args.pairs[-1]] * len(args.sizes)):
        for i in range(n_pairs):
            domain = args.domains[i % len(args.domains)]
            moving, fixed, ml, fl, true = make_pair(domain, size, i, args.amplitude,
                                                    smoothness=args.smoothness)
            kw = dict(opts)
            if args.dice_weight > 0:
                kw.update(moving_label=ml, fixed_label=fl,
                          num_classes=int(max(ml.max(), fl.max())) + 1)
            compile_s = None
            if fixed.shape not in compiled:  # first call of a shape: compile + run, timed apart
                t = time.perf_counter()
                jax.block_until_ready(optimize_field(moving, fixed, **kw))
                compile_s = time.perf_counter() - t
                compiled.add(fixed.shape)
            t, cpu = time.perf_counter(), time.process_time()
            disp = jax.block_until_ready(optimize_field(moving, fixed, **kw))
            secs, cpu = time.perf_counter() - t, time.process_time() - cpu
            before = evaluate(np.zeros((1, *fixed.shape, 3), np.float32), ml, fl, true)
            after = evaluate(disp, ml, fl, true)
            before["sdlogj"] = metrics.sdlogj(true)  # the true field's, for comparison
            row = dict(size=size, domain=domain, shape=fixed.shape, before=before, after=after,
                       seconds=secs, cpu_seconds=cpu, first_call_s=compile_s)
            rows.append(row)
            extra = "" if compile_s is None else (
                f"  (first call {compile_s:.1f}s: compile ~{compile_s - secs:.1f}s)")
            print(f"{size:>4} {domain:<12} {'x'.join(map(str, fixed.shape)):<13} "
                  f"{before['dice']:.3f}->{after['dice']:.3f} "
                  f"{before['epe']:.2f}->{after['epe']:.2f} {after['folded_pct']:6.3f} "
                  f"{before['sdlogj']:>7.3f}->{after['sdlogj']:.3f} {secs:6.1f} "
                  f"cpu {cpu:5.1f}{extra}"
                  f"  load {os.getloadavg()[0]:.1f}", flush=True)
        sel = [r for r in rows if r["size"] == size]
        m = lambda k, w: float(np.mean([r[w][k] for r in sel]))
        print(f"{size:>4} {'MEAN':<12} {len(sel):>2} pairs      "
              f"{m('dice', 'before'):.3f}->{m('dice', 'after'):.3f} "
              f"{m('epe', 'before'):.2f}->{m('epe', 'after'):.2f} {m('folded_pct', 'after'):6.3f} "
              f"{m('sdlogj', 'before'):>7.3f}->{m('sdlogj', 'after'):.3f} "
              f"{np.mean([r['seconds'] for r in sel]):6.1f}"
              f"  (max %fold {max(r['after']['folded_pct'] for r in sel):.3f}, max sdlogj "
              f"{max(r['after']['sdlogj'] for r in sel):.3f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(options={k: v for k, v in opts.items()}, rows=rows), f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
