"""Evaluates a trained run on the test pairs of every domain, at each image's original resolution.

    python -m promptreg_jax.evaluate --workdir RUN [--checkpoint PATH] [--config configs/X.py[:arg]]
        [--out DIR] [--name NAME] [--max-pairs N] [--learn2reg-sdlogj]

Per test pair of every configured domain (held-out ones included): the network's field at network
resolution is resampled to the fixed image's original grid (pointing into the moving image's
original grid, whose shape may differ), the moving original labels are warped with nearest
interpolation, and the pair gets Dice per label and their mean, HD95 in mm (spacing-aware, unlike
the Learn2Reg script), the % of voxels with Jacobian determinant <= 0, SDlogJ (clean, or the
Learn2Reg script's +3-offset form with ``--learn2reg-sdlogj``), the network runtime and the prompt
weights against the training domains.

The config comes from the checkpoint (``meta["config"]``) unless ``--config`` is given (then its
model settings must match the checkpoint's). Written into ``--out`` (default ``RUN/eval``):

* ``<Domain>.csv``: one row per pair;
* ``<Domain>.json``: the domain summary (mean, std, DSC30 and the other means);
* ``summary.json``: every domain's summary, the held-out domains, the checkpoint step;
* ``results.md``: the paper's Table 1 layout for this run (``table1_markdown``) and a table of the
  other metrics.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger("promptreg_jax.evaluate")

SUMMARY_FILE = "summary.json"


# ------------------------------------------------------------------------------------ tables
def _cell(summary: Mapping | None, metric: str, percent: bool, digits: int) -> str:
    if not summary or f"{metric}_mean" not in summary:
        return "–"
    mean, std = summary.get(f"{metric}_mean"), summary.get(f"{metric}_std")
    if mean is None or not math.isfinite(mean):
        return "–"
    scale = 100.0 if percent else 1.0
    text = f"{scale * mean:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {scale * std:.{digits}f}"
    return text


def table1_markdown(results_by_run: Mapping[str, Mapping[str, Mapping]],
                    held_out: Mapping[str, Sequence[str]] | None = None, metric: str = "dice",
                    percent: bool = True, digits: int | None = None,
                    domains: Sequence[str] | None = None, caption: str | None = None) -> str:
    """The paper's Table 1 layout as markdown: one row per run, one column per domain.

    ``results_by_run``: run label (e.g. "all domains", "w/o Brain") -> domain -> summary (as
    ``evaluate_lib.summarize`` returns: ``<metric>_mean``, ``<metric>_std``). ``held_out``: run
    label -> the domains that run never trained on; their cells get a ``*``. Cells are
    ``mean ± std`` over the domain's test pairs, x100 when ``percent``; a missing domain is "–".
    Columns follow ``domains`` (default: first appearance over the runs).
    """
    held_out = held_out or {}
    if domains is None:
        domains = []
        for per_domain in results_by_run.values():
            domains += [d for d in per_domain if d not in domains]
    if digits is None:
        digits = 1 if percent else 3
    unit = " (%)" if percent else ""
    header = f"| Training{unit} | " + " | ".join(domains) + " |"
    lines = [header, "|" + "---|" * (len(domains) + 1)]
    for run, per_domain in results_by_run.items():
        cells = []
        for d in domains:
            text = _cell(per_domain.get(d), metric, percent, digits)
            if d in held_out.get(run, ()) and text != "–":
                text += "*"
            cells.append(text)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    name = {"dice": "Dice"}.get(metric, metric)
    footer = caption if caption is not None else (
        f"{name}{unit}, mean ± std over each domain's test pairs at original resolution; "
        f"* = domain held out of training (zero-shot).")
    return "\n".join(lines) + ("\n\n" + footer if footer else "") + "\n"


def initial_row(per_domain: Mapping[str, Mapping]) -> dict:
    """A "before registration" row for ``table1_markdown``: each domain's identity Dice."""
    return {d: {"dice_mean": s["dice_before_mean"], "dice_std": s.get("dice_before_std")}
            for d, s in per_domain.items() if "dice_before_mean" in s}


