"""Registering pairs with a trained network: preprocessing as in training, the network (and
optional instance optimisation), outputs on the fixed file's original grid, a summary CSV.

    registrar = Registrar(model, params, meta, step=step)
    rows = register_pairs(registrar, [PairSpec("fixed.nii.gz", "moving.nii.gz")], "out/")

Per pair ``NAME = <fixed>_<moving>`` (a Learn2Reg file name ``TASK_0001_0000`` contributes its
case id ``0001``): ``warped_NAME``, ``warped_label_NAME`` (with a moving label), ``disp_NAME``
(Learn2Reg voxels), ``disp_world_NAME`` (ITK, LPS mm), ``jacdet_NAME`` (all ``.nii.gz``, see
``promptreg_jax.nifti_io``), ``qc_NAME.png`` (``promptreg_jax.qc``), and one row of
``registration.csv``.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Sequence

import numpy as np

from promptreg_jax import evaluate_lib, metrics
from promptreg_jax.field_opt import INIT_MODES, WARM_MODES
from promptreg_jax.data.errors import DataError
from promptreg_jax.instance_opt import DEFAULT_LR
from promptreg_jax.memory import release_freed_heap
from promptreg_jax.data.pair_list import PairSpec, check_pairs, guess_modality
from promptreg_jax.nifti_io import field_outputs, from_canonical, save_like, save_world_displacement
from promptreg_jax.spatial import identity_grid, sample

SUMMARY = "registration.csv"
OUTPUT_PATTERNS = ("warped_*.nii.gz", "warped_label_*.nii.gz", "disp_*.nii.gz",
                   "disp_world_*.nii.gz", "jacdet_*.nii.gz", "qc_*.png", SUMMARY)
FOLDING_WARN_PCT = 0.5  # warn when more voxels than this fold (|J| <= 0)


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


def unique_names(pairs: Sequence[PairSpec]) -> list[str]:
    """``<fixed>_<moving>`` per pair, with ``_<index>`` added where two pairs would collide."""
    names = [f"{case_name(p.fixed, p.fixed_frame)}_{case_name(p.moving, p.moving_frame)}"
             for p in pairs]
    counts = {n: names.count(n) for n in names}
    return [n if counts[n] == 1 else f"{n}_{i}" for i, n in enumerate(names)]


class Registrar:
    """A trained network plus its preprocessing; ``register(pair, out_dir)`` writes the outputs.

    ``params`` are only read: instance optimisation works on a copy per pair. ``step`` and
    ``checkpoint`` name the model used; they are recorded in every output.
    """

    def __init__(self, model, params, meta: dict, io_steps: int = 0, io_lr: float = DEFAULT_LR,
                 io_weights: dict | None = None, qc: bool = True, step: int | None = None,
                 checkpoint: str = "", field_io: bool = False, field_io_options: dict | None = None,
                 guard: bool = True):
        self.model, self.params, self.meta = model, params, meta
        self.step, self.checkpoint = step, checkpoint
        self.field_io, self.field_io_options = bool(field_io), dict(field_io_options or {})
        init_mode = self.field_io_options.get("init_mode", "warm")
        if init_mode not in INIT_MODES:
            raise ValueError(f"field IO init_mode must be {' or '.join(map(repr, INIT_MODES))}, "
                             f"got {init_mode!r}")
        self.guard = bool(guard)
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

    @property
    def model_description(self) -> str:
        return f"step {self.step}" if self.step is not None else "unknown step"

    def warm_up(self):
        """Compiles the network once, outside the timed part of the first pair."""
        import jax
        if not self._compiled:
            x = np.zeros((1, *self.image_size, 1), np.float32)
            jax.block_until_ready(self.predict(self.params, x, x))
            release_freed_heap()  # the compiler's freed heap back to the OS
            self._compiled = True

    # -- preprocessing (as in training) --------------------------------------------------------
    def load_image(self, path, frame, modality):
        """``(canonical volume, modality, network-size image (1, X, Y, Z, 1))`` of one file, as
        ``register`` reads it (the modality guessed from intensities when not given)."""
        from promptreg_jax.data.preprocess import load_image, normalize, resize_image
        vol = load_image(path, frame)
        modality = modality or guess_modality(vol.data)
        net = resize_image(normalize(vol.data, modality, self.norm_mode), self.image_size)
        return vol, modality, np.asarray(net, np.float32)[None, ..., None]

    def load_label(self, path, frame, image_path, image_vol):
        """``(canonical label volume, network-size labels (1, X, Y, Z))``, or ``(None, None)``
        without a path; the label must lie on its image's grid."""
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
        from promptreg_jax.instance_opt import instance_optimize

        out_dir = pathlib.Path(out_dir)
        name = name or unique_names([pair])[0]
        fixed, fmod, f_net = self.load_image(pair.fixed, pair.fixed_frame, pair.fixed_modality)
        moving, mmod, m_net = self.load_image(pair.moving, pair.moving_frame, pair.moving_modality)
        f_lab, f_lab_net = self.load_label(pair.fixed_label, pair.fixed_frame, pair.fixed, fixed)
        m_lab, m_lab_net = self.load_label(pair.moving_label, pair.moving_frame, pair.moving,
                                            moving)

        self.warm_up()
        t0 = time.perf_counter()
        params = self.params
        if self.io_steps:
            both = f_lab_net is not None and m_lab_net is not None
            params = instance_optimize(self.model, self.params, m_net, f_net, self.io_steps,
                                       self.io_lr, self.io_weights,
                                       m_lab_net if both else None, f_lab_net if both else None)
        flow, weights = self.predict(params, m_net, f_net)
        flow, weights = (np.asarray(a) for a in jax.device_get((flow, weights)))

        # Canonical grids: fixed voxel y <-> moving voxel y + d(y).
        fshape, mshape = fixed.data.shape, moving.data.shape
        d = evaluate_lib.fixed_grid_displacement(flow[0], fshape, mshape)
        identity = np.asarray(identity_grid(fshape))
        coords = identity + d
        box = identity + evaluate_lib.fixed_grid_displacement(  # no registration
            np.zeros((*self.image_size, 3), np.float32), fshape, mshape)
        refined = self.refine(coords, identity, box, fixed, fmod, moving, mmod, f_lab, m_lab)
        coords, similarity = refined["coords"], refined["similarity"]
        runtime = time.perf_counter() - t0
        warped = evaluate_lib.sample_at(moving.data, coords, order=1)
        warped_label = None if m_lab is None else evaluate_lib.sample_at(m_lab.data, coords, 0)
        fields = field_outputs(coords, fixed, moving)
        files = self._write(out_dir, name, pair, fixed, warped, warped_label, fields)

        row = {"name": name, "fixed": pair.fixed, "moving": pair.moving,
               "fixed_modality": fmod, "moving_modality": mmod, "runtime_s": runtime,
               "io_steps": self.io_steps, "field_io": self.field_io,
               "checkpoint_step": self.step, **similarity,
               "neg_jacobian_pct": 100.0 * float(np.mean(fields.jacdet <= 0)),
               "sdlogj": metrics.sdlogj_of_determinant(fields.jacdet)}
        if warped_label is not None and f_lab is not None:
            # Before registration: the network's identity, i.e. each image's box onto the other.
            before = evaluate_lib.sample_at(m_lab.data, box, order=0)
            row["dice_before"] = evaluate_lib.nanmean(metrics.dice(f_lab.data, before))
            row["dice"] = evaluate_lib.nanmean(metrics.dice(f_lab.data, warped_label))
        w = weights[0] if weights.ndim == 2 else weights
        row["prompt_weights"] = dict(zip(self.domains, [float(v) for v in w]))
        row["closest_domain"] = self.domains[int(np.argmax(w))] if w.size and self.domains else ""
        if self.qc:
            from promptreg_jax.qc import qc_figure
            files["qc"] = out_dir / f"qc_{name}.png"
            # The final map's displacement in fixed voxels (the moving extent scaled onto the
            # fixed grid, as the box map does), whose in-plane part bends the drawn grid.
            grid_disp = ((coords - box) / evaluate_lib.box_scale(fshape, mshape)).astype(
                np.float32)
            qc_figure(files["qc"], fixed.data, moving.data, warped, grid_disp,
                      fixed.spacing, moving.spacing, warped_label=warped_label,
                      fixed_label=None if f_lab is None else f_lab.data,
                      title=f"{_stem(pair.fixed)} <- {_stem(pair.moving)}")
        row["files"] = {k: str(v) for k, v in files.items()}
        return row

    def refine(self, coords, identity, box, fixed, fmod, moving, mmod, f_lab, m_lab) -> dict:
        """Field instance optimisation on the fixed grid (``field_io``) and the do-no-harm guard.

        ``field_opt.optimize_field`` (MIND-SSC + diffusion, + soft Dice with both labels) runs on
        the fixed grid, with the moving image normalised as in training. With ``init_mode``
        ``"warm"`` (the default) the moving image is brought onto the fixed grid by the box map
        alone (each image's extent onto the other, ``box(y) = s * y``) and the network's map,
        written as a displacement ``u0 = (coords - box) / s`` in fixed voxels, is the starting
        velocity; the optimised field ``u`` is the whole map, ``box(y + u(y))``, so the diffusion
        term smooths the network's field too. With ``"compose"`` the moving image is pulled
        through the network's map first and the refinement ``w`` is composed with it:
        ``y + w + d(y + w)`` (the network's field is kept as it is, roughness included).
        ``"prior"`` starts as warm does, and the diffusion term acts on the difference from the
        network's field coarsened (``field_opt``'s ``prior_factor``), which it does not penalise.
        The guard then compares the MIND distance to the fixed image after registration with that
        of no registration and hands back the latter when the registration made it worse.
        Returns the coordinates and ``mind_before``/``mind_after``.
        """
        from promptreg_jax import field_opt
        from promptreg_jax.data.preprocess import normalize
        if not (self.field_io or self.guard):
            return {"coords": coords, "similarity": {}}
        fix_n = normalize(fixed.data, fmod, self.norm_mode)
        mov_n = normalize(moving.data, mmod, self.norm_mode)
        if self.field_io:
            options = dict(self.field_io_options)
            mode = options.pop("init_mode", "warm")
            warm = mode in WARM_MODES
            both = f_lab is not None and m_lab is not None
            start = box if warm else coords
            m0 = evaluate_lib.sample_at(mov_n, start, order=1)
            lab0 = evaluate_lib.sample_at(m_lab.data, start, order=0) if both else None
            labels = dict(moving_label=lab0, fixed_label=f_lab.data if both else None)
            if warm:
                # box(y) = s * y (align-corners extents), so box(y + u) = box(y) + s * u.
                s = evaluate_lib.box_scale(fixed.data.shape, moving.data.shape)
                u0 = ((coords - box) / s).astype(np.float32)
                u = np.asarray(field_opt.optimize_field(
                    m0, fix_n, init_disp=u0, init_mode=mode, **labels, **options))[0]
                coords = box + u * s
            else:
                w = np.asarray(field_opt.optimize_field(m0, fix_n, **labels, **options))[0]
                d = coords - identity
                d_at = np.asarray(sample(d[None], (identity + w)[None], order=1))[0]
                coords = identity + w + d_at
        after = field_opt.mind_similarity(evaluate_lib.sample_at(mov_n, coords, 1), fix_n)
        before = field_opt.mind_similarity(evaluate_lib.sample_at(mov_n, box, 1), fix_n)
        similarity = {"mind_before": before, "mind_after": after, "guard": ""}
        if self.guard and after > before:
            coords = box
            similarity.update(mind_after=before, guard="no registration (MIND worse)")
        return {"coords": coords, "similarity": similarity}

    def _write(self, out_dir, name, pair, fixed, warped, warped_label, fields) -> dict:
        import nibabel as nib
        reference = nib.load(pair.fixed)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"promptreg {self.model_description}"
        files = {"warped": out_dir / f"warped_{name}.nii.gz",
                 "disp": out_dir / f"disp_{name}.nii.gz",
                 "disp_world": out_dir / f"disp_world_{name}.nii.gz",
                 "jacdet": out_dir / f"jacdet_{name}.nii.gz"}
        save_like(from_canonical(warped, fixed.original_affine), reference, files["warped"],
                  description=f"{tag} warped moving image")
        if warped_label is not None:
            files["warped_label"] = out_dir / f"warped_label_{name}.nii.gz"
            top = int(warped_label.max())
            save_like(from_canonical(warped_label, fixed.original_affine), reference,
                      files["warped_label"], dtype=np.uint8 if top < 256 else
                      (np.int16 if top < 32768 else np.int32),
                      description=f"{tag} warped moving label (nearest)")
        save_like(fields.disp_voxel, reference, files["disp"],
                  description=f"{tag} displacement, fixed voxels (Learn2Reg)")
        save_world_displacement(fields.disp_world, reference, files["disp_world"],
                                description=f"{tag} displacement LPS mm fixed->moving (ITK)")
        save_like(fields.jacdet, reference, files["jacdet"],
                  description=f"{tag} Jacobian determinant fixed->moving")
        return files


