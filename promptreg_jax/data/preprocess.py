"""Loading, validation, intensity normalisation and resizing of one volume (SPEC section 4).

Volumes are read with nibabel and reoriented to the closest canonical (RAS+) axis order, as
``nib.as_closest_canonical`` does, so that data sets stored in different orientations line up;
the file's own affine is kept as ``original_affine``. Every problem with a file is a one-line
``DataError`` naming it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import Sequence

import nibabel as nib
import numpy as np

from promptreg_jax.spatial import resize
from promptreg_jax.data.errors import DataError

NORM_MODES = ("paper", "reference")
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


@dataclasses.dataclass
class Volume:
    """A 3D volume in canonical (RAS+) axis order at its native resolution."""
    data: np.ndarray                 # (X, Y, Z), float32 for images, int32 for labels
    affine: np.ndarray               # 4x4 voxel -> world of ``data``
    original_affine: np.ndarray      # 4x4 as stored in the file
    spacing: tuple[float, ...]       # voxel size along X, Y, Z of ``data`` (mm)
    file_shape: tuple[int, ...]      # shape as stored (4D for cine files)

    def meta(self, path: str, frame: int | None) -> dict:
        """JSON-able metadata; ``original_shape`` is the native-resolution canonical shape."""
        return dict(path=os.path.abspath(path), frame=frame, original_shape=list(self.data.shape),
                    file_shape=list(self.file_shape), spacing=[float(s) for s in self.spacing],
                    affine=self.affine.tolist(), original_affine=self.original_affine.tolist())


def _check_gzip_stream(path: str) -> None:
    """Raises DataError if a .gz file does not decompress to its end (truncated or corrupt)."""
    if not path.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    except (_GZIP_ERRORS + (OSError,)) as e:
        raise DataError(path, f"corrupt or truncated gzip data ({e})")


def _open(path: str):
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise DataError(path, "empty file (0 bytes)")
    if path.endswith(".gz"):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise DataError(path, "named .gz but not gzip-compressed (corrupt file?)")
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises many types for files it cannot parse
        _check_gzip_stream(path)
        raise DataError(path, f"not a readable NIfTI file ({type(e).__name__}: {e})")
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"not NIfTI (nibabel reads it as {type(img).__name__}); convert it "
                              f"to .nii/.nii.gz")
    return img


def volume_shape(path: str, shape, frame: int | None,
                 no_frame_hint: str = "the pair must name moving_frame/fixed_frame") -> tuple:
    """A file's shape without trailing unit axes, checked: 3D, or 4D with a valid ``frame``."""
    shape = tuple(int(n) for n in shape)
    squeezed = shape
    while len(squeezed) > 3 and squeezed[-1] == 1 and (frame is None or len(squeezed) > 4):
        squeezed = squeezed[:-1]
    if len(squeezed) < 3 or len(squeezed) > 4:
        raise DataError(path, f"not a 3D volume (shape {shape})")
    if len(squeezed) == 3 and frame is not None:
        raise DataError(path, f"frame {frame} given but the file is 3D (shape {shape})")
    if len(squeezed) == 4 and frame is None:
        raise DataError(path, f"4D file (shape {shape}): {no_frame_hint}")
    if frame is not None and not 0 <= frame < squeezed[3]:
        raise DataError(path, f"frame {frame} out of range: the file has {squeezed[3]} frames")
    return squeezed


def check_header(path: str, frame: int | None = None, no_frame_hint: str = "") -> None:
    """``load_volume``'s checks that need only the header (no voxel data is read)."""
    img = _open(os.fspath(path))
    volume_shape(os.fspath(path), img.shape, frame,
                 no_frame_hint or "the pair must name moving_frame/fixed_frame")


def load_volume(path: str, frame: int | None = None) -> Volume:
    """Reads a 3D volume (or frame ``frame`` of a 4D file's last axis) as float32, canonical axes.

    Raises DataError for a missing, corrupt, truncated or non-NIfTI file, a file that is not 3D
    (4D without a frame), a frame out of range, and NaN/inf voxels.
    """
    path = os.fspath(path)
    img = _open(path)
    shape = tuple(int(n) for n in img.shape)
    squeezed = volume_shape(path, shape, frame)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(squeezed)
    except Exception as e:  # gzip/zlib errors, short reads, bad scaling: report the gzip cause
        _check_gzip_stream(path)
        raise DataError(path, f"cannot read the voxel data, file truncated? ({type(e).__name__}: {e})")
    if frame is not None:
        data = data[..., frame]
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(path, f"{bad} NaN/inf voxels")
    affine = np.asarray(img.affine, np.float64)
    try:
        ornt = nib.orientations.io_orientation(affine)
        data = nib.orientations.apply_orientation(data, ornt)
        canonical = affine @ nib.orientations.inv_ornt_aff(ornt, squeezed[:3])
    except Exception as e:
        raise DataError(path, f"invalid affine, cannot reorient ({e})")
    spacing = tuple(float(s) for s in np.sqrt((canonical[:3, :3] ** 2).sum(axis=0)))
    return Volume(np.ascontiguousarray(data, np.float32), canonical, affine, spacing, shape)


