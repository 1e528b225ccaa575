"""Readers: a domain's on-disk layout -> lists of registration pairs (SPEC Appendix C).

``read_pairs(domain)`` returns ``(train_pairs, eval_pairs)``. Layouts:

* ``csv``: the authors' ``<root>/csv/train.csv`` and ``csv/test.csv`` with columns
  moving_image, moving_label, fixed_image, fixed_label (paths relative to root; label cells may
  be empty; optional columns moving_frame, fixed_frame index a 4D file's last axis).
* ``learn2reg``: ``<root>/<TASK>_dataset.json`` (B.1).
* ``msd``: Medical Segmentation Decathlon ``<root>/dataset.json`` (B.4).
* ``mnms``: the M&Ms OpenDataset, ES -> ED frames of each subject (B.5).
* ``files``: ``image_glob`` plus ``label_glob`` or ``label_suffix``, or a ``csv`` with columns
  image,label.

Inter-subject layouts without listed pairs (msd, files, mnms without Validation/Testing) split
the subjects, sorted by path, deterministically: the last ``max(2, ceil(n/10))`` are held for
evaluation (consecutive pairs: fixed ``s[i]`` <- moving ``s[i+1]``), and all ordered pairs among
the rest are training pairs. Held-out domains use every subject for evaluation.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
from typing import NamedTuple, Sequence

from promptreg_jax.data.domains import Domain
from promptreg_jax.data.errors import DataError


class Pair(NamedTuple):
    """One registration pair of absolute paths; labels may be None; frames index a 4D file."""
    moving_image: str
    moving_label: str | None
    fixed_image: str
    fixed_label: str | None
    moving_frame: int | None = None
    fixed_frame: int | None = None


Subject = tuple  # (image path, label path or None)


def _resolve(root: str, rel: str) -> str:
    return os.path.normpath(os.path.join(root, str(rel).strip()))


def _check_exists(paths, source: str) -> None:
    for path in sorted({p for p in paths if p is not None}):
        if not os.path.isfile(path):
            raise DataError(path, f"file not found (listed in {source})")


def _read_csv(path: str, required: Sequence[str]) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(path, f"missing column(s) {missing}; header is {header}")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"not a readable CSV ({e})")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})")
    if not isinstance(data, dict):
        raise DataError(path, "top level is not a JSON object")
    return data


def _key(data: dict, key: str, path: str, kind=list):
    if key not in data:
        raise DataError(path, f"missing key {key!r}")
    if not isinstance(data[key], kind):
        raise DataError(path, f"key {key!r} is not a {kind.__name__}")
    return data[key]


def _entry_path(entry, field: str, path: str, where: str, root: str) -> str:
    if not isinstance(entry, dict) or not entry.get(field):
        raise DataError(path, f"{where} has no {field!r} key")
    return _resolve(root, entry[field])


def parse_frame(value: str, path: str, row: int, column: str) -> int | None:
    """A CSV cell naming a frame of a 4D file: ``""`` -> None, else an integer >= 0."""
    if value in (None, ""):
        return None
    try:
        frame = int(value)
    except ValueError:
        raise DataError(path, f"row {row}: column {column} {value!r} is not an integer frame")
    if frame < 0:
        raise DataError(path, f"row {row}: column {column} {frame} is negative")
    return frame


def _need_two(subjects: Sequence, source: str) -> None:
    if len(subjects) < 2:
        raise DataError(source, f"found {len(subjects)} subject(s); a domain needs at least two")


def ordered_pairs(subjects: Sequence[Subject]) -> list[Pair]:
    """All ordered pairs (moving, fixed) of distinct subjects."""
    return [Pair(m[0], m[1], f[0], f[1]) for m in subjects for f in subjects if m is not f]


def consecutive_pairs(subjects: Sequence[Subject]) -> list[Pair]:
    """Fixed ``s[i]`` <- moving ``s[i+1]``, as Learn2Reg lists its validation pairs."""
    return [Pair(subjects[i + 1][0], subjects[i + 1][1], subjects[i][0], subjects[i][1])
            for i in range(len(subjects) - 1)]


def split_subjects(subjects: Sequence[Subject], held_out: bool, source: str):
    """Deterministic split into (train pairs, eval pairs); see the module docstring."""
    subjects = sorted(subjects, key=lambda s: s[0])
    _need_two(subjects, source)
    if held_out:
        return [], consecutive_pairs(subjects)
    n_eval = max(2, math.ceil(len(subjects) / 10))
    if len(subjects) - n_eval < 2:
        raise DataError(source, f"found {len(subjects)} subjects; a training domain needs at least "
                                f"4 (2 to train on, 2 to evaluate)")
    return ordered_pairs(subjects[:-n_eval]), consecutive_pairs(subjects[-n_eval:])


def _pairs_from_rows(rows, path: str, root: str) -> list[Pair]:
    pairs = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        if not r.get("moving_image") or not r.get("fixed_image"):
            raise DataError(path, f"row {i}: empty moving_image or fixed_image")
        lab = lambda c: _resolve(root, r[c]) if r.get(c) else None  # noqa: E731
        pairs.append(Pair(_resolve(root, r["moving_image"]), lab("moving_label"),
                          _resolve(root, r["fixed_image"]), lab("fixed_label"),
                          parse_frame(r.get("moving_frame", ""), path, i, "moving_frame"),
                          parse_frame(r.get("fixed_frame", ""), path, i, "fixed_frame")))
    return pairs


def read_csv_layout(domain: Domain):
    """The authors' layout (SPEC B.0): ``csv/train.csv`` and ``csv/test.csv`` under root."""
    cols = ("moving_image", "moving_label", "fixed_image", "fixed_label")
    out = []
    for split in ("train", "test"):
        path = os.path.join(domain.root, "csv", f"{split}.csv")
        if split == "train" and domain.held_out and not os.path.isfile(path):
            out.append([])
            continue
        pairs = _pairs_from_rows(_read_csv(path, cols), path, domain.root)
        if not pairs:
            raise DataError(path, "lists no pairs")
        subjects = {p.moving_image for p in pairs} | {p.fixed_image for p in pairs}
        if len(subjects) < 2 and all(p.moving_frame == p.fixed_frame for p in pairs):
            raise DataError(path, "names a single image; a domain needs at least two subjects")
        _check_exists([x for p in pairs for x in p[:4]], path)
        out.append(pairs)
    return out[0], out[1]


