"""The QC figure of one registration: orthogonal mid-slices and the deformed grid (PNG)."""

from __future__ import annotations

import os
import warnings

import numpy as np


def _window(image):
    lo, hi = np.percentile(image, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def qc_figure(path, fixed, moving, warped, grid_disp, fixed_spacing, moving_spacing,
              warped_label=None, fixed_label=None, title: str = "") -> None:
    """Orthogonal mid-slices (rows) of fixed, moving, warped, label overlay, deformed grid.

    Arrays are on canonical (RAS) grids; ``grid_disp (X, Y, Z, 3)`` is the field in fixed voxels
    (the moving image's extent scaled onto the fixed grid), whose in-plane part bends the grid.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planes = [("sagittal", 0), ("coronal", 1), ("axial", 2)]
    fig, axes = plt.subplots(3, 5, figsize=(15, 9.5), squeeze=False)
    fw, mw = _window(fixed), _window(moving)
    cols = ["fixed", "moving", "warped moving", "warped label on fixed", "deformed grid"]
    for row, (plane, axis) in enumerate(planes):
        a, b = [i for i in range(3) if i != axis]

        def cut(vol):
            return np.take(vol, vol.shape[axis] // 2, axis=axis).T

        aspect_f = fixed_spacing[b] / fixed_spacing[a]
        aspect_m = moving_spacing[b] / moving_spacing[a]
        show = dict(cmap="gray", origin="lower", interpolation="nearest")
        axes[row, 0].imshow(cut(fixed), vmin=fw[0], vmax=fw[1], aspect=aspect_f, **show)
        axes[row, 1].imshow(cut(moving), vmin=mw[0], vmax=mw[1], aspect=aspect_m, **show)
        axes[row, 2].imshow(cut(warped), vmin=mw[0], vmax=mw[1], aspect=aspect_f, **show)
        axes[row, 3].imshow(cut(fixed), vmin=fw[0], vmax=fw[1], aspect=aspect_f, **show)
        if warped_label is not None:
            lab = cut(warped_label).astype(np.float64)
            axes[row, 3].imshow(np.ma.masked_where(lab == 0, lab), cmap="tab20", alpha=0.45,
                                origin="lower", interpolation="nearest", aspect=aspect_f,
                                vmin=0, vmax=max(float(np.max(warped_label)), 1.0))
        if fixed_label is not None:
            fl = cut(fixed_label)
            if np.any(fl > 0) and fl.shape[0] > 1 and fl.shape[1] > 1:
                axes[row, 3].contour(fl, levels=np.unique(fl[fl > 0]) - 0.5, colors="yellow",
                                     linewidths=0.6, origin="lower")
        axes[row, 4].imshow(cut(fixed), vmin=fw[0], vmax=fw[1], aspect=aspect_f, alpha=0.35,
                            **show)
        disp = np.take(grid_disp, grid_disp.shape[axis] // 2, axis=axis)  # (na, nb, 3)
        na, nb = disp.shape[:2]
        ga, gb = np.meshgrid(np.arange(na), np.arange(nb), indexing="ij")
        pa, pb = ga + disp[..., a], gb + disp[..., b]
        step_a, step_b = max(1, na // 16), max(1, nb // 16)
        for i in range(0, na, step_a):
            axes[row, 4].plot(pa[i, :], pb[i, :], color="tab:red", linewidth=0.6)
        for j in range(0, nb, step_b):
            axes[row, 4].plot(pa[:, j], pb[:, j], color="tab:red", linewidth=0.6)
        axes[row, 4].set_xlim(-0.5, na - 0.5)
        axes[row, 4].set_ylim(-0.5, nb - 0.5)
        for col in range(5):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(cols[col], fontsize=10)
        axes[row, 0].set_ylabel(plane)
    if title:
        fig.suptitle(title, fontsize=11)
    with warnings.catch_warnings():  # titles from file names in scripts the font lacks (CJK)
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing from")
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=80)
    plt.close(fig)