def load_image(path: str, frame: int | None = None) -> Volume:
    """``load_volume`` plus the image checks: a constant image is an error."""
    vol = load_volume(path, frame)
    lo, hi = float(vol.data.min()), float(vol.data.max())
    if lo == hi:
        raise DataError(path, f"constant image (every voxel is {lo:g})")
    return vol


def apply_label_map(labels: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """Maps source values to classes; values absent from the map become background 0."""
    if not label_map:
        return labels
    values, inverse = np.unique(labels, return_inverse=True)
    mapped = np.asarray([label_map.get(int(v), 0) for v in values], np.int32)
    return mapped[inverse].reshape(labels.shape)


def load_label(path: str, frame: int | None, num_classes: int,
               label_map: dict[int, int] | None = None) -> Volume:
    """``load_volume`` plus label checks; ``data`` is int32 in ``0..num_classes-1``.

    Raises DataError for non-integer or negative values, values above ``num_classes - 1`` after
    ``label_map``, and a label map that is all background.
    """
    vol = load_volume(path, frame)
    data = vol.data
    rounded = np.rint(data)
    off = data != rounded
    if off.any():
        raise DataError(path, f"non-integer label values (e.g. {float(data[off][0]):g}); is this an "
                              f"image rather than a label map?")
    if rounded.min() < 0:
        raise DataError(path, f"negative label value {int(rounded.min())}")
    labels = apply_label_map(rounded.astype(np.int32), label_map)
    top = int(labels.max())
    if top > num_classes - 1:
        raise DataError(path, f"label value {top} above num_classes - 1 = {num_classes - 1}"
                              f"{' after label_map' if label_map else ''}; set the domain's "
                              f"num_classes or label_map")
    if top == 0:
        raise DataError(path, "empty label map (only background"
                              f"{' after label_map' if label_map else ''})")
    vol.data = labels
    return vol


def check_same_grid(image_path: str, image_shape: Sequence[int], label_path: str,
                    label_shape: Sequence[int]) -> None:
    """Raises DataError when a label does not share its image's voxel grid."""
    if tuple(image_shape) != tuple(label_shape):
        raise DataError(label_path, f"label shape {tuple(label_shape)} differs from its image "
                                    f"{image_path} shape {tuple(image_shape)}")


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def normalize(image: np.ndarray, modality: str, mode: str = "paper") -> np.ndarray:
    """Intensities to ``[0, 1]`` (SPEC section 0 and 4).

    ``paper``: CT clipped to [-1000, 1000] HU then mapped linearly; MR clipped at its 99th
    percentile then min-max. ``reference`` (the authors' code): CT clipped to [-1024, 1024] then
    min-max of the clipped volume; MR clipped to [p1, p99] then ``(x - p1) / (p99 - p1)``.
    """
    x = np.asarray(image, np.float32)
    if mode not in NORM_MODES:
        raise ValueError(f"normalize: mode {mode!r} unknown; use one of {NORM_MODES}")
    if modality == "ct":
        lo, hi = (-1000.0, 1000.0) if mode == "paper" else (-1024.0, 1024.0)
        x = np.clip(x, lo, hi)
        out = (x - lo) / (hi - lo) if mode == "paper" else _minmax(x)
    elif modality == "mr":
        if mode == "paper":
            out = _minmax(np.minimum(x, np.float32(np.percentile(x, 99))))
        else:
            p1, p99 = (np.float32(v) for v in np.percentile(x, [1, 99]))
            out = (np.clip(x, p1, p99) - p1) / (p99 - p1) if p99 > p1 else _minmax(x)
    else:
        raise ValueError(f"normalize: modality {modality!r} unknown; use 'ct' or 'mr'")
    return np.asarray(out, np.float32)


def resize_image(image: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
    """Align-corners trilinear resize of a 3D array (the reference's ``F.interpolate``)."""
    return resize(np.asarray(image, np.float32)[None, ..., None], image_size, order=1)[0, ..., 0]


def resize_label(labels: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
    """PyTorch legacy nearest resize of a 3D label array, int32."""
    return resize(np.asarray(labels, np.int32)[None, ..., None], image_size, order=0)[0, ..., 0]


def prepare_image(path: str, frame: int | None, modality: str, norm_mode: str,
                  image_size: Sequence[int]) -> tuple[np.ndarray, dict]:
    """Load, check, normalise and resize: ``(image (X,Y,Z) float32 at image_size, meta)``."""
    vol = load_image(path, frame)
    image = resize_image(normalize(vol.data, modality, norm_mode), image_size)
    return np.ascontiguousarray(image, np.float32), vol.meta(path, frame)


def prepare_label(path: str, frame: int | None, num_classes: int,
                  label_map: dict[int, int] | None, image_size: Sequence[int]):
    """Load, check and resize: ``(labels at image_size, labels at native resolution, meta)``."""
    vol = load_label(path, frame, num_classes, label_map)
    return resize_label(vol.data, image_size), vol.data, vol.meta(path, frame)