def metrics_markdown(per_domain: Mapping[str, Mapping], held_out: Sequence[str] = ()) -> str:
    """Every summary metric of one run, one row per domain."""
    cols = [("pairs", "pairs", None), ("Dice before", "dice_before", 3), ("Dice", "dice", 3),
            ("DSC30", "dsc30", 3), ("HD95 (mm)", "hd95", 2), ("% J<=0", "neg_jacobian_pct", 3),
            ("SDlogJ", "sdlogj", 3), ("s/pair", "runtime_s", 3)]
    lines = ["| Domain | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for domain, s in per_domain.items():
        cells = []
        for _, key, digits in cols:
            if key in ("pairs", "dsc30"):
                v = s.get(key)
                cells.append("–" if v is None or (isinstance(v, float) and not math.isfinite(v))
                             else (str(v) if digits is None else f"{v:.{digits}f}"))
            else:
                v = s.get(f"{key}_mean")
                cells.append("–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}")
        star = "*" if domain in held_out else ""
        lines.append(f"| {domain}{star} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_results(eval_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """``(domain -> summary, held-out domains)`` from an evaluation folder's ``summary.json``."""
    path = pathlib.Path(eval_dir) / SUMMARY_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found; run python -m promptreg_jax.evaluate first")
    try:
        data = json.loads(path.read_text())
        return dict(data["domains"]), list(data.get("held_out", []))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an evaluation summary ({e})")


# ------------------------------------------------------------------------------------ config
def load_config_file(spec: str):
    """Deprecated alias of :func:`promptreg_jax.recipes.load_config` (kept for one release)."""
    from promptreg_jax.recipes import load_config
    return load_config(spec)


def config_from_meta(meta: dict, source: str):
    """The training config saved in a checkpoint's metadata, as a ConfigDict."""
    import ml_collections
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"checkpoint {source} holds no training config; pass --config")
    return ml_collections.ConfigDict(meta["config"])


def model_from_checkpoint(path: str, allow_fallback: bool = False):
    """Deprecated alias of :func:`promptreg_jax.model.load_model` (kept for one release)."""
    from promptreg_jax.model import load_model
    return load_model(path, allow_fallback=allow_fallback)


# ------------------------------------------------------------------------------------ evaluation
def test_pairs_by_domain(config, cache_dir: str, max_pairs: int = 0):
    """``[(Domain, pairs, cache, image_size)]``: the test pairs of every configured domain."""
    from promptreg_jax import data as data_lib
    data_cfg = data_lib.resolve_data(config.data, generate=True)
    domains = data_lib.domains_from_config(data_cfg)
    cache = data_lib.VolumeCache(cache_dir, norm_mode=config.data.norm_mode)
    size = tuple(int(s) for s in config.data.image_size)
    out = []
    for domain in domains:
        pairs = list(data_lib.read_pairs(domain)[1])
        if max_pairs > 0:
            pairs = pairs[:max_pairs]
        if pairs:
            out.append((domain, pairs, cache, size))
    return out


def _rows_to_csv(path: pathlib.Path, rows: list[dict], num_classes: int, domain_names: list[str]):
    fields = ["pair", "moving_image", "fixed_image", "dice_before", "dice", "hd95",
              "neg_jacobian_pct", "sdlogj", "runtime_s"]
    label_fields = [f"dice_label_{l}" for l in range(1, num_classes)]
    weight_fields = [f"w_{n}" for n in domain_names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields + label_fields + weight_fields)
        for i, r in enumerate(rows):
            per_label = r.get("dice_per_label") or [None] * len(label_fields)
            weights = r.get("prompt_weights", [])
            w.writerow([i, r.get("moving_path", ""), r.get("fixed_path", "")]
                       + [_fmt(r.get(k)) for k in fields[3:]]
                       + [_fmt(v) for v in per_label] + [_fmt(v) for v in weights])


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def domain_summary(rows: list[dict], num_classes: int, training_domains: list[str]) -> dict:
    """``evaluate_lib.summarize`` plus the mean Dice per label and the mean prompt weights."""
    from promptreg_jax import evaluate_lib
    s = evaluate_lib.summarize(rows)
    per_label = np.asarray([[np.nan if v is None else v for v in r["dice_per_label"]]
                            for r in rows if r.get("dice_per_label")], np.float64)
    if per_label.size:
        with np.errstate(invalid="ignore"):
            s["dice_per_label_mean"] = {str(l + 1): float(np.nanmean(per_label[:, l]))
                                        if np.any(~np.isnan(per_label[:, l])) else None
                                        for l in range(per_label.shape[1])}
    weights = np.asarray([r["prompt_weights"] for r in rows if r.get("prompt_weights")])
    if weights.size:
        s["prompt_weights_mean"] = dict(zip(training_domains, weights.mean(0).tolist()))
    return s


def evaluate_checkpoint(model, params, meta: dict, config, out_dir: str | os.PathLike,
                        cache_dir: str, learn2reg_sdlogj: bool = False, max_pairs: int = 0,
                        run_name: str = "run", step: int | None = None,
                        checkpoint: str = "", progress: bool = True) -> dict:
    """Evaluates every domain's test pairs, writes the files listed in the module docstring.

    Returns ``{"domains": {name: summary}, "held_out": [...], ...}`` (what ``summary.json`` holds).
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm
    from promptreg_jax import evaluate_lib
    from promptreg_jax.data import iterate_eval_pairs

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained_on = list(meta.get("domains", []))
    predict_params = evaluate_lib.predict_fn(model)
    size = tuple(int(s) for s in config.data.image_size)
    # Compile once before timing, so runtime_s is the per-pair network time.
    x = jnp.zeros((1, *size, 1), jnp.float32)
    jax.block_until_ready(predict_params(params, x, x))

    def predict(m, f):
        return predict_params(params, jnp.asarray(m), jnp.asarray(f))

    summaries, held_out = {}, []
    for domain, pairs, cache, size in test_pairs_by_domain(config, cache_dir, max_pairs):
        if domain.held_out or domain.name not in trained_on:
            held_out.append(domain.name)
        rows = []
        for item in tqdm(iterate_eval_pairs(domain, pairs, cache, size), total=len(pairs),
                         desc=f"evaluate {domain.name}", unit="pair", disable=not progress,
                         file=sys.stderr):
            item["moving_path"] = item["moving_meta"]["path"]
            item["fixed_path"] = item["fixed_meta"]["path"]
            rows.extend(evaluate_lib.evaluate_pairs(predict, [item], domain.num_classes,
                                                    learn2reg_sdlogj=learn2reg_sdlogj))
        _rows_to_csv(out_dir / f"{domain.name}.csv", rows, domain.num_classes, trained_on)
        s = domain_summary(rows, domain.num_classes, trained_on)
        s["held_out"] = domain.name in held_out
        summaries[domain.name] = s
        (out_dir / f"{domain.name}.json").write_text(json.dumps(_json_safe(s), indent=2))
    result = {"run": run_name, "checkpoint": checkpoint, "step": step,
              "training_domains": trained_on, "held_out": held_out, "domains": summaries,
              "learn2reg_sdlogj": bool(learn2reg_sdlogj), "hd95_units": "mm",
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(_json_safe(result), indent=2))
    sd = "SDlogJ Learn2Reg-compatible (+3 offset)" if learn2reg_sdlogj else "SDlogJ clean"
    md = (f"# Evaluation of {run_name}"
          + (f" (step {step})" if step is not None else "") + "\n\n"
          + table1_markdown({run_name: summaries}, {run_name: held_out}) + "\n"
          + metrics_markdown(summaries, held_out)
          + f"\n{sd}; HD95 in mm; % J<=0 = voxels with Jacobian determinant <= 0; "
            f"* = held out of training.\n")
    (out_dir / "results.md").write_text(md)
    return result


# ------------------------------------------------------------------------------------ CLI
def _parser():
    from promptreg_jax.cli import ArgumentParser, add_checkpoint_args
    p = ArgumentParser(prog="python -m promptreg_jax.evaluate",
                description="Evaluate a trained run on every domain's test pairs.")
    add_checkpoint_args(p)
    p.add_argument("--config", default="", help="config file[:arg] (default: the checkpoint's)")
    p.add_argument("--out", default="", help="output folder (default: WORKDIR/eval)")
    p.add_argument("--name", default="", help="row label in results.md (default: workdir name)")
    p.add_argument("--max-pairs", type=int, default=0, help="test pairs per domain (0 = all)")
    p.add_argument("--learn2reg-sdlogj", action="store_true",
                   help="SDlogJ as the Learn2Reg script computes it (+3 offset, compressed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _run_folder(checkpoint: str) -> pathlib.Path:
    """The run folder of a checkpoint path (its ``checkpoints`` folder's parent)."""
    from promptreg_jax import checkpoint as ckpt_lib
    path = ckpt_lib.find_checkpoint_dir(checkpoint)
    if (path / "state").is_dir():
        path = path.parent
    return path.parent if path.name == "checkpoints" else path


def run(args) -> dict:
    from promptreg_jax import checkpoint as ckpt_lib
    from promptreg_jax.model import load_model, model_settings
    if not args.workdir and not args.checkpoint:
        raise ValueError("give --workdir RUN or --checkpoint PATH")
    if args.max_pairs < 0:
        raise ValueError(f"--max-pairs {args.max_pairs} is negative")
    source = args.checkpoint or args.workdir
    from promptreg_jax.recipes import load_config
    config = load_config(args.config) if args.config else None
    model, params, meta, step = load_model(source, allow_fallback=args.allow_older_checkpoint)
    if config is not None:
        ckpt_lib.check_compatible(meta, model_settings(config, meta["model"]["num_tasks"]), source)
    else:
        config = config_from_meta(meta, source)
    base = pathlib.Path(args.workdir) if args.workdir else _run_folder(source)
    out = pathlib.Path(args.out) if args.out else base / "eval"
    cache_dir = config.data.get("cache_dir", "") or str(
        (pathlib.Path(args.workdir) if args.workdir else out) / "cache")
    name = args.name or base.absolute().name
    result = evaluate_checkpoint(model, params, meta, config, out, cache_dir,
                                 learn2reg_sdlogj=args.learn2reg_sdlogj,
                                 max_pairs=args.max_pairs, run_name=name, step=step,
                                 checkpoint=str(pathlib.Path(source).absolute()),
                                 progress=not args.quiet)
    print(table1_markdown({name: result["domains"]}, {name: result["held_out"]}))
    print(metrics_markdown(result["domains"], result["held_out"]))
    print(f"wrote {out}/results.md, {SUMMARY_FILE}, <Domain>.csv and <Domain>.json")
    return result


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from promptreg_jax.cli import run_cli
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
