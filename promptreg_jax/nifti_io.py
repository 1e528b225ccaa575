"""NIfTI geometry and writing: outputs on the fixed file's original grid, in the forms that
Learn2Reg and ITK/ANTs/Slicer read.

Images are loaded in closest-canonical (RAS+) axis order (``promptreg_jax.data.load_volume``);
``from_canonical`` undoes that for writing, and ``field_outputs`` turns a map found on canonical
grids into the fixed file's own grid: voxel displacements (Learn2Reg), world displacements in LPS
millimetres (ITK's convention, intent 1007), and the physical Jacobian determinant.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from promptreg_jax import metrics
from promptreg_jax.spatial import identity_grid

_RAS = np.array([[0, 1], [1, 1], [2, 1]], np.float64)
_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


def from_canonical(array: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undoes ``load_volume``'s closest-canonical reorientation of the first three axes.

    ``array`` is on the canonical grid of a file whose affine is ``original_affine`` (trailing
    axes, e.g. vector components, are carried along unchanged): the result is on the file's own
    grid, voxel for voxel.
    """
    import nibabel as nib
    ornt = nib.orientations.io_orientation(np.asarray(original_affine, np.float64))
    back = nib.orientations.ornt_transform(_RAS, ornt)
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def _apply_affine(affine, points):
    affine = np.asarray(affine, np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


@dataclasses.dataclass
class FieldOutputs:
    """The fixed -> moving map on the fixed file's original grid, in the written forms."""
    disp_voxel: np.ndarray    # (X, Y, Z, 3): moving original voxel = y + u(y) (Learn2Reg)
    disp_world: np.ndarray    # (X, Y, Z, 3): LPS mm, moving point = p + d(p) (ITK)
    jacdet: np.ndarray        # (X, Y, Z): physical Jacobian determinant


def field_outputs(moving_coords_canonical: np.ndarray, fixed, moving) -> FieldOutputs:
    """Converts the map found on canonical grids into the fixed file's original grid.

    ``moving_coords_canonical (X, Y, Z, 3)``: for each voxel of the fixed canonical grid, its
    corresponding position in the moving canonical grid (``identity + resample_flow(...)``).
    ``fixed``/``moving``: the :class:`promptreg_jax.data.Volume` of each image (canonical
    ``affine`` and file ``original_affine``).
    """
    # Moving canonical voxel -> moving file voxel (a permutation and flips of the axes).
    can_to_file = np.linalg.inv(np.asarray(moving.original_affine, np.float64)) @ moving.affine
    moving_vox = _apply_affine(can_to_file, np.asarray(moving_coords_canonical, np.float64))
    moving_vox = from_canonical(moving_vox, fixed.original_affine)   # fixed file's layout
    fixed_vox = np.asarray(identity_grid(moving_vox.shape[:3]), np.float64)
    disp_voxel = moving_vox - fixed_vox
    d_ras = _apply_affine(moving.original_affine, moving_vox) \
        - _apply_affine(fixed.original_affine, fixed_vox)
    disp_world = d_ras * _LPS_FLIP
    ratio = np.linalg.det(np.asarray(moving.original_affine)[:3, :3]) / \
        np.linalg.det(np.asarray(fixed.original_affine)[:3, :3])
    jacdet = metrics.jacobian_determinant(disp_voxel) * ratio
    return FieldOutputs(disp_voxel.astype(np.float32), disp_world.astype(np.float32),
                        jacdet.astype(np.float32))


def save_like(data: np.ndarray, reference, path: str | os.PathLike, dtype=np.float32,
              intent: str | None = None, description: str = "") -> None:
    """Writes ``data`` with the reference NIfTI's affine, qform/sform codes and mm units."""
    import nibabel as nib
    header = reference.header.copy()
    img = nib.Nifti1Image(np.asarray(data, dtype), reference.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units("mm", img.header.get_xyzt_units()[1] or "unknown")
    if intent is None:
        img.header.set_intent("none")
    else:
        img.header.set_intent(intent, (), name="displacement")
    img.header["descrip"] = description.encode()[:79]
    img.header["cal_min"] = img.header["cal_max"] = 0  # the fixed image's display window
    # The fixed file's own geometry fields, so every reader sees the fixed grid exactly.
    q, qcode = reference.header.get_qform(coded=True)
    s, scode = reference.header.get_sform(coded=True)
    img.set_qform(q, int(qcode)) if q is not None else img.set_qform(None)
    img.set_sform(s, int(scode)) if s is not None else img.set_sform(None)
    nib.save(img, os.fspath(path))


def save_world_displacement(disp_world: np.ndarray, reference, path: str | os.PathLike,
                            description: str = "promptreg displacement LPS mm fixed->moving (ITK)"
                            ) -> None:
    """ITK/ANTs displacement field: ``(X, Y, Z, 1, 3)``, intent 1007 (vector), LPS mm."""
    save_like(np.asarray(disp_world, np.float32)[:, :, :, None, :], reference, path,
              intent="vector", description=description)
