"""Synthetic multi-domain data set: the embedded default for the demo and the tests.

    python -m promptreg_jax.data.synthetic --out DIR [--size 48] [--subjects 8] [--seed 0]
        [--domains brain,abdomen,hippocampus,cardiac,hip]

Five domains modelled on the paper's, each a template anatomy drawn analytically in normalised
coordinates ``q in [-1, 1]^3``. A subject samples the template through its own smooth invertible
map ``q = S p + t + u(p)`` (per-axis scale S, translation t, a sum of four low-frequency sines u
whose gradient is bounded so that ``det(S + grad u) > 0``), so two subjects of a domain are in
true correspondence and Dice between their labels measures registration. The strength and finest
frequency of ``u`` vary per subject. Intensities, drawn per subject (``appearance``): a mean per
tissue (jittered; for some brain and hippocampus subjects an inverted contrast), a texture that
moves with the anatomy, partial-volume blur, Gaussian noise, and for MR a gamma, a smooth
multiplicative bias field of random strength and a random gain. CT is written in Hounsfield units.
``GENERATOR_VERSION`` is recorded in the completion marker: data written by another version of
the generator is regenerated, never reused.

Output, per domain, the authors' layout read by the "csv" reader (SPEC B.0)::

    DIR/<Folder>/images/*.nii.gz  labels/*.nii.gz  csv/train.csv  csv/test.csv
    DIR/domains.json   DIR/.complete.json (written last)

The last ``max(2, n // 4)`` subjects are for testing (consecutive pairs, both directions) and all
ordered pairs among the others train; with fewer than 4 subjects both use every subject. Cardiac
subjects carry an end-diastole (ED) and an end-systole (ES) frame; each pair is ES -> ED of one
subject, as in M&Ms, and the last ``max(1, n // 4)`` subjects test. The anatomy lives in
``synthetic_anatomy``.
"""

from __future__ import annotations

from promptreg_jax.cli import ArgumentParser
import csv
import json
import os
import sys

import nibabel as nib

from promptreg_jax.data.synthetic_anatomy import (DOMAINS, GENERATOR_VERSION, SPECS, appearance,
                                                  make_subject, num_classes, subject_map)

__all__ = ["DOMAINS", "GENERATOR_VERSION", "SPECS", "appearance", "config_entries",
           "ensure_synthetic", "generate", "main", "make_subject", "num_classes", "subject_map"]
_MARKER = ".complete.json"


