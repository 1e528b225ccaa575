"""Registers image pairs with a trained PromptReg: warped image and labels, displacement fields.

    python -m promptreg_jax.register --fixed F.nii.gz --moving M.nii.gz (--workdir RUN | --checkpoint PATH)
        --out DIR [--moving-label L] [--fixed-label L] [--fixed-modality ct|mr]
        [--moving-modality ct|mr] [--fixed-frame N] [--moving-frame N]
        [--io-steps N] [--io-lr 1e-4] [--io-smooth W] [--io-dice W] [--no-field-io]
        [--field-io-smooth W] [--field-io-max-voxels N] [--field-io-init warm|compose|prior]
        [--field-io-boundary border|zeros]
        [--no-guard] [--no-qc] [--quiet] [--overwrite] [--allow-older-checkpoint]
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

The checkpoint step used is printed and recorded in ``registration.csv`` and every NIfTI header's
description; an unreadable newest checkpoint is an error unless ``--allow-older-checkpoint``. An
``--out`` folder that holds files is refused unless ``--overwrite`` (which first removes the
earlier registration outputs there). In a ``--pairs`` batch every pair's files are checked before
any work; a pair that fails later is recorded with its error and the others go on (exit code 2
at the end).

This module is the command line only: ``promptreg_jax.registrar`` (the registrar and batches),
``promptreg_jax.nifti_io`` (geometry, writing), ``promptreg_jax.qc`` (figure) and
``promptreg_jax.data.pair_list`` (pair lists) hold the rest.
"""

from __future__ import annotations

import sys

from promptreg_jax.cli import ArgumentParser, add_checkpoint_args, run_cli
from promptreg_jax.data.domains import MODALITIES
from promptreg_jax.data.pair_list import PairSpec, read_pair_list
from promptreg_jax.field_opt import INIT_MODES
from promptreg_jax.spatial import BOUNDARIES
from promptreg_jax.instance_opt import DEFAULT_LR as DEFAULT_IO_LR
from promptreg_jax.registrar import (SUMMARY, Registrar, check_all, prepare_output,
                                     register_pairs)

# Names that lived here before the split, kept importable for one release.
_MOVED = {
    "read_pairs_csv": ("promptreg_jax.data.pair_list", "read_pair_list"),
    "check_inputs": ("promptreg_jax.registrar", "check_all"),
    "guess_modality": ("promptreg_jax.data.pair_list", "guess_modality"),
    "from_canonical": ("promptreg_jax.nifti_io", "from_canonical"),
    "field_outputs": ("promptreg_jax.nifti_io", "field_outputs"),
    "FieldOutputs": ("promptreg_jax.nifti_io", "FieldOutputs"),
    "save_like": ("promptreg_jax.nifti_io", "save_like"),
    "save_world_displacement": ("promptreg_jax.nifti_io", "save_world_displacement"),
    "qc_figure": ("promptreg_jax.qc", "qc_figure"),
    "case_name": ("promptreg_jax.registrar", "case_name"),
    "unique_names": ("promptreg_jax.registrar", "unique_names"),
    "describe_weights": ("promptreg_jax.registrar", "describe_weights"),
    "write_summary": ("promptreg_jax.registrar", "write_summary"),
}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        import warnings
        module, attr = _MOVED[name]
        warnings.warn(f"promptreg_jax.register.{name} moved to {module}.{attr}; the old name "
                      f"goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'promptreg_jax.register' has no attribute {name!r}")


