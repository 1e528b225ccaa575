"""Registers image pairs with a trained PromptReg: warped image and labels, displacement fields.

    python -m promptreg_jax.register --fixed F.nii.gz --moving M.nii.gz (--workdir RUN | --checkpoint PATH)
        --out DIR [--moving-label L] [--fixed-label L] [--fixed-modality ct|mr]
        [--moving-modality ct|mr] [--fixed-frame N] [--moving-frame N]
        [--io-steps N] [--io-lr 1e-5] [--io-smooth W] [--io-dice W] [--no-qc] [--quiet]
    python -m promptreg_jax.register --pairs pairs.csv (--workdir RUN | --checkpoint PATH) --out DIR

``pairs.csv`` has columns ``fixed, moving`` and optionally ``fixed_label, moving_label,
fixed_modality, moving_modality, fixed_frame, moving_frame`` (paths relative to the CSV's folder);
its pairs run in one process, under a progress bar, from the same trained parameters.

Inputs are read with nibabel in closest-canonical (RAS+) axis order and preprocessed as in training
(the checkpoint's ``data.norm_mode`` intensity window and ``data.image_size``). The modality is
``--*-modality``, else ``ct`` when the image minimum is below -500, else ``mr``. Every output is
written back on the **fixed file's original grid**: its shape, axis order and affine (qform/sform
as in the fixed file). Per pair ``NAME = <fixed>_<moving>`` (a Learn2Reg file name
``TASK_0001_0000`` contributes its case id ``0001``):

* ``warped_NAME.nii.gz``: the moving image (raw intensities, trilinear) on the fixed grid;
* ``warped_label_NAME.nii.gz``: the moving label, nearest interpolation (with ``--moving-label``);
* ``disp_NAME.nii.gz``: Learn2Reg layout ``(X, Y, Z, 3)`` float32, in voxels: fixed voxel ``y``
  corresponds to moving voxel ``y + u(y)`` (channel i along array axis i of each file's own
  grid), so ``moving(y + u(y))`` is the warped moving image;
* ``disp_world_NAME.nii.gz``: the same map in world units for ITK/ANTs/Slicer: 5D
  ``(X, Y, Z, 1, 3)`` float32, ``intent_code`` 1007 (NIFTI_INTENT_VECTOR), millimetres, **LPS**
  components. ITK's convention for a displacement field transform is that it maps a fixed
  physical point ``p`` to ``p + d(p)`` in the moving image; ITK's physical space is LPS while the
  NIfTI affine gives RAS, and ITK does not convert the components of a VECTOR-intent file, so
  the x and y components are stored negated: ``d_LPS = (-d_R, -d_A, d_S)`` with
  ``d_RAS = A_moving (y + u) - A_fixed y``. Use it as
  ``antsApplyTransforms -d 3 -i M.nii.gz -r F.nii.gz -t disp_world_NAME.nii.gz -o W.nii.gz``;
* ``jacdet_NAME.nii.gz``: the Jacobian determinant of the map fixed -> moving in physical units
  (local volume ratio; <= 0 where the field folds);
* ``qc_NAME.png``: orthogonal mid-slices of fixed, moving, warped, a label overlay and the
  deformed grid (with ``--no-qc``, none);
* ``registration.csv``: one row per pair: runtime, Dice before/after (with both labels),
  folding, SDlogJ, and the prompt weights against the training domains.

The prompt weights are printed per pair: which training domain the pair resembles.
``--io-steps N`` runs N steps of instance optimisation per pair (``promptreg_jax.instance_opt``);
the trained parameters are never changed by it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import pathlib
import re
import sys
import time
from typing import Sequence

import numpy as np

log = logging.getLogger("promptreg_jax.register")

MODALITIES = ("ct", "mr")
CT_MIN_THRESHOLD = -500.0
_RAS = np.array([[0, 1], [1, 1], [2, 1]], np.float64)
_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------ geometry
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


def _identity(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                indexing="ij"), axis=-1)


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
    from promptreg_jax import metrics
    # Moving canonical voxel -> moving file voxel (a permutation and flips of the axes).
    can_to_file = np.linalg.inv(np.asarray(moving.original_affine, np.float64)) @ moving.affine
    moving_vox = _apply_affine(can_to_file, np.asarray(moving_coords_canonical, np.float64))
    moving_vox = from_canonical(moving_vox, fixed.original_affine)   # fixed file's layout
    fixed_vox = _identity(moving_vox.shape[:3])
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


def save_world_displacement(disp_world: np.ndarray, reference, path: str | os.PathLike) -> None:
    """ITK/ANTs displacement field: ``(X, Y, Z, 1, 3)``, intent 1007 (vector), LPS mm."""
    save_like(np.asarray(disp_world, np.float32)[:, :, :, None, :], reference, path,
              intent="vector", description="promptreg displacement LPS mm fixed->moving (ITK)")


# ------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class PairSpec:
    """One pair to register; labels, modalities and frames are optional."""
    fixed: str
    moving: str
    fixed_label: str | None = None
    moving_label: str | None = None
    fixed_modality: str | None = None
    moving_modality: str | None = None
    fixed_frame: int | None = None
    moving_frame: int | None = None
    source: str = "command line"


def _check_modality(value, where: str):
    if value in (None, ""):
        return None
    value = str(value).lower()
    if value not in MODALITIES:
        raise ValueError(f"{where}: modality {value!r} unknown; use ct or mr")
    return value


def _frame(value, where: str):
    if value in (None, ""):
        return None
    try:
        frame = int(value)
    except ValueError:
        raise ValueError(f"{where}: frame {value!r} is not an integer")
    if frame < 0:
        raise ValueError(f"{where}: frame {frame} is negative")
    return frame


def read_pairs_csv(path: str | os.PathLike) -> list[PairSpec]:
    """``fixed, moving[, fixed_label, moving_label, *_modality, *_frame]``; relative to the CSV."""
    from promptreg_jax.data import DataError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    root = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("fixed", "moving") if c not in header]
            if missing:
                raise DataError(path, f"missing column(s) {missing}; header is {header}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"not a readable CSV ({e})")
    resolve = lambda v: os.path.normpath(os.path.join(root, v)) if v else None  # noqa: E731
    pairs = []
    for i, r in enumerate(rows, start=2):
        where = f"{path} row {i}"
        if not r.get("fixed") or not r.get("moving"):
            raise DataError(path, f"row {i}: empty fixed or moving")
        pairs.append(PairSpec(resolve(r["fixed"]), resolve(r["moving"]),
                              resolve(r.get("fixed_label", "")), resolve(r.get("moving_label", "")),
                              _check_modality(r.get("fixed_modality"), where),
                              _check_modality(r.get("moving_modality"), where),
                              _frame(r.get("fixed_frame"), where),
                              _frame(r.get("moving_frame"), where), source=f"{path} row {i}"))
    if not pairs:
        raise DataError(path, "lists no pairs")
    return pairs


def check_inputs(pairs: Sequence[PairSpec]) -> None:
    """Fails fast, before any model work, on a missing input file or a 4D file without a frame."""
    import nibabel as nib
    from promptreg_jax.data import DataError
    for p in pairs:
        for kind, path, frame in (("fixed", p.fixed, p.fixed_frame),
                                  ("moving", p.moving, p.moving_frame),
                                  ("fixed_label", p.fixed_label, p.fixed_frame),
                                  ("moving_label", p.moving_label, p.moving_frame)):
            if path is None:
                continue
            if not os.path.isfile(path):
                raise DataError(path, f"file not found ({kind}, {p.source})")
            try:
                shape = nib.load(path).shape
            except Exception:  # noqa: BLE001 - load_volume reports unreadable files precisely
                continue
            squeezed = list(shape)
            while len(squeezed) > 3 and squeezed[-1] == 1:
                squeezed.pop()
            if len(squeezed) == 4 and frame is None:
                side = kind.split("_")[0]
                raise DataError(path, f"4D file (shape {tuple(shape)}): choose a frame with "
                                      f"--{side}-frame N (or a {side}_frame column)")


def guess_modality(image: np.ndarray) -> str:
    """``ct`` when the minimum is below -500 (Hounsfield units), else ``mr``."""
    return "ct" if float(np.min(image)) < CT_MIN_THRESHOLD else "mr"


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[:-len(ext)]
    return os.path.splitext(name)[0]


def case_name(path: str, frame: int | None = None) -> str:
    """Learn2Reg ``TASK_0001_0000`` -> ``0001``; otherwise the file stem (plus the frame)."""
    stem = _stem(path)
    m = re.fullmatch(r".*?_(\d{4})_(\d{4})", stem)
    name = m.group(1) if m else stem
    return name if frame is None else f"{name}_t{frame}"


# ------------------------------------------------------------------------------------ registration
class Registrar:
    """A trained network plus its preprocessing; ``register(pair, out_dir)`` writes the outputs.

    ``params`` are only read: instance optimisation works on a copy per pair.
    """

    def __init__(self, model, params, meta: dict, io_steps: int = 0, io_lr: float = 1e-5,
                 io_weights: dict | None = None, qc: bool = True):
        from promptreg_jax import evaluate_lib
        self.model, self.params, self.meta = model, params, meta
        config = meta.get("config") or {}
        data = config.get("data", {})
        self.image_size = tuple(int(s) for s in
                                meta["model"].get("image_size") or data.get("image_size"))
        self.norm_mode = data.get("norm_mode", "paper")
        self.domains = list(meta.get("domains", []))
        self.io_steps, self.io_lr, self.qc = int(io_steps), float(io_lr), qc
        loss = config.get("loss", {})
        self.io_weights = {"mind": float(loss.get("mind", 1.0)),
                           "smooth": float(loss.get("smooth", 0.1)), "dice": 1.0}
        self.io_weights.update({k: float(v) for k, v in (io_weights or {}).items()
                                if v is not None})
        if self.io_steps < 0:
            raise ValueError(f"--io-steps {self.io_steps} is negative")
        if self.io_steps and not self.io_lr > 0:
            raise ValueError(f"--io-lr {self.io_lr} must be positive")
        self.predict = evaluate_lib.predict_fn(model)
        self._compiled = False

    def _warm_up(self):
        """Compiles the network once, outside the timed part of the first pair."""
        import jax
        if not self._compiled:
            x = np.zeros((1, *self.image_size, 1), np.float32)
            jax.block_until_ready(self.predict(self.params, x, x))
            self._compiled = True

    # -- preprocessing ------------------------------------------------------------------------
    def _load(self, path, frame, modality):
        from promptreg_jax.data.preprocess import load_image, normalize, resize_image
        vol = load_image(path, frame)
        modality = modality or guess_modality(vol.data)
        net = resize_image(normalize(vol.data, modality, self.norm_mode), self.image_size)
        return vol, modality, np.asarray(net, np.float32)[None, ..., None]

    def _load_label(self, path, frame, image_path, image_vol):
        from promptreg_jax.data.preprocess import check_same_grid, load_label, resize_label
        if path is None:
            return None, None
        vol = load_label(path, frame, num_classes=np.iinfo(np.int32).max)
        check_same_grid(image_path, image_vol.data.shape, path, vol.data.shape)
        return vol, resize_label(vol.data, self.image_size)[None]

    # -- one pair -----------------------------------------------------------------------------
    def register(self, pair: PairSpec, out_dir: str | os.PathLike, name: str | None = None) -> dict:
        """Registers one pair and writes its files into ``out_dir``; returns its summary row."""
        import jax
        import nibabel as nib
        from promptreg_jax import metrics
        from promptreg_jax.instance_opt import instance_optimize
        from promptreg_jax.spatial import resample_flow, sample

        out_dir = pathlib.Path(out_dir)
        name = name or f"{case_name(pair.fixed, pair.fixed_frame)}_" \
                       f"{case_name(pair.moving, pair.moving_frame)}"
        fixed, fmod, f_net = self._load(pair.fixed, pair.fixed_frame, pair.fixed_modality)
        moving, mmod, m_net = self._load(pair.moving, pair.moving_frame, pair.moving_modality)
        f_lab, f_lab_net = self._load_label(pair.fixed_label, pair.fixed_frame, pair.fixed, fixed)
        m_lab, m_lab_net = self._load_label(pair.moving_label, pair.moving_frame, pair.moving,
                                            moving)

        self._warm_up()
        t0 = time.perf_counter()
        params = self.params
        if self.io_steps:
            both = f_lab_net is not None and m_lab_net is not None
            params = instance_optimize(self.model, self.params, m_net, f_net, self.io_steps,
                                       self.io_lr, self.io_weights,
                                       m_lab_net if both else None, f_lab_net if both else None)
        flow, weights = self.predict(params, m_net, f_net)
        flow, weights = (np.asarray(a) for a in jax.device_get((flow, weights)))
        runtime = time.perf_counter() - t0

        # Canonical grids: fixed voxel y <-> moving voxel y + d(y).
        fshape, mshape = fixed.data.shape, moving.data.shape
        d = np.asarray(resample_flow(flow, fshape, moving_shape=mshape))[0]
        coords = np.asarray(_identity(fshape), np.float32) + d
        warped = np.asarray(sample(moving.data[None, ..., None], coords[None], order=1))[0, ..., 0]
        warped_label = None
        if m_lab is not None:
            warped_label = np.asarray(sample(m_lab.data[None, ..., None], coords[None],
                                             order=0))[0, ..., 0]
        fields = field_outputs(coords, fixed, moving)

        reference = nib.load(pair.fixed)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {"warped": out_dir / f"warped_{name}.nii.gz",
                 "disp": out_dir / f"disp_{name}.nii.gz",
                 "disp_world": out_dir / f"disp_world_{name}.nii.gz",
                 "jacdet": out_dir / f"jacdet_{name}.nii.gz"}
        save_like(from_canonical(warped, fixed.original_affine), reference, files["warped"],
                  description="promptreg warped moving image")
        if warped_label is not None:
            files["warped_label"] = out_dir / f"warped_label_{name}.nii.gz"
            top = int(warped_label.max())
            save_like(from_canonical(warped_label, fixed.original_affine), reference,
                      files["warped_label"], dtype=np.uint8 if top < 256 else
                      (np.int16 if top < 32768 else np.int32),
                      description="promptreg warped moving label (nearest)")
        save_like(fields.disp_voxel, reference, files["disp"],
                  description="promptreg displacement, fixed voxels (Learn2Reg)")
        save_world_displacement(fields.disp_world, reference, files["disp_world"])
        save_like(fields.jacdet, reference, files["jacdet"],
                  description="promptreg Jacobian determinant fixed->moving")

        row = {"name": name, "fixed": pair.fixed, "moving": pair.moving,
               "fixed_modality": fmod, "moving_modality": mmod, "runtime_s": runtime,
               "io_steps": self.io_steps,
               "neg_jacobian_pct": 100.0 * float(np.mean(fields.jacdet <= 0)),
               "sdlogj": sdlogj_of(fields.jacdet)}
        if warped_label is not None and f_lab is not None:
            # Before registration: the network's identity, i.e. each image's box onto the other.
            box = np.asarray(resample_flow(np.zeros((1, *self.image_size, 3), np.float32),
                                           fshape, moving_shape=mshape))[0]
            before = np.asarray(sample(m_lab.data[None, ..., None],
                                       (_identity(fshape) + box).astype(np.float32)[None],
                                       order=0))[0, ..., 0]
            row["dice_before"] = _nanmean(metrics.dice(f_lab.data, before))
            row["dice"] = _nanmean(metrics.dice(f_lab.data, warped_label))
        w = weights[0] if weights.ndim == 2 else weights
        row["prompt_weights"] = dict(zip(self.domains, [float(v) for v in w]))
        row["closest_domain"] = self.domains[int(np.argmax(w))] if w.size and self.domains else ""
        if self.qc:
            files["qc"] = out_dir / f"qc_{name}.png"
            grid_disp = np.asarray(resample_flow(flow, fshape))[0]
            qc_figure(files["qc"], fixed.data, moving.data, warped, grid_disp,
                      fixed.spacing, moving.spacing,
                      warped_label=warped_label,
                      fixed_label=None if f_lab is None else f_lab.data,
                      title=f"{_stem(pair.fixed)} <- {_stem(pair.moving)}")
        row["files"] = {k: str(v) for k, v in files.items()}
        return row


def sdlogj_of(jacdet: np.ndarray) -> float:
    """``metrics.sdlogj``'s clean form from a Jacobian map: std of log J, 2 voxels cropped."""
    inner = np.asarray(jacdet, np.float64)[2:-2, 2:-2, 2:-2]
    return float(np.log(np.maximum(inner, 1e-9)).std()) if inner.size else float("nan")