def _derived_label(image: str) -> str | None:
    label = image.replace("imagesTr", "labelsTr")
    return label if label != image and os.path.isfile(label) else None


def read_learn2reg(domain: Domain):
    """Learn2Reg ``<TASK>_dataset.json`` (SPEC B.1)."""
    found = sorted(glob.glob(os.path.join(domain.root, "*_dataset.json")))
    if not found:
        raise DataError(domain.root, "no *_dataset.json here (expected the Learn2Reg layout)")
    if len(found) > 1:
        raise DataError(domain.root, f"several *_dataset.json files {[os.path.basename(f) for f in found]};"
                                     f" keep one per domain folder")
    path, root = found[0], domain.root
    js = _read_json(path)
    label_of = {}
    for j, entry in enumerate(_key(js, "training", path)):
        image = _entry_path(entry, "image", path, f"training[{j}]", root)
        label_of[image] = (_resolve(root, entry["label"]) if entry.get("label")
                           else _derived_label(image))
    label = lambda image: label_of[image] if image in label_of else _derived_label(image)  # noqa: E731

    def listed_pairs(key):
        pairs = []
        for j, e in enumerate(_key(js, key, path)):
            fixed = _entry_path(e, "fixed", path, f"{key}[{j}]", root)
            moving = _entry_path(e, "moving", path, f"{key}[{j}]", root)
            pairs.append(Pair(moving, label(moving), fixed, label(fixed)))
        return pairs

    eval_pairs = listed_pairs("registration_val")
    if domain.held_out:
        train = []
    elif js.get("pairings", "unpaired") == "unpaired":
        val_images = {p.moving_image for p in eval_pairs} | {p.fixed_image for p in eval_pairs}
        subjects = [(im, lab) for im, lab in sorted(label_of.items()) if im not in val_images]
        _need_two(subjects, path)
        train = ordered_pairs(subjects)
    else:
        train = listed_pairs("training_paired_images")
    if not eval_pairs:
        raise DataError(path, "key 'registration_val' lists no pairs")
    if not train and not domain.held_out:
        raise DataError(path, "no training pairs")
    _check_exists([x for p in train + eval_pairs for x in p[:4]], path)
    return train, eval_pairs


def _skip(path: str) -> bool:
    return os.path.basename(path).startswith("._")  # macOS resource forks in the MSD tarballs


def read_msd(domain: Domain):
    """Medical Segmentation Decathlon ``dataset.json`` (SPEC B.4): pairs between subjects."""
    path = os.path.join(domain.root, "dataset.json")
    js = _read_json(path)
    subjects = []
    for j, entry in enumerate(_key(js, "training", path)):
        image = _entry_path(entry, "image", path, f"training[{j}]", domain.root)
        if _skip(image):
            continue
        label = _resolve(domain.root, entry["label"]) if entry.get("label") else None
        subjects.append((image, label))
    _check_exists([x for s in subjects for x in s], path)
    return split_subjects(subjects, domain.held_out, path)


