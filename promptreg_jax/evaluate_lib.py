"""Evaluation at original resolution: the network's field resampled to each fixed image's grid.

The network sees both images resized to ``image_size``; its field ``u`` lives on that grid. For a
fixed original of shape ``F`` and a moving original of shape ``M`` (which may differ),
``resample_flow(u, F, M)`` gives ``d`` on the fixed grid, pointing into the moving grid, and
the moving labels are pulled with nearest interpolation: ``warped(y) = moving_label(y + d(y))``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import jax
import numpy as np

from promptreg_jax import metrics
from promptreg_jax.spatial import identity_grid, resample_flow, sample


def fixed_grid_displacement(flow_net, fixed_shape, moving_shape) -> np.ndarray:
    """The network-grid field ``flow_net (X, Y, Z, 3)`` as a map of the original grids: fixed
    voxel ``y`` lies at moving voxel ``y + d(y)``; returns ``d (X', Y', Z', 3)`` float32
    (``resample_flow``: each image's box onto the other)."""
    return np.asarray(resample_flow(np.asarray(flow_net, np.float32)[None], fixed_shape,
                                    moving_shape=moving_shape))[0]


def box_scale(fixed_shape, moving_shape) -> np.ndarray:
    """Moving voxels per fixed voxel along each axis of the box map, each image's extent onto the
    other (align-corners): fixed voxel ``y`` lies at moving voxel ``s * y`` without registration,
    so a map ``coords`` is the fixed-grid displacement ``(coords - s * y) / s``."""
    return ((np.asarray(moving_shape, np.float32) - 1)
            / np.maximum(np.asarray(fixed_shape, np.float32) - 1, 1))


def sample_at(volume, coords, order: int = 1) -> np.ndarray:
    """``volume (X', Y', Z')`` sampled at ``coords (X, Y, Z, 3)`` (order 1 linear, 0 nearest)."""
    dtype = np.int32 if order == 0 else np.float32
    out = sample(np.asarray(volume, dtype)[None, ..., None], np.asarray(coords)[None], order=order)
    return np.asarray(out[0, ..., 0])


def warp_labels_to_fixed(flow_net, moving_label, fixed_shape):
    """Warps an original-resolution label map ``(X', Y', Z')`` onto the fixed original grid;
    returns ``(warped labels, displacement (X, Y, Z, 3) in fixed voxels)``."""
    d = fixed_grid_displacement(flow_net, fixed_shape, moving_label.shape)
    return sample_at(moving_label, np.asarray(identity_grid(fixed_shape)) + d, order=0), d


def nanmean(values) -> float:
    """Mean over the non-NaN values; NaN when there are none (no warning)."""
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def pair_metrics(flow_net, moving_label, fixed_label, labels, spacing,
                 learn2reg_sdlogj: bool = False) -> dict:
    """All metrics of one pair from the network-grid field ``(X, Y, Z, 3)``."""
    warped, d = warp_labels_to_fixed(flow_net, moving_label, fixed_label.shape)
    dice = metrics.dice(fixed_label, warped, labels)
    with np.errstate(invalid="ignore"):
        hd = metrics.hd95(fixed_label, warped, labels, spacing)
    finite_hd = hd[np.isfinite(hd)]
    return {
        "dice": nanmean(dice),
        "dice_per_label": [None if np.isnan(v) else float(v) for v in dice],
        "hd95": float(np.mean(finite_hd)) if finite_hd.size else float("nan"),
        "neg_jacobian_pct": 100.0 * metrics.fraction_nonpositive_jacobian(d),
        "sdlogj": metrics.sdlogj(d, learn2reg_compatible=learn2reg_sdlogj),
    }


def field_metrics(flow_net, fixed_shape, moving_shape, learn2reg_sdlogj: bool = False) -> dict:
    """The label-free metrics of one pair: folding and SDlogJ of the field on the fixed grid."""
    d = fixed_grid_displacement(flow_net, fixed_shape, moving_shape)
    nan = float("nan")
    return {"dice": nan, "dice_per_label": [], "hd95": nan,
            "neg_jacobian_pct": 100.0 * metrics.fraction_nonpositive_jacobian(d),
            "sdlogj": metrics.sdlogj(d, learn2reg_compatible=learn2reg_sdlogj)}


def _spacing(item) -> tuple:
    if "fixed_spacing" in item:
        return tuple(item["fixed_spacing"])
    meta = item.get("fixed_meta") or {}
    return tuple(meta.get("spacing", (1.0, 1.0, 1.0)))


def _original_shape(item, side: str):
    label = item.get(f"{side}_label_orig")
    if label is not None:
        return label.shape
    return tuple(item[f"{side}_meta"]["original_shape"])


def predict_fn(model):
    """``predict(params, moving, fixed) -> (flow, prompt_weights)``, jitted, no task id (inference).

    The one inference program shared by evaluation and registration (one compilation per shape).
    On the CPU it is compiled with XLA's memory-optimised scheduler
    (``memory.cpu_compiler_options``: 160^3 needs 2.4 GiB of temporaries instead of 3.7).
    """
    from promptreg_jax.memory import cpu_compiler_options
    return jax.jit(lambda p, m, f: _apply_flow_weights(model, p, m, f),
                   compiler_options=cpu_compiler_options() or None)


def _apply_flow_weights(model, params, moving, fixed):
    out = model.apply({"params": params}, moving, fixed, None)
    return out["flow"], out["prompt_weights"]


def evaluate_pairs(predict: Callable, items: Iterable[dict], num_classes: int,
                   with_identity: bool = True, learn2reg_sdlogj: bool = False) -> list[dict]:
    """Runs ``predict(moving, fixed) -> (flow (1,X,Y,Z,3), prompt_weights (1,Z))`` on each item.

    Each item has network-size ``moving``/``fixed`` ``(1, X, Y, Z, 1)``, original-resolution
    ``moving_label_orig``/``fixed_label_orig`` and the fixed voxel size (``fixed_spacing``, else
    ``fixed_meta["spacing"]``, else 1 mm). A pair without labels (either label None) gets NaN
    Dice/HD95 and its field metrics, the grids then taken from ``*_meta["original_shape"]``.
    Returns one row per pair, with the identity (before registration) Dice when
    ``with_identity``. ``runtime_s`` is the network's time for the pair (results on the host).
    """
    labels = list(range(1, num_classes))
    rows = []
    for item in items:
        t0 = time.perf_counter()
        flow, weights = predict(item["moving"], item["fixed"])
        flow = np.asarray(jax.device_get(flow))[0]
        runtime = time.perf_counter() - t0
        has_labels = item.get("moving_label_orig") is not None \
            and item.get("fixed_label_orig") is not None
        if has_labels:
            row = pair_metrics(flow, item["moving_label_orig"], item["fixed_label_orig"], labels,
                               _spacing(item), learn2reg_sdlogj)
        else:
            row = field_metrics(flow, _original_shape(item, "fixed"),
                                _original_shape(item, "moving"), learn2reg_sdlogj)
        row["runtime_s"] = runtime
        row["prompt_weights"] = [float(w) for w in np.asarray(weights)[0]]
        if with_identity and has_labels:
            warped, _ = warp_labels_to_fixed(np.zeros_like(flow), item["moving_label_orig"],
                                             item["fixed_label_orig"].shape)
            before = metrics.dice(item["fixed_label_orig"], warped, labels)
            row["dice_before"] = nanmean(before)
        for key in ("pair_id", "moving_path", "fixed_path"):
            if key in item:
                row[key] = item[key]
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Mean, std and DSC30 over pairs, as Learn2Reg reports them."""
    out = {"pairs": len(rows)}
    for key in ("dice", "dice_before", "hd95", "neg_jacobian_pct", "sdlogj", "runtime_s"):
        vals = np.asarray([r[key] for r in rows if key in r], np.float64)
        if vals.size:
            out[f"{key}_mean"] = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan")
            out[f"{key}_std"] = float(np.nanstd(vals)) if np.any(~np.isnan(vals)) else float("nan")
    if rows:
        out["dsc30"] = metrics.dsc30([r["dice"] for r in rows])
    return out