def describe_weights(row: dict) -> str:
    """One line: the prompt weights per training domain and the closest one."""
    weights = row.get("prompt_weights") or {}
    if not weights:
        return "prompt weights: none (this model has no prompt generator)"
    parts = "  ".join(f"{k} {v:.3f}" for k, v in weights.items())
    return f"prompt weights: {parts}  -> resembles {row['closest_domain']}"


# ------------------------------------------------------------------------------------ batches
class PairsFailed(ValueError):
    """Some pairs of a batch could not be registered; the others were (see the summary)."""


def prepare_output(out_dir, overwrite: bool = False) -> pathlib.Path:
    """Refuses an output folder that holds files unless ``overwrite``; then removes the earlier
    registration outputs in it, so that the summary lists exactly what the folder holds."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: --out is a file, not a folder")
    present = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if present and not overwrite:
        raise ValueError(f"{out_dir}: output folder is not empty ({len(present)} entries); pass "
                         f"--overwrite to replace its registration outputs, or choose a new --out")
    for pattern in OUTPUT_PATTERNS if present else ():
        for f in out_dir.glob(pattern):
            f.unlink()
    return out_dir


def check_all(pairs: Sequence[PairSpec]) -> None:
    """Raises one line for the first bad pair (with the count of others), before any work."""
    bad = check_pairs(pairs)
    if len(bad) == 1 and len(pairs) == 1:
        raise DataError("", bad[0][1])
    if bad:
        more = f" (and {len(bad) - 1} more bad pair(s))" if len(bad) > 1 else ""
        raise DataError("", f"{bad[0][1]}{more}; nothing was registered")


def register_pairs(registrar: Registrar, pairs: Sequence[PairSpec], out_dir,
                   progress: bool = True, echo=print, overwrite: bool = False) -> list[dict]:
    """Registers every pair (tqdm bar for several), writes ``registration.csv``; returns rows.

    Every pair's files are checked first (one line naming each bad file, nothing written). A
    pair that still fails while registering (e.g. a constant image) is recorded in the summary
    with its error and the batch goes on; :class:`PairsFailed` is raised at the end. A single
    pair's failure is raised as it is, and leaves no output folder behind.
    """
    from tqdm import tqdm
    check_all(pairs)
    out_dir = pathlib.Path(out_dir)
    created = not out_dir.exists()
    prepare_output(out_dir, overwrite)
    rows, failed = [], []
    bar = tqdm(list(zip(pairs, unique_names(pairs))), desc="register", unit="pair",
               disable=not progress or len(pairs) < 2, file=sys.stderr)
    say = bar.write if len(pairs) > 1 and progress else echo
    for pair, name in bar:
        try:
            row = registrar.register(pair, out_dir, name)
        except (ValueError, OSError) as e:
            if len(pairs) == 1:
                if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                    shutil.rmtree(out_dir)
                raise
            failed.append(name)
            rows.append({"name": name, "fixed": pair.fixed, "moving": pair.moving,
                         "checkpoint_step": registrar.step, "error": str(e), "prompt_weights": {}})
            say(f"{name}: FAILED: {e}")
            continue
        rows.append(row)
        msg = f"{name}: {describe_weights(row)}"
        if "dice" in row:
            msg += f"; Dice {row['dice_before']:.3f} -> {row['dice']:.3f}"
        if "mind_after" in row:
            msg += f"; MIND {row['mind_before']:.4f} -> {row['mind_after']:.4f}"
            if row["guard"]:
                msg += f" (kept {row['guard']})"
        msg += f"; {row['neg_jacobian_pct']:.3f}% |J|<=0; {row['runtime_s']:.2f} s"
        say(msg)
        if row["neg_jacobian_pct"] > FOLDING_WARN_PCT:
            say(f"warning: {name}: {row['neg_jacobian_pct']:.2f}% of the voxels fold (|J| <= 0): "
                f"the field is implausible there (with instance optimisation: lower --io-lr)")
    write_summary(out_dir / SUMMARY, rows, registrar.domains)
    if failed:
        raise PairsFailed(f"{len(failed)} of {len(pairs)} pairs failed ({', '.join(failed[:3])}"
                          f"{', ...' if len(failed) > 3 else ''}); their errors are in "
                          f"{out_dir / SUMMARY}, the other pairs' outputs are written")
    return rows


SUMMARY_FIELDS = ("name", "fixed", "moving", "fixed_modality", "moving_modality",
                  "checkpoint_step", "io_steps", "field_io", "runtime_s", "dice_before", "dice",
                  "mind_before", "mind_after", "guard", "neg_jacobian_pct", "sdlogj",
                  "closest_domain", "error")


def write_summary(path, rows: list[dict], domains: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(SUMMARY_FIELDS) + [f"w_{d}" for d in domains])
        for r in rows:
            vals = [r.get(k, "") for k in SUMMARY_FIELDS]
            vals = ["" if v is None else
                    f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else
                    ("nan" if isinstance(v, float) else v) for v in vals]
            w.writerow(vals + [f"{r['prompt_weights'].get(d, float('nan')):.6g}" for d in domains])