def _split_ext(name: str) -> tuple[str, str]:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[:-len(ext)], ext
    return os.path.splitext(name)


def read_files(domain: Domain):
    """A folder of images with labels by glob or suffix, or a CSV with image,label columns."""
    root = domain.root
    if domain.csv:
        path = _resolve(root, domain.csv)
        rows = _read_csv(path, ("image", "label"))
        subjects = [(_resolve(root, r["image"]), _resolve(root, r["label"]) if r["label"] else None)
                    for r in rows if r["image"]]
        _check_exists([x for s in subjects for x in s], path)
        return split_subjects(subjects, domain.held_out, path)
    source = os.path.join(root, domain.image_glob or "<image_glob>")
    if not domain.image_glob:
        raise DataError(root, "reader 'files' needs image_glob (plus label_glob or label_suffix) or csv")
    images = [p for p in sorted(glob.glob(source)) if os.path.isfile(p) and not _skip(p)]
    if domain.label_suffix:
        images = [p for p in images if not _split_ext(os.path.basename(p))[0].endswith(domain.label_suffix)]
    if domain.label_glob:
        labels = {os.path.basename(p): p for p in glob.glob(os.path.join(root, domain.label_glob))
                  if not _skip(p)}
        labels = {k: v for k, v in labels.items() if v not in images}
    subjects = []
    for image in images:
        label = None
        if domain.label_suffix:
            stem, ext = _split_ext(image)
            label = stem + domain.label_suffix + ext
            if not os.path.isfile(label):
                raise DataError(label, f"label of {os.path.basename(image)} not found "
                                       f"(label_suffix {domain.label_suffix!r})")
        elif domain.label_glob:
            label = labels.get(os.path.basename(image))
            if label is None:
                raise DataError(image, f"no label with the same file name matches label_glob "
                                       f"{domain.label_glob!r}")
        subjects.append((image, label))
    return split_subjects(subjects, domain.held_out, source)


def _mnms_info(root: str) -> tuple[str, dict[str, tuple[int, int]]]:
    found = sorted(glob.glob(os.path.join(root, "*M*Ms*_Dataset_information*.csv")))
    if not found:
        raise DataError(root, "no *M*Ms*_Dataset_information*.csv here (expected the M&Ms "
                              "OpenDataset layout)")
    path = found[0]
    info = {}
    for i, r in enumerate(_read_csv(path, ("External code", "ED", "ES")), start=2):
        try:
            info[r["External code"]] = (int(r["ED"]), int(r["ES"]))
        except ValueError:
            raise DataError(path, f"row {i}: ED {r['ED']!r} / ES {r['ES']!r} are not integers")
    return path, info


def read_mnms(domain: Domain):
    """M&Ms OpenDataset (SPEC B.5): moving = ES frame, fixed = ED frame of the same subject.

    Training/Labeled subjects train, Validation and Testing evaluate (without those folders the
    last tenth of the training subjects, at least one, evaluates). Subjects without a
    ``_sa_gt`` file (the unlabeled GE cases, misplaced files) and with ED == ES are skipped.
    """
    path, info = _mnms_info(domain.root)
    groups = {"train": [], "eval": []}
    for group, sub in (("train", "Training/Labeled"), ("eval", "Validation"), ("eval", "Testing")):
        for folder in sorted(glob.glob(os.path.join(domain.root, sub, "*", ""))):
            code = os.path.basename(os.path.dirname(folder))
            image = os.path.join(folder, f"{code}_sa.nii.gz")
            label = os.path.join(folder, f"{code}_sa_gt.nii.gz")
            if _skip(code) or not (os.path.isfile(image) and os.path.isfile(label)):
                continue
            if code not in info:
                raise DataError(path, f"no row for subject {code} (folder {folder})")
            ed, es = info[code]
            if ed != es:
                groups[group].append(Pair(image, label, image, label, moving_frame=es, fixed_frame=ed))
    train, evals = groups["train"], groups["eval"]
    _need_two(train + evals, domain.root)
    if domain.held_out:
        return [], train + evals
    if not evals:
        n_eval = max(1, math.ceil(len(train) / 10))
        train, evals = train[:-n_eval], train[-n_eval:]
    if not train:
        raise DataError(os.path.join(domain.root, "Training/Labeled"), "no labeled training subjects")
    return train, evals


def read_pairs(domain: Domain) -> tuple[list[Pair], list[Pair]]:
    """``(train_pairs, eval_pairs)`` of a domain, by its reader."""
    fn = {"csv": read_csv_layout, "learn2reg": read_learn2reg, "msd": read_msd,
          "mnms": read_mnms, "files": read_files}.get(domain.reader)
    if fn is None:
        raise DataError(domain.root, f"unknown reader {domain.reader!r}")
    return fn(domain)
