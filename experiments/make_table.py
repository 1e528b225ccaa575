"""Assembles evaluation folders into one markdown table (the paper's Table 1/Table 2 layout).

    python experiments/make_table.py --out table1.md \
        "all domains=runs/table1/all_domains/eval" "w/o Brain=runs/table1/loo_brain/eval" ...

Each argument is ``LABEL=EVAL_DIR``, an output folder of ``python -m promptreg_jax.evaluate``
(its ``summary.json``); rows keep the argument order, held-out domains are starred. With
``--initial`` the first row is the Dice before registration (identity), as papers report it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from promptreg_jax.evaluate import initial_row, load_results, table1_markdown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=EVAL_DIR, one per table row")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--title", default="", help="heading line above the table")
    p.add_argument("--caption", default=None, help="line below the table (default: the legend)")
    p.add_argument("--initial", action="store_true",
                   help="first row: Dice before registration (from the first run's evaluation)")
    args = p.parse_args(argv)
    results, held_out = {}, {}
    try:
        for spec in args.runs:
            label, sep, folder = spec.partition("=")
            if not sep or not label or not folder:
                raise ValueError(f"{spec!r}: expected LABEL=EVAL_DIR")
            results[label], held_out[label] = load_results(folder)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.initial:
        first = next(iter(results.values()))
        results = {"before registration": initial_row(first), **results}
    md = (f"# {args.title}\n\n" if args.title else "") + table1_markdown(
        results, held_out, caption=args.caption)
    pathlib.Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