def _parser():
    p = ArgumentParser(prog="python -m promptreg_jax.register",
                description="Register image pairs with a trained PromptReg checkpoint.")
    p.add_argument("--fixed", help="fixed image (NIfTI)")
    p.add_argument("--moving", help="moving image (NIfTI)")
    p.add_argument("--pairs", help="CSV of pairs: fixed, moving[, fixed_label, moving_label]")
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --out: its earlier registration outputs are removed")
    p.add_argument("--fixed-label", help="fixed label map (Dice report, IO Dice term)")
    p.add_argument("--moving-label", help="moving label map (warped with nearest)")
    p.add_argument("--fixed-modality", choices=MODALITIES, help="default: guessed from intensities")
    p.add_argument("--moving-modality", choices=MODALITIES, help="default: guessed from intensities")
    p.add_argument("--fixed-frame", type=int, help="frame of a 4D fixed file")
    p.add_argument("--moving-frame", type=int, help="frame of a 4D moving file")
    p.add_argument("--io-steps", type=int, default=0,
                   help="weight-space instance optimisation steps per pair (off by default; 20 "
                        "measured best of 5/10/20 on the synthetic test pairs)")
    p.add_argument("--io-lr", type=float, default=DEFAULT_IO_LR,
                   help=f"instance optimisation learning rate (default {DEFAULT_IO_LR:g}, "
                        f"by measurement: instance_opt.DEFAULT_LR)")
    p.add_argument("--io-smooth", type=float, default=None,
                   help="IO smoothness weight (default: the training config's loss.smooth)")
    p.add_argument("--io-dice", type=float, default=1.0,
                   help="IO soft Dice weight (used with both labels)")
    p.add_argument("--no-field-io", action="store_true",
                   help="skip the dense-field instance optimisation on the fixed grid (on by "
                        "default: promptreg_jax.field_opt)")
    p.add_argument("--field-io-smooth", type=float, default=None,
                   help="field IO diffusion weight (default: field_opt.DEFAULTS)")
    p.add_argument("--field-io-max-voxels", type=int, default=None,
                   help="field IO works on the fixed grid scaled down to at most this many voxels")
    p.add_argument("--field-io-init", choices=INIT_MODES, default="warm",
                   help="warm (default): the network's field is field IO's starting point and is "
                        "smoothed with it; compose: field IO refines on top of the network's "
                        "field, which is kept as it is; prior: the starting point, and the "
                        "diffusion term acts on the difference from its coarse version (keeps "
                        "the network's large-scale deformation; only as good as the network)")
    p.add_argument("--field-io-boundary", choices=BOUNDARIES, default=None,
                   help="how field IO extends fields past the volume in its squarings: border "
                        "(default: their edge values) or zeros (the network's convention)")
    p.add_argument("--no-guard", action="store_true",
                   help="hand back the registration even where its MIND distance to the fixed "
                        "image is worse than no registration's")
    p.add_argument("--no-qc", action="store_true", help="skip the QC PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def pairs_from_args(args) -> list[PairSpec]:
    if args.pairs:
        if args.fixed or args.moving or args.fixed_label or args.moving_label:
            raise ValueError("--pairs cannot be combined with --fixed/--moving/--*-label")
        pairs = read_pair_list(args.pairs)
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


def field_io_options(args) -> dict:
    out = {"init_mode": args.field_io_init}
    if args.field_io_smooth is not None:
        if not args.field_io_smooth >= 0:
            raise ValueError(f"--field-io-smooth {args.field_io_smooth} must be >= 0")
        out["smooth"] = args.field_io_smooth
    if args.field_io_boundary is not None:
        out["boundary"] = args.field_io_boundary
    if args.field_io_max_voxels is not None:
        if args.field_io_max_voxels < 8 ** 3:
            raise ValueError(f"--field-io-max-voxels {args.field_io_max_voxels} is below 512")
        out["max_voxels"] = args.field_io_max_voxels
    return out


def run(args) -> list[dict]:
    from promptreg_jax import model as model_lib
    if not args.workdir and not args.checkpoint:
        raise ValueError("give --workdir RUN or --checkpoint PATH")
    pairs = pairs_from_args(args)
    check_all(pairs)
    if not args.overwrite:
        prepare_output(args.out)  # refuse a non-empty folder before loading anything
    source = args.checkpoint or args.workdir
    model, params, meta, step = model_lib.load_model(source,
                                                     allow_fallback=args.allow_older_checkpoint)
    print(f"model: checkpoint step {step} of {source}", flush=True)
    registrar = Registrar(model, params, meta, io_steps=args.io_steps, io_lr=args.io_lr,
                          io_weights={"smooth": args.io_smooth, "dice": args.io_dice},
                          qc=not args.no_qc, step=step, checkpoint=str(source),
                          field_io=not args.no_field_io, field_io_options=field_io_options(args),
                          guard=not args.no_guard)
    rows = register_pairs(registrar, pairs, args.out, progress=not args.quiet,
                          overwrite=args.overwrite)
    print(f"wrote {len(rows)} registration(s) into {args.out} ({SUMMARY} lists them)")
    return rows


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