def _nanmean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def describe_weights(row: dict) -> str:
    """One line: the prompt weights per training domain and the closest one."""
    weights = row.get("prompt_weights") or {}
    if not weights:
        return "prompt weights: none (this model has no prompt generator)"
    parts = "  ".join(f"{k} {v:.3f}" for k, v in weights.items())
    return f"prompt weights: {parts}  -> resembles {row['closest_domain']}"


# ------------------------------------------------------------------------------------ QC figure
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
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------ batch
def unique_names(pairs: Sequence[PairSpec]) -> list[str]:
    """``<fixed>_<moving>`` per pair, with ``_<index>`` added where two pairs would collide."""
    names = [f"{case_name(p.fixed, p.fixed_frame)}_{case_name(p.moving, p.moving_frame)}"
             for p in pairs]
    counts = {n: names.count(n) for n in names}
    return [n if counts[n] == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def register_pairs(registrar: Registrar, pairs: Sequence[PairSpec], out_dir,
                   progress: bool = True, echo=print) -> list[dict]:
    """Registers every pair (tqdm bar for several), writes ``registration.csv``; returns rows."""
    from tqdm import tqdm
    check_inputs(pairs)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(list(zip(pairs, unique_names(pairs))), desc="register", unit="pair",
               disable=not progress or len(pairs) < 2, file=sys.stderr)
    for pair, name in bar:
        row = registrar.register(pair, out_dir, name)
        rows.append(row)
        msg = f"{name}: {describe_weights(row)}"
        if "dice" in row:
            msg += f"; Dice {row['dice_before']:.3f} -> {row['dice']:.3f}"
        msg += f"; {row['neg_jacobian_pct']:.3f}% |J|<=0; {row['runtime_s']:.2f} s"
        (bar.write if len(pairs) > 1 and progress else echo)(msg)
    write_summary(out_dir / "registration.csv", rows, registrar.domains)
    return rows


def write_summary(path, rows: list[dict], domains: list[str]) -> None:
    fields = ["name", "fixed", "moving", "fixed_modality", "moving_modality", "io_steps",
              "runtime_s", "dice_before", "dice", "neg_jacobian_pct", "sdlogj", "closest_domain"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + [f"w_{d}" for d in domains])
        for r in rows:
            vals = [r.get(k, "") for k in fields]
            vals = [f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else
                    ("nan" if isinstance(v, float) else v) for v in vals]
            w.writerow(vals + [f"{r['prompt_weights'].get(d, float('nan')):.6g}" for d in domains])


# ------------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"error: {message}\n")


def _parser():
    p = _Parser(prog="python -m promptreg_jax.register",
                description="Register image pairs with a trained PromptReg checkpoint.")
    p.add_argument("--fixed", help="fixed image (NIfTI)")
    p.add_argument("--moving", help="moving image (NIfTI)")
    p.add_argument("--pairs", help="CSV of pairs: fixed, moving[, fixed_label, moving_label]")
    p.add_argument("--workdir", default="", help="training run folder (its newest checkpoint)")
    p.add_argument("--checkpoint", default="", help="checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fixed-label", help="fixed label map (Dice report, IO Dice term)")
    p.add_argument("--moving-label", help="moving label map (warped with nearest)")
    p.add_argument("--fixed-modality", choices=MODALITIES, help="default: guessed from intensities")
    p.add_argument("--moving-modality", choices=MODALITIES, help="default: guessed from intensities")
    p.add_argument("--fixed-frame", type=int, help="frame of a 4D fixed file")
    p.add_argument("--moving-frame", type=int, help="frame of a 4D moving file")
    p.add_argument("--io-steps", type=int, default=0, help="instance optimisation steps per pair")
    p.add_argument("--io-lr", type=float, default=1e-5, help="instance optimisation learning rate")
    p.add_argument("--io-smooth", type=float, default=None,
                   help="IO smoothness weight (default: the training config's loss.smooth)")
    p.add_argument("--io-dice", type=float, default=1.0,
                   help="IO soft Dice weight (used with both labels)")
    p.add_argument("--no-qc", action="store_true", help="skip the QC PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def pairs_from_args(args) -> list[PairSpec]:
    if args.pairs:
        if args.fixed or args.moving or args.fixed_label or args.moving_label:
            raise ValueError("--pairs cannot be combined with --fixed/--moving/--*-label")
        pairs = read_pairs_csv(args.pairs)
        for p in pairs:
            p.fixed_modality = p.fixed_modality or args.fixed_modality
            p.moving_modality = p.moving_modality or args.moving_modality
        return pairs
    if not args.fixed or not args.moving:
        raise ValueError("give --fixed and --moving (or --pairs pairs.csv)")
    for flag, v in (("--fixed-frame", args.fixed_frame), ("--moving-frame", args.moving_frame)):
        if v is not None and v < 0:
            raise ValueError(f"{flag} {v} is negative")
    return [PairSpec(args.fixed, args.moving, args.fixed_label, args.moving_label,
                     args.fixed_modality, args.moving_modality, args.fixed_frame,
                     args.moving_frame)]


def run(args) -> list[dict]:
    from promptreg_jax.evaluate import model_from_checkpoint
    if not args.workdir and not args.checkpoint:
        raise ValueError("give --workdir RUN or --checkpoint PATH")
    pairs = pairs_from_args(args)
    check_inputs(pairs)
    model, params, meta, _ = model_from_checkpoint(args.checkpoint or args.workdir)
    registrar = Registrar(model, params, meta, io_steps=args.io_steps, io_lr=args.io_lr,
                          io_weights={"smooth": args.io_smooth, "dice": args.io_dice},
                          qc=not args.no_qc)
    rows = register_pairs(registrar, pairs, args.out, progress=not args.quiet)
    print(f"wrote {len(rows)} registration(s) into {args.out} (registration.csv lists them)")
    return rows


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from promptreg_jax.cli import run_cli
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
