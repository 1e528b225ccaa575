"""Evaluation metrics (numpy, host side): Dice, HD95, Jacobian determinant, folding, SDlogJ.

Label maps are integer arrays ``(X, Y, Z)``; displacement fields are ``(X, Y, Z, 3)`` in voxels
(Learn2Reg layout). Definitions follow Learn2Reg (SPEC Appendix B) with the deviations named in
each docstring.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def _labels(a, b, labels):
    if labels is None:
        labels = np.union1d(np.unique(a), np.unique(b))
        labels = labels[labels != 0]
    return [int(l) for l in labels]


def dice(fixed_label, warped_label, labels: Sequence[int] | None = None) -> np.ndarray:
    """Dice ``2|F n W| / (|F| + |W|)`` per label; NaN for a label absent from both maps.

    ``labels`` defaults to every non-zero value present in either map.
    """
    fixed_label = np.asarray(fixed_label)
    warped_label = np.asarray(warped_label)
    if fixed_label.shape != warped_label.shape:
        raise ValueError(f"dice: shapes differ, {fixed_label.shape} vs {warped_label.shape}")
    out = []
    for l in _labels(fixed_label, warped_label, labels):
        f = fixed_label == l
        w = warped_label == l
        denom = f.sum() + w.sum()
        out.append(np.nan if denom == 0 else 2.0 * np.logical_and(f, w).sum() / denom)
    return np.asarray(out, np.float64)


def _surface(mask):
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def hd95(fixed_label, warped_label, labels: Sequence[int] | None = None,
         spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance per label, in mm from ``spacing``.

    The larger of the two directed 95th percentiles of surface-voxel distances (as DeepMind's
    ``compute_robust_hausdorff``, without surfel-area weights). NaN when a label is absent from
    both maps, inf when it is absent from exactly one. Unlike the Learn2Reg script, the spacing
    is used, so the result is in mm on any grid.
    """
    fixed_label = np.asarray(fixed_label)
    warped_label = np.asarray(warped_label)
    spacing = tuple(float(s) for s in spacing)
    out = []
    for l in _labels(fixed_label, warped_label, labels):
        f = fixed_label == l
        w = warped_label == l
        if not f.any() and not w.any():
            out.append(np.nan)
            continue
        if not f.any() or not w.any():
            out.append(np.inf)
            continue
        sf, sw = _surface(f), _surface(w)
        dist_to_w = ndimage.distance_transform_edt(~sw, sampling=spacing)
        dist_to_f = ndimage.distance_transform_edt(~sf, sampling=spacing)
        out.append(max(np.percentile(dist_to_w[sf], 95), np.percentile(dist_to_f[sw], 95)))
    return np.asarray(out, np.float64)


def _jacobian(flow, zero_padded_central: bool):
    flow = np.asarray(flow, np.float64)
    if flow.ndim != 4 or flow.shape[-1] != 3:
        raise ValueError(f"expected a field (X,Y,Z,3), got shape {flow.shape}")
    grads = np.empty(flow.shape[:3] + (3, 3))
    for c in range(3):
        for a in range(3):
            if zero_padded_central:
                kernel = np.zeros((3, 1, 1))
                kernel[:, 0, 0] = (0.5, 0.0, -0.5)
                kernel = np.moveaxis(kernel, 0, a)
                grads[..., c, a] = ndimage.convolve(flow[..., c], kernel, mode="constant")
            else:
                grads[..., c, a] = np.gradient(flow[..., c], axis=a)
    return grads + np.eye(3)


def jacobian_determinant(flow) -> np.ndarray:
    """det(I + grad u) per voxel of a field ``(X, Y, Z, 3)``, gradients by ``np.gradient``."""
    return np.linalg.det(_jacobian(flow, zero_padded_central=False))


def fraction_nonpositive_jacobian(flow) -> float:
    """Fraction of voxels whose Jacobian determinant is <= 0 (folds)."""
    return float(np.mean(jacobian_determinant(flow) <= 0))


def sdlogj(flow, learn2reg_compatible: bool = False) -> float:
    """Standard deviation of log J over the field, 2 voxels cropped off each border.

    Clean form: ``std(log(max(J, 1e-9)))`` with ``np.gradient`` derivatives. With
    ``learn2reg_compatible=True`` it reproduces the official script instead: zero-padded central
    differences and ``log(clip(J + 3, 1e-9, 1e9))`` (the +3 offset is a quirk of that code, which
    compresses the value; see SPEC Appendix B).
    """
    det = np.linalg.det(_jacobian(flow, zero_padded_central=learn2reg_compatible))
    if learn2reg_compatible:
        return float(np.log(np.clip(det[2:-2, 2:-2, 2:-2] + 3.0, 1e-9, 1e9)).std())
    return sdlogj_of_determinant(det)


def sdlogj_of_determinant(jacdet, mask=None) -> float:
    """``sdlogj``'s clean form from a Jacobian determinant map: std of log max(J, 1e-9) with 2
    voxels cropped off each border (NaN for a map too small to crop). With a boolean ``mask`` of
    the map's shape: over the masked voxels instead, uncropped (NaN if none)."""
    det = np.asarray(jacdet, np.float64)
    inner = det[2:-2, 2:-2, 2:-2] if mask is None else det[np.asarray(mask, bool)]
    return float(np.log(np.maximum(inner, 1e-9)).std()) if inner.size else float("nan")


def dsc30(case_scores) -> float:
    """Learn2Reg robustness score: the 30th percentile of per-case mean Dice (NaN-aware)."""
    scores = np.asarray(case_scores, np.float64)
    scores = scores[~np.isnan(scores)]
    return float(np.percentile(scores, 30)) if scores.size else float("nan")
