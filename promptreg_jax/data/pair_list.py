"""Pairs to register, from the command line or a pair list CSV, checked before any model work.

``pairs.csv`` has columns ``fixed, moving`` and optionally ``fixed_label, moving_label,
fixed_modality, moving_modality, fixed_frame, moving_frame`` (paths relative to the CSV's folder).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Sequence

import numpy as np

from promptreg_jax.data.domains import MODALITIES
from promptreg_jax.data.errors import DataError
from promptreg_jax.data.preprocess import check_header
from promptreg_jax.data.readers import parse_frame

CT_MIN_THRESHOLD = -500.0


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


def _modality(value, path: str, row: int, column: str):
    if value in (None, ""):
        return None
    value = str(value).lower()
    if value not in MODALITIES:
        raise DataError(path, f"row {row}: column {column} {value!r} unknown; use one of "
                              f"{MODALITIES}")
    return value


def read_pair_list(path: str | os.PathLike) -> list[PairSpec]:
    """Reads a pair list CSV (see the module docstring); paths are resolved against its folder."""
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

    def resolve(v):
        return os.path.normpath(os.path.join(root, v)) if v else None

    pairs = []
    for i, r in enumerate(rows, start=2):
        if not r.get("fixed") or not r.get("moving"):
            raise DataError(path, f"row {i}: empty fixed or moving")
        pairs.append(PairSpec(
            resolve(r["fixed"]), resolve(r["moving"]),
            resolve(r.get("fixed_label", "")), resolve(r.get("moving_label", "")),
            _modality(r.get("fixed_modality"), path, i, "fixed_modality"),
            _modality(r.get("moving_modality"), path, i, "moving_modality"),
            parse_frame(r.get("fixed_frame", ""), path, i, "fixed_frame"),
            parse_frame(r.get("moving_frame", ""), path, i, "moving_frame"),
            source=f"{path} row {i}"))
    if not pairs:
        raise DataError(path, "lists no pairs")
    return pairs


def check_pair(pair: PairSpec) -> None:
    """Fails fast, before any model work: a missing or unreadable file, a 4D file without a frame,
    a bad frame. Reads headers only."""
    for kind, path, frame in (("fixed", pair.fixed, pair.fixed_frame),
                              ("moving", pair.moving, pair.moving_frame),
                              ("fixed_label", pair.fixed_label, pair.fixed_frame),
                              ("moving_label", pair.moving_label, pair.moving_frame)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise DataError(path, f"file not found ({kind}, {pair.source})")
        side = kind.split("_")[0]
        check_header(path, frame, no_frame_hint=f"choose a frame with --{side}-frame N "
                                                f"(or a {side}_frame column)")


def check_pairs(pairs: Sequence[PairSpec]) -> list[tuple[PairSpec, str]]:
    """``check_pair`` on every pair; returns ``(pair, one-line error)`` for each that fails."""
    bad = []
    for p in pairs:
        try:
            check_pair(p)
        except DataError as e:
            bad.append((p, str(e)))
    return bad


def guess_modality(image: np.ndarray) -> str:
    """``ct`` when the minimum is below -500 (Hounsfield units), else ``mr``."""
    return "ct" if float(np.min(image)) < CT_MIN_THRESHOLD else "mr"