def _save(array, affine, path):
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _pair_rows(names: list[str], cardiac: bool):
    n = len(names)
    n_test = max(2, n // 4)
    test = names[-n_test:] if n >= 4 else names
    train = names[:-n_test] if n >= 4 else names
    row = lambda m, f: [f"images/{m}.nii.gz", f"labels/{m}.nii.gz",  # noqa: E731
                        f"images/{f}.nii.gz", f"labels/{f}.nii.gz"]
    if cardiac:
        n_test = max(1, n // 4)
        test, train = names[-n_test:], names[:-n_test]
        return [row(f"{s}_es", f"{s}_ed") for s in train], [row(f"{s}_es", f"{s}_ed") for s in test]
    train_rows = [row(m, f) for m in train for f in train if m != f]
    test_rows = [row(test[i + d], test[i + 1 - d]) for i in range(len(test) - 1) for d in (0, 1)]
    return train_rows, test_rows


def _write_csv(path, rows):
    tmp = path + ".part"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["moving_image", "moving_label", "fixed_image", "fixed_label"])
        w.writerows(rows)
    os.replace(tmp, path)


def _check_args(out_dir, size, subjects, domains):
    if size < 16:
        raise ValueError(f"--size {size} is below 16")
    if subjects < 2:
        raise ValueError(f"--subjects {subjects} is below 2 (pairs need two subjects)")
    unknown = [d for d in domains if d not in SPECS]
    if unknown or not domains:
        raise ValueError(f"unknown domain(s) {unknown or domains}; choose from {','.join(DOMAINS)}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out_dir} is not writable ({e.strerror})")


def generate(out_dir: str, size: int = 48, subjects: int = 8, seed: int = 0,
             domains=DOMAINS) -> list[dict]:
    """Writes the data set (deterministic in the arguments); returns the config domain entries."""
    out_dir = os.path.abspath(out_dir)
    domains = list(domains)
    _check_args(out_dir, size, subjects, domains)
    marker = os.path.join(out_dir, _MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    summary = []
    for key in domains:
        spec = SPECS[key]
        root = os.path.join(out_dir, spec.folder)
        for sub in ("images", "labels", "csv"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        names = [f"{key}_{i:03d}" for i in range(subjects)]
        for i, name in enumerate(names):
            frames, shape, spacing, affine = make_subject(key, size, seed, i)
            for phase, (image, labels) in frames.items():
                stem = f"{name}_{phase}" if phase else name
                _save(image, affine, os.path.join(root, "images", f"{stem}.nii.gz"))
                _save(labels, affine, os.path.join(root, "labels", f"{stem}.nii.gz"))
        train_rows, test_rows = _pair_rows(names, key == "cardiac")
        _write_csv(os.path.join(root, "csv", "train.csv"), train_rows)
        _write_csv(os.path.join(root, "csv", "test.csv"), test_rows)
        summary.append(dict(name=spec.folder, key=key, modality=spec.modality,
                            num_classes=num_classes(key), reader="csv", root=spec.folder,
                            shape=list(shape), spacing=[round(s, 4) for s in spacing],
                            train_pairs=len(train_rows), test_pairs=len(test_rows)))
    args = dict(size=size, subjects=subjects, seed=seed, domains=domains,
                version=GENERATOR_VERSION)
    with open(os.path.join(out_dir, "domains.json"), "w") as f:
        json.dump(dict(args, domains=summary), f, indent=1)
    with open(marker + ".part", "w") as f:
        json.dump(args, f)
    os.replace(marker + ".part", marker)
    return config_entries(out_dir)


def config_entries(out_dir: str) -> list[dict]:
    """``config.data.domains`` entries for a generated data set (absolute roots)."""
    with open(os.path.join(out_dir, "domains.json")) as f:
        summary = json.load(f)["domains"]
    return [dict(name=d["name"], modality=d["modality"], reader="csv", num_classes=d["num_classes"],
                 root=os.path.join(os.path.abspath(out_dir), d["root"]), held_out=False)
            for d in summary]


def ensure_synthetic(out_dir: str, size: int = 48, subjects: int = 8, seed: int = 0,
                     domains=DOMAINS) -> list[dict]:
    """Generates the data set unless a complete one with these arguments, written by this
    ``GENERATOR_VERSION``, is already there (one from another version is regenerated)."""
    marker = os.path.join(os.path.abspath(out_dir), _MARKER)
    want = dict(size=size, subjects=subjects, seed=seed, domains=list(domains),
                version=GENERATOR_VERSION)
    try:
        with open(marker) as f:
            if json.load(f) == want:
                return config_entries(out_dir)
    except (OSError, ValueError):
        pass
    print(f"generating the synthetic data set (size {size}, {subjects} subjects per domain) into "
          f"{os.path.abspath(out_dir)}", file=sys.stderr, flush=True)
    return generate(out_dir, size, subjects, seed, domains)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m promptreg_jax.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, default=48, help="base volume size (>= 16)")
    parser.add_argument("--subjects", type=int, default=8, help="subjects per domain (>= 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset")
    args = parser.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    try:
        entries = generate(args.out, args.size, args.subjects, args.seed, domains)
    except ValueError as e:
        parser.error(str(e))
    for e in entries:
        print(f"{e['name']}: {e['modality']}, {e['num_classes']} classes, {e['root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
