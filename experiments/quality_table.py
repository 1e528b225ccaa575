"""Registration quality on data the project makes itself: the README's "Registration quality" table.

    python experiments/quality_table.py --runs RUN [RUN ...] [--pairs-per-domain 8]
        [--known-pairs 5] [--known-size 48] [--amplitude 2.5] [--io-steps 20] [--io-lr LR]
        [--methods M ...] [--domains Brain ...] [--field-io KEY=VALUE ...] [--out DIR]
    python experiments/quality_table.py --runs RUN --sweep-weight-io [--lrs 1e-5 1e-4 1e-3]
        [--sweep-steps 10 25 50] [--pairs-per-domain 2] [--known-pairs 0]

Data sets: every synthetic domain's test pairs of the runs' data set (the first
``--pairs-per-domain`` of each test split, as ``evaluate`` reads them), and a known-field set:
held-out test subjects of the synthetic generator, each pulled through a known random
diffeomorphism (``benchmarks/field_opt.make_pair``, RMS ``--amplitude`` voxels), so that the
end-point error ``|u - u*|`` over the fixed foreground is measurable. Every pair goes through the
``Registrar``'s own loading and preprocessing (files on disk, canonical grids).

Rows: no registration (each image's box onto the other); field IO alone from the identity (the
classical baseline, ``field_opt.optimize_field`` through ``Registrar.refine`` without guard); the
network; the network + weight-space IO (``instance_opt.instance_optimize``, ``--io-steps`` at
``--io-lr``); the network + field IO with the do-no-harm guard (what ``register`` does by default:
the network's field is field IO's starting point, ``init_mode="warm"``). On request (``--methods``)
also "network + field IO, compose": the refinement composed with the network's field as it is
(``init_mode="compose"``, the earlier default), and "network + field IO, prior": the diffusion
term on the difference from the network's coarsened field (``init_mode="prior"``). All instance
optimisation here is unsupervised (images only, no labels), so the test labels only score.
Columns: Dice (mean over labels), HD95 (mm, mean over labels with a finite value), % of voxels
with a Jacobian determinant <= 0, SDlogJ (the whole field, 2 voxels cropped), SDlogJ fg (over
the fixed image's labelled voxels), end-point error (voxels; known-field set), the MIND-SSC
distance to the fixed image (``field_opt.mind_similarity``, lower is better) and seconds per
pair (the method's compute after compilation: each image shape is compiled on an untimed first
call). Cells are mean ± std over pairs; with several runs (training seeds) the network rows pool
the pairs of every run and add ``[± std of the per-run means]``.

``--field-io KEY=VALUE`` (repeatable) passes an option to ``field_opt.optimize_field`` for every
field IO row (e.g. ``smooth=1``, ``steps=(80, 40, 20)``); ``--domains`` keeps only those
synthetic domains' pairs.

``--sweep-weight-io`` measures weight-space IO instead: per learning rate, Dice and MIND of the
network's field after each of ``--sweep-steps`` steps (one run of max steps per pair, scored on
the way through ``instance_optimize(on_step=...)``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.field_opt import make_pair  # noqa: E402  (also sets the compilation cache)

import jax  # noqa: E402
import nibabel as nib  # noqa: E402

from promptreg_jax import evaluate_lib, field_opt, metrics  # noqa: E402
from promptreg_jax.data import synthetic  # noqa: E402
from promptreg_jax.data.pair_list import PairSpec  # noqa: E402
from promptreg_jax.data.preprocess import normalize  # noqa: E402
from promptreg_jax.evaluate import config_from_meta, test_pairs_by_domain  # noqa: E402
from promptreg_jax.instance_opt import instance_optimize  # noqa: E402
from promptreg_jax.model import load_model  # noqa: E402
from promptreg_jax.nifti_io import field_outputs  # noqa: E402
from promptreg_jax.registrar import Registrar  # noqa: E402
from promptreg_jax.spatial import identity_grid  # noqa: E402

METHODS = ("no registration", "field IO alone", "network", "network + weight IO",
           "network + field IO", "network + field IO, compose", "network + field IO, prior")
ALT_MODES = {"network + field IO, compose": "compose", "network + field IO, prior": "prior"}
DEFAULT_METHODS = METHODS[:5]
NETWORK_METHODS = METHODS[2:]
COLUMNS = (("dice", "Dice", 3), ("hd95", "HD95 mm", 2), ("folded_pct", "% folded", 3),
           ("sdlogj", "SDlogJ", 3), ("sdlogj_fg", "SDlogJ fg", 3), ("epe", "EPE vox", 2),
           ("mind", "MIND", 4),
           ("seconds", "s/pair", 2))
UNSUPERVISED = {"dice": 0.0}  # weight IO on the images only: the test labels only score


# ------------------------------------------------------------------------------------ pairs
def synthetic_pairs(config, cache_dir: str, per_domain: int) -> list[dict]:
    """The first ``per_domain`` test pairs of every configured synthetic domain."""
    out = []
    for domain, pairs, _, _ in test_pairs_by_domain(config, cache_dir, per_domain):
        for p in pairs:
            spec = PairSpec(fixed=p.fixed_image, moving=p.moving_image, fixed_label=p.fixed_label,
                            moving_label=p.moving_label, fixed_modality=domain.modality,
                            moving_modality=domain.modality, fixed_frame=p.fixed_frame,
                            moving_frame=p.moving_frame)
            out.append(dict(set=domain.name, spec=spec, num_classes=domain.num_classes, true=None))
    return out


def known_field_pairs(folder: pathlib.Path, n: int, size: int, amplitude: float,
                      subjects: int, seed: int) -> list[dict]:
    """``n`` pairs (domains in turn) of held-out subjects (the data set's last ones) and their
    deformed copies, written as NIfTI files with a positive diagonal affine (canonical as is)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        key = synthetic.DOMAINS[i % len(synthetic.DOMAINS)]
        index = subjects - 1 - i // len(synthetic.DOMAINS)
        moving, fixed, ml, fl, true = make_pair(key, size, index, amplitude, seed=seed)
        spacing = synthetic.make_subject(key, size, seed, index)[2]
        affine = np.diag([*spacing, 1.0])
        paths = {}
        for name, arr, dtype in (("moving", moving, np.float32), ("fixed", fixed, np.float32),
                                 ("moving_label", ml, np.uint8), ("fixed_label", fl, np.uint8)):
            paths[name] = str(folder / f"{key}_{index:03d}_{name}.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(arr, dtype), affine), paths[name])
        modality = synthetic.SPECS[key].modality
        spec = PairSpec(fixed=paths["fixed"], moving=paths["moving"],
                        fixed_label=paths["fixed_label"], moving_label=paths["moving_label"],
                        fixed_modality=modality, moving_modality=modality)
        out.append(dict(set="known field", spec=spec, num_classes=synthetic.num_classes(key),
                        true=true))
    return out


def load_pair(reg: Registrar, pair: dict) -> dict:
    """The pair as the Registrar reads it: canonical volumes, network-size images, grids."""
    s = pair["spec"]
    fixed, fmod, f_net = reg.load_image(s.fixed, s.fixed_frame, s.fixed_modality)
    moving, mmod, m_net = reg.load_image(s.moving, s.moving_frame, s.moving_modality)
    f_lab, _ = reg.load_label(s.fixed_label, s.fixed_frame, s.fixed, fixed)
    m_lab, _ = reg.load_label(s.moving_label, s.moving_frame, s.moving, moving)
    fshape, mshape = fixed.data.shape, moving.data.shape
    identity = np.asarray(identity_grid(fshape))
    box = identity + evaluate_lib.fixed_grid_displacement(
        np.zeros((*reg.image_size, 3), np.float32), fshape, mshape)
    return dict(pair, fixed=fixed, fmod=fmod, f_net=f_net, moving=moving, mmod=mmod, m_net=m_net,
                f_lab=f_lab, m_lab=m_lab, identity=identity, box=box,
                fix_n=normalize(fixed.data, fmod, reg.norm_mode),
                mov_n=normalize(moving.data, mmod, reg.norm_mode))


# ------------------------------------------------------------------------------------ methods
def network_coords(reg: Registrar, params, p: dict) -> np.ndarray:
    flow, _ = reg.predict(params, p["m_net"], p["f_net"])
    flow = np.asarray(jax.device_get(flow))[0]
    return p["identity"] + evaluate_lib.fixed_grid_displacement(
        flow, p["fixed"].data.shape, p["moving"].data.shape)


def refine(reg: Registrar, coords, p: dict) -> tuple[np.ndarray, dict]:
    """Field IO (and the guard, as ``reg`` is set) from ``coords``, without labels."""
    out = reg.refine(coords, p["identity"], p["box"], p["fixed"], p["fmod"], p["moving"],
                      p["mmod"], None, None)
    return out["coords"], out["similarity"]


def run_method(method: str, reg: Registrar, field_io: Registrar, p: dict, io_steps: int,
               io_lr: float, alternates: dict | None = None) -> tuple[np.ndarray, float, dict]:
    """``(coords, seconds, extra)`` of one method on one loaded pair (``alternates``: ``reg``'s
    network with field IO in another ``init_mode``, by method name, from ``ALT_MODES``)."""
    t = time.perf_counter()
    extra = {}
    if method == "no registration":
        coords = p["box"]
    elif method == "field IO alone":
        coords, extra = refine(field_io, p["box"], p)
    elif method == "network":
        coords = network_coords(reg, reg.params, p)
    elif method == "network + weight IO":
        params = instance_optimize(reg.model, reg.params, p["m_net"], p["f_net"], io_steps,
                                   io_lr, dict(reg.io_weights, **UNSUPERVISED))
        coords = network_coords(reg, params, p)
    elif method == "network + field IO":
        coords, extra = refine(reg, network_coords(reg, reg.params, p), p)
    elif method in ALT_MODES:
        coords, extra = refine(alternates[method], network_coords(reg, reg.params, p), p)
    else:
        raise ValueError(method)
    return coords, time.perf_counter() - t, extra


def score(coords: np.ndarray, p: dict) -> dict:
    """Dice, HD95, folding, SDlogJ (``nifti_io.field_outputs``' Jacobian, as ``register``),
    MIND and, with a known field, the end-point error over the fixed foreground."""
    labels = list(range(1, p["num_classes"]))
    warped = evaluate_lib.sample_at(p["m_lab"].data, coords, order=0)
    with np.errstate(invalid="ignore"):
        hd = metrics.hd95(p["f_lab"].data, warped, labels, p["fixed"].spacing)
    jac = field_outputs(coords, p["fixed"], p["moving"]).jacdet
    row = dict(dice=evaluate_lib.nanmean(metrics.dice(p["f_lab"].data, warped, labels)),
               hd95=float(np.mean(hd[np.isfinite(hd)])) if np.isfinite(hd).any() else np.nan,
               folded_pct=100.0 * float(np.mean(jac <= 0)),
               sdlogj=metrics.sdlogj_of_determinant(jac),
               sdlogj_fg=metrics.sdlogj_of_determinant(jac, mask=p["f_lab"].data > 0),
               mind=field_opt.mind_similarity(evaluate_lib.sample_at(p["mov_n"], coords, 1),
                                              p["fix_n"]), epe=np.nan)
    if p["true"] is not None:
        fg = p["f_lab"].data > 0
        row["epe"] = float(np.linalg.norm(coords - p["identity"] - p["true"], axis=-1)[fg].mean())
    return row


# ------------------------------------------------------------------------------------ runs
def load_runs(paths):
    runs = []
    for path in paths:
        model, params, meta, step = load_model(path)
        runs.append(dict(path=str(path), model=model, params=params, meta=meta, step=step,
                         config=config_from_meta(meta, str(path))))
    return runs


def warm_up(regs, field_io, pairs, io_steps, io_lr, methods):
    """Compiles every program on an untimed first call: the network per run, weight IO once,
    the field resampling and field IO once per fixed-image shape."""
    for reg in regs:
        reg.warm_up()
    if "network + weight IO" in methods and io_steps:
        p = pairs[0]
        instance_optimize(regs[0].model, regs[0].params, p["m_net"], p["f_net"], 1, io_lr,
                          dict(regs[0].io_weights, **UNSUPERVISED))
    seen = set()
    for p in pairs:  # the field resampling and field IO compile per image shape
        if p["fixed"].data.shape not in seen:
            seen.add(p["fixed"].data.shape)
            network_coords(regs[0], regs[0].params, p)
            if {"field IO alone", "network + field IO"} & set(methods):
                refine(field_io, p["box"], p)


def quality(args, runs, pairs) -> dict:
    fio = dict(args.field_io)
    if args.field_io_smooth is not None:
        fio["smooth"] = args.field_io_smooth
    regs = [Registrar(r["model"], r["params"], r["meta"], field_io=True, guard=True,
                      field_io_options=fio) for r in runs]
    # The same networks with field IO in the other init modes ("network + field IO, compose"...).
    alternates = [{m: Registrar(r["model"], r["params"], r["meta"], field_io=True, guard=True,
                                field_io_options=dict(fio, init_mode=mode))
                   for m, mode in ALT_MODES.items()} for r in runs]
    field_io = Registrar(runs[0]["model"], runs[0]["params"], runs[0]["meta"], field_io=True,
                         guard=False, field_io_options=fio)
    loaded = [load_pair(regs[0], p) for p in pairs]
    methods = [m for m in METHODS if m in args.methods]
    warm_up(regs, field_io, loaded, args.io_steps, args.io_lr, methods)
    rows = []
    for method in methods:
        for r, (run, reg) in enumerate(zip(runs, regs)):
            if method not in NETWORK_METHODS and r > 0:
                continue  # independent of the network: once
            for p in loaded:
                coords, secs, extra = run_method(method, reg, field_io, p, args.io_steps,
                                                 args.io_lr, alternates[r])
                row = dict(score(coords, p), method=method, set=p["set"], run=run["path"],
                           seconds=secs, pair=os.path.basename(p["spec"].moving) + " -> "
                           + os.path.basename(p["spec"].fixed), guard=extra.get("guard", ""))
                rows.append(row)
                print(f"{method:<20} {p['set']:<12} {row['pair']:<44} Dice {row['dice']:.3f} "
                      f"HD95 {row['hd95']:6.2f} fold {row['folded_pct']:.3f} SDlogJ "
                      f"{row['sdlogj']:.3f} EPE {row['epe']:.2f} MIND {row['mind']:.4f} "
                      f"{secs:.2f} s {row['guard']}  load {os.getloadavg()[0]:.1f}", flush=True)
    return dict(rows=rows, runs=[dict(path=r["path"], step=r["step"]) for r in runs],
                options=dict(io_steps=args.io_steps, io_lr=args.io_lr,
                             field_io=dict(field_opt.DEFAULTS, **fio), amplitude=args.amplitude))


def _cell(values_by_run: list[list[float]], digits: int) -> str:
    pooled = np.asarray([v for vals in values_by_run for v in vals], np.float64)
    pooled = pooled[np.isfinite(pooled)]
    if not pooled.size:
        return "–"
    text = f"{pooled.mean():.{digits}f} ± {pooled.std():.{digits}f}"
    means = [np.nanmean(v) for v in values_by_run if np.isfinite(v).any()]
    if len(means) > 1:
        text += f" [± {np.std(means):.{digits}f}]"
    return text


def markdown(result: dict) -> str:
    rows = result["rows"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    runs = [r["path"] for r in result["runs"]]
    head = "| data set | method | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for s in sets:
        n = len({r["pair"] for r in rows if r["set"] == s})
        for method in METHODS:
            sel = [r for r in rows if r["set"] == s and r["method"] == method]
            if not sel:
                continue
            cells = [_cell([[r[key] for r in sel if r["run"] == run] for run in runs
                            if any(r["run"] == run for r in sel)], digits)
                     for key, _, digits in COLUMNS]
            guards = sum(1 for r in sel if r["guard"])
            name = method + (f" ({guards} guarded)" if guards else "")
            lines.append(f"| {s} ({n}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep(args, runs, pairs) -> dict:
    """Weight-space IO: Dice and MIND after each of ``--sweep-steps`` per learning rate."""
    run = runs[0]
    reg = Registrar(run["model"], run["params"], run["meta"], field_io=False, guard=False)
    loaded = [load_pair(reg, p) for p in pairs]
    reg.warm_up()
    checkpoints = sorted(set(args.sweep_steps))
    rows = []
    for p in loaded:
        base = score(network_coords(reg, reg.params, p), p)
        rows.append(dict(base, lr=0.0, steps=0, set=p["set"], seconds=0.0))
    for lr in args.lrs:
        for p in loaded:
            found, clock = [], {"start": time.perf_counter(), "scoring": 0.0}

            def record(k, params, p=p, found=found, clock=clock):
                if k in checkpoints:  # seconds: the IO steps and one forward, scoring excluded
                    t = time.perf_counter()
                    row = score(network_coords(reg, params, p), p)
                    found.append(dict(row, lr=lr, steps=k, set=p["set"], seconds=(
                        time.perf_counter() - clock["start"] - clock["scoring"])))
                    clock["scoring"] += time.perf_counter() - t

            instance_optimize(reg.model, reg.params, p["m_net"], p["f_net"], checkpoints[-1], lr,
                              dict(reg.io_weights, **UNSUPERVISED), on_step=record)
            rows.extend(found)
            last = found[-1]
            print(f"lr {lr:g} {p['set']:<12} Dice " + " ".join(
                f"{r['steps']}:{r['dice']:.3f}" for r in found) + f"  MIND {last['mind']:.4f}"
                f"  fold {last['folded_pct']:.3f}  {last['seconds']:.1f} s  load "
                f"{os.getloadavg()[0]:.1f}", flush=True)
    return dict(rows=rows, run=run["path"], step=run["step"], lrs=list(args.lrs),
                steps=checkpoints)


def sweep_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["| lr | steps | Dice | MIND | % folded | SDlogJ | s/pair |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = [(0.0, 0)] + [(lr, k) for lr in result["lrs"] for k in result["steps"]]
    for lr, k in keys:
        sel = [r for r in rows if r["lr"] == lr and r["steps"] == k]
        m = lambda key: float(np.nanmean([r[key] for r in sel]))  # noqa: E731
        lines.append(f"| {'network' if k == 0 else f'{lr:g}'} | {k} | {m('dice'):.3f} | "
                     f"{m('mind'):.4f} | {m('folded_pct'):.3f} | {m('sdlogj'):.3f} | "
                     f"{m('seconds'):.1f} |")
    return "\n".join(lines) + "\n"


def _option(text: str) -> tuple:
    """``KEY=VALUE`` -> ``(key, value)``, the value read as a Python literal where it is one."""
    import ast
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key.strip() not in field_opt.DEFAULTS and key.strip() != "diffeomorphic":
        raise argparse.ArgumentTypeError(f"{key!r} is not a field IO option "
                                         f"({', '.join(field_opt.DEFAULTS)})")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="trained run folders (seeds)")
    p.add_argument("--pairs-per-domain", type=int, default=8)
    p.add_argument("--known-pairs", type=int, default=5, help="known-field pairs (0: none)")
    p.add_argument("--known-size", type=int, default=None,
                   help="generator size of the known-field set (default: the runs' data set's)")
    p.add_argument("--amplitude", type=float, default=2.5, help="RMS known displacement, voxels")
    p.add_argument("--io-steps", type=int, default=20, help="weight IO steps")
    p.add_argument("--io-lr", type=float, default=None,
                   help="weight IO learning rate (default: instance_optimize's)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--field-io-smooth", type=float, default=None,
                   help="field IO's diffusion weight (default: field_opt's)")
    p.add_argument("--field-io", type=_option, action="append", default=[],
                   metavar="KEY=VALUE", help="a field IO option (field_opt.optimize_field's "
                   "keyword, e.g. smooth=1.5, steps=(80,40,20)); repeat for more")
    p.add_argument("--domains", nargs="+", default=None,
                   help="only these synthetic domains' test pairs (names as in the table)")
    p.add_argument("--sweep-weight-io", action="store_true")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--sweep-steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--out", default=None, help="folder for result.json and table.md")
    args = p.parse_args(argv)
    if args.io_lr is None:
        import inspect
        args.io_lr = inspect.signature(instance_optimize).parameters["lr"].default
    t0 = time.time()
    runs = load_runs(args.runs)
    config = runs[0]["config"]
    cache = tempfile.mkdtemp(prefix="quality_cache_")
    pairs = synthetic_pairs(config, cache, args.pairs_per_domain)
    if args.domains:
        unknown = sorted(set(args.domains) - {q["set"] for q in pairs})
        if unknown:
            p.error(f"--domains: {', '.join(unknown)} not among the runs' domains "
                    f"({', '.join(dict.fromkeys(q['set'] for q in pairs))})")
        pairs = [q for q in pairs if q["set"] in args.domains]
    if args.known_pairs:
        syn = config.data.synthetic
        pairs += known_field_pairs(pathlib.Path(cache) / "known_field", args.known_pairs,
                                   args.known_size or int(syn.size), args.amplitude,
                                   int(syn.subjects), int(syn.seed))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}; {len(pairs)} pairs, runs "
          f"{[(r['path'], r['step']) for r in runs]}", flush=True)
    result = sweep(args, runs, pairs) if args.sweep_weight_io else quality(args, runs, pairs)
    result["load_end"] = os.getloadavg()
    result["wall_s"] = time.time() - t0
    out = pathlib.Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    table = sweep_markdown(result) if args.sweep_weight_io else markdown(result)
    print(table)
    print(f"# done in {result['wall_s'] / 60:.1f} min, load average now "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if out:
        (out / "table.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
