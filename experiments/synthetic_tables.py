"""Table 1 and Table 2 of the paper, CPU-sized, on the synthetic data set (runs here end to end).

    python experiments/synthetic_tables.py [--out runs/synthetic_tables] [--steps 120]

The same sweep as ``experiments/table1.sh`` and ``table2.sh``, shrunk to minutes on a laptop CPU:
``configs/demo.py:tiny`` (c = 4, one flow estimate per level, 16^3 network input) on the synthetic
domains (``--size`` voxels, ``--subjects`` per domain), ``--steps`` training steps per run. Runs:
all domains, the five leave-one-out trainings (Table 1), and w/o RPG and w/o R. Cons. (Table 2,
whose "full" row is the all-domains run). Each run is evaluated on every domain's test pairs at
original resolution (``promptreg_jax.evaluate``), and the tables are written to
``OUT/table1.md`` and ``OUT/table2.md``, each with a first row of the Dice before registration.
Rerunning reuses finished runs (``OUT/timing.json`` says which were trained, and how long each
took). Compilation dominates the run time at the default 120 steps (about 6 steps/s once
compiled, and 4 distinct training programs plus 3 inference programs to compile); the tiny
network needs about 600 steps before its Dice beats the identity in most domains. The numbers
show the pipeline working, not the paper's results.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

from promptreg_jax import recipes

REPO = pathlib.Path(__file__).resolve().parents[1]
DOMAINS = ("Abdominal", "Brain", "Hippocampus", "Cardiac", "Hip")


def demo_config(args, out: pathlib.Path):
    config = recipes.load_config(f"{REPO / 'configs' / 'demo.py'}:tiny")
    config.data.root = str(out / "synthetic")
    config.data.synthetic.size = args.size
    config.data.synthetic.subjects = args.subjects
    config.data.image_size = (args.image,) * 3
    config.data.cache_dir = str(out / "cache")       # shared by every run
    config.data.eval_pairs_per_domain = 0            # evaluated below, on every test pair
    config.train.total_steps = args.steps
    config.train.final_eval = False
    config.train.checkpoint_every_steps = args.steps
    config.train.log_every_steps = max(1, args.steps // 10)
    return config


def variants(base):
    """``[(row label, run folder, config)]``: Table 1 runs, then the two Table 2 ablations."""
    out = [("all domains", "all_domains", base)]
    for name in DOMAINS:
        c = recipes.holding_out(base.copy_and_resolve_references(), name)
        out.append((f"w/o {name}", f"loo_{name.lower()}", c))
    no_rpg = recipes.without_prompt(base.copy_and_resolve_references())
    no_cons = recipes.without_constraints(base.copy_and_resolve_references())
    out += [("w/o RPG", "no_rpg", no_rpg), ("w/o R. Cons.", "no_constraints", no_cons)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "runs" / "synthetic_tables"))
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--size", type=int, default=32, help="synthetic volume size")
    p.add_argument("--subjects", type=int, default=12, help="synthetic subjects per domain")
    p.add_argument("--image", type=int, default=16, help="network input size (multiple of 8)")
    args = p.parse_args(argv)

    from promptreg_jax import evaluate, train
    from promptreg_jax.model import load_model
    from promptreg_jax.cli import enable_compilation_cache
    enable_compilation_cache()
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, held_out, timing = {}, {}, {}
    for label, folder, config in variants(demo_config(args, out)):
        t0 = time.perf_counter()
        workdir = out / folder
        print(f"\n=== {label}: training {args.steps} steps in {workdir}", flush=True)
        result = train.train_and_evaluate(config, str(workdir))
        trained = bool(result["train"])  # empty when a finished checkpoint was reused
        model, params, meta, step = load_model(str(workdir))
        res = evaluate.evaluate_checkpoint(
            model, params, meta, evaluate.config_from_meta(meta, str(workdir)), workdir / "eval",
            str(out / "cache"), run_name=label, step=step, checkpoint=str(workdir))
        results[label], held_out[label] = res["domains"], res["held_out"]
        timing[label] = {"seconds": time.perf_counter() - t0, "trained": trained}
        print(f"=== {label}: {timing[label]['seconds']:.0f} s", flush=True)
    minutes = (time.perf_counter() - start) / 60
    cmd = "python experiments/synthetic_tables.py " + " ".join(
        f"--{k} {v}" for k, v in (("steps", args.steps), ("size", args.size),
                                  ("subjects", args.subjects), ("image", args.image)))
    note = (f"Synthetic data ({args.subjects} subjects per domain, {args.size}^3 volumes), "
            f"configs/demo.py:tiny at {args.image}^3, {args.steps} training steps per run; made "
            f"by `{cmd}`. Dice (%) mean ± std over each domain's test pairs at original "
            f"resolution; * = held out of training.")
    initial = {"before registration": evaluate.initial_row(results["all domains"])}
    table1_rows = ["all domains"] + [f"w/o {d}" for d in DOMAINS]
    table1 = evaluate.table1_markdown({**initial, **{k: results[k] for k in table1_rows}},
                                      {k: held_out[k] for k in table1_rows}, caption=note)
    table2 = evaluate.table1_markdown(
        {**initial, "PromptReg (full)": results["all domains"], "w/o RPG": results["w/o RPG"],
         "w/o R. Cons.": results["w/o R. Cons."]}, {}, caption=note)
    (out / "table1.md").write_text("# Table 1 (synthetic, CPU-sized)\n\n" + table1)
    (out / "table2.md").write_text("# Table 2 (synthetic, CPU-sized)\n\n" + table2)
    (out / "timing.json").write_text(json.dumps(
        {"command": cmd, "minutes": minutes, "machine": platform.machine(), "runs": timing},
        indent=2))
    print("\n" + table1 + "\n" + table2)
    print(f"wrote {out}/table1.md and table2.md in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
