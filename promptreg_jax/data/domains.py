"""Domains (one per anatomy/data set) from ``config.data.domains``.

Each entry of the ConfigDict list ``config.data.domains`` describes one domain::

    dict(name="Brain", modality="mr", reader="csv", root="Brain", num_classes=36,
         label_map=None, held_out=False)

``root`` may be relative: it is then taken under ``config.data.root``, or under the environment
variable ``PROMPTREG_DATA_ROOT`` when that key is empty; an empty ``root`` means the folder named
like the domain (the authors' ``data_root/<Task>`` layout). Training domains (``held_out=False``)
get task ids ``0..Z-1`` in config order; held-out domains get ``-1`` and are only evaluated.
The "files" reader also reads ``image_glob``, ``label_glob``, ``label_suffix`` and ``csv``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from promptreg_jax.data.errors import DataError

READERS = ("csv", "learn2reg", "msd", "mnms", "files")
MODALITIES = ("ct", "mr")
DATA_ROOT_ENV = "PROMPTREG_DATA_ROOT"
_KEYS = ("name", "modality", "reader", "root", "num_classes", "label_map", "held_out",
         "image_glob", "label_glob", "label_suffix", "csv")
_HOW_TO_POINT = (f"set the domain's root (or --config.data.root=/path/to/data, or the environment "
                 f"variable {DATA_ROOT_ENV}), or run the demo on synthetic data with "
                 f"--config=configs/demo.py")


@dataclasses.dataclass(frozen=True)
class Domain:
    """One training or evaluation domain; hashable, so it can key dicts of pairs."""
    name: str
    modality: str                     # "ct" or "mr": picks the intensity normalisation
    reader: str                       # one of READERS
    root: str                         # absolute folder
    num_classes: int                  # label classes including background
    task_id: int = -1                 # 0..Z-1 for training domains, -1 when held out
    held_out: bool = False
    label_map: tuple[tuple[int, int], ...] | None = None  # (source value, class); others -> 0
    image_glob: str = ""              # "files" reader: images, relative to root
    label_glob: str = ""              # "files" reader: labels, matched to images by file name
    label_suffix: str = ""            # "files" reader: label = image stem + suffix, same folder
    csv: str = ""                     # "files" reader: CSV with image,label columns

    @property
    def label_map_dict(self) -> dict[int, int] | None:
        return None if self.label_map is None else dict(self.label_map)


def _as_dict(entry: Any) -> dict:
    if hasattr(entry, "to_dict"):
        return entry.to_dict()
    if isinstance(entry, Mapping):
        return dict(entry)
    raise TypeError(f"expected a dict or ConfigDict, got {type(entry).__name__}")


def _label_map(raw, where: str, num_classes: int):
    if raw is None or (isinstance(raw, Mapping) and not raw):
        return None
    raw = _as_dict(raw) if not isinstance(raw, Mapping) else raw
    out = []
    for src, dst in raw.items():
        try:
            src_i, dst_i = int(src), int(dst)
        except (TypeError, ValueError):
            raise DataError(where, f"label_map entry {src!r}: {dst!r} is not integer -> integer")
        if not 0 <= dst_i < num_classes:
            raise DataError(where, f"label_map sends {src_i} to {dst_i}, outside 0..{num_classes - 1}"
                                   f" (num_classes={num_classes})")
        out.append((src_i, dst_i))
    return tuple(sorted(out)) or None


def data_root(cfg_data: Any = None) -> str:
    """``config.data.root`` if set, else ``$PROMPTREG_DATA_ROOT``, else ``""`` (the CWD)."""
    root = ""
    if cfg_data is not None:
        root = (cfg_data.get("root", "") if hasattr(cfg_data, "get") else "") or ""
    return str(root) or os.environ.get(DATA_ROOT_ENV, "")


def domains_from_config(data: Any) -> list[Domain]:
    """Parses ``config.data.domains`` into Domains (give it ``config.data``).

    Raises DataError naming the entry for an unknown reader or modality, a bad label map or
    class count, a duplicate name, and a root folder that does not exist (the message says how to
    point at the data).
    """
    if hasattr(data, "data") and not hasattr(data, "domains"):
        import warnings
        warnings.warn("domains_from_config(config) is deprecated: pass config.data",
                      DeprecationWarning, stacklevel=2)
        data = data.data
    entries = data.get("domains", None) if hasattr(data, "get") else None
    if not entries:
        raise DataError("config.data.domains", f"no domains configured; {_HOW_TO_POINT}")
    base = data_root(data)
    domains, names, next_task = [], set(), 0
    for i, entry in enumerate(entries):
        e = _as_dict(entry)
        name = str(e.get("name", "") or "")
        where = f"config.data.domains[{i}]" + (f" ({name})" if name else "")
        unknown = sorted(set(e) - set(_KEYS))
        if unknown:
            raise DataError(where, f"unknown key(s) {unknown}; allowed: {list(_KEYS)}")
        if not name:
            raise DataError(where, "missing 'name'")
        if name in names:
            raise DataError(where, f"duplicate domain name {name!r}")
        names.add(name)
        modality = str(e.get("modality", "")).lower()
        if modality not in MODALITIES:
            raise DataError(where, f"modality {e.get('modality')!r} unknown; use one of {MODALITIES}")
        reader = str(e.get("reader", "")).lower()
        if reader not in READERS:
            raise DataError(where, f"reader {e.get('reader')!r} unknown; use one of {READERS}")
        try:
            num_classes = int(e.get("num_classes"))
        except (TypeError, ValueError):
            raise DataError(where, f"num_classes {e.get('num_classes')!r} is not an integer")
        if num_classes < 2:
            raise DataError(where, f"num_classes {num_classes} < 2 (it counts the background)")
        root = os.path.expanduser(str(e.get("root", "") or name))
        if not os.path.isabs(root):
            root = os.path.join(base, root)
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise DataError(root, f"data folder of domain {name!r} not found; {_HOW_TO_POINT}")
        held_out = bool(e.get("held_out", False))
        domains.append(Domain(
            name=name, modality=modality, reader=reader, root=root, num_classes=num_classes,
            task_id=-1 if held_out else next_task, held_out=held_out,
            label_map=_label_map(e.get("label_map"), where, num_classes),
            image_glob=str(e.get("image_glob", "") or ""),
            label_glob=str(e.get("label_glob", "") or ""),
            label_suffix=str(e.get("label_suffix", "") or ""), csv=str(e.get("csv", "") or "")))
        next_task += 0 if held_out else 1
    return domains


def training_domains(domains: list[Domain]) -> list[Domain]:
    """The domains with a task id, in task-id order."""
    return sorted((d for d in domains if not d.held_out), key=lambda d: d.task_id)
