"""On-disk cache of preprocessed volumes: one ``.npy`` per volume, read memory-mapped.

An entry's key hashes the source file (absolute path, size, mtime), the frame, and the
preprocessing parameters that shape the result: ``image_size`` plus, for images, modality and
normalisation mode, and for labels, ``num_classes`` and ``label_map``. Touching a file or changing
a parameter therefore rebuilds. Per key ``K`` the cache holds::

    K.npy        network-size array: float32 image or uint8/int16 labels, (X, Y, Z)
    K.orig.npy   labels only: the native-resolution (canonical axes) labels, for evaluation
    K.json       metadata (original_shape, spacing, affine, original_affine, ...), written last

Every file is written to a temporary name and moved into place with ``os.replace``, and the JSON
comes last, so an interrupted build leaves no entry that looks complete.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from typing import Mapping, Sequence

import numpy as np
import tqdm

from promptreg_jax.data import preprocess
from promptreg_jax.data.domains import Domain
from promptreg_jax.data.errors import DataError
from promptreg_jax.data.readers import Pair

_VERSION = 1  # bump when preprocessing changes what a key produces

# numpy reads a .npy header with ``ast.literal_eval``. CPython 3.11 keeps the AST constructor's
# recursion depth in interpreter-wide state, so two threads parsing at once can fail with
# "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905; it killed a training
# run here on 3.11.7, in grain's reader threads). Only opening the memory map is serialised.
_NPY_OPEN = threading.Lock()


def open_npy(path: str) -> np.ndarray:
    """``path`` memory-mapped read-only (thread-safe); a missing or bad file is a ``DataError``."""
    try:
        with _NPY_OPEN:
            return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(path, f"cache entry missing or unreadable, rebuild the cache ({e})")


def _size(image_size: Sequence[int]) -> list[int]:
    size = [int(n) for n in image_size]
    if len(size) != 3 or min(size) < 2:
        raise ValueError(f"image_size must be 3 positive sizes >= 2, got {tuple(image_size)}")
    return size


def _label_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.int16


def _atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class VolumeCache:
    """Preprocessed volumes under ``cache_dir`` for one normalisation mode ("paper"/"reference")."""

    def __init__(self, cache_dir: str, norm_mode: str = "paper"):
        if norm_mode not in preprocess.NORM_MODES:
            raise ValueError(f"norm_mode {norm_mode!r} unknown; use one of {preprocess.NORM_MODES}")
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.norm_mode = norm_mode
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
        except OSError as e:
            raise DataError(self.cache_dir, f"cannot create the cache folder ({e.strerror})")
        self._meta: dict[str, dict] = {}

    # Keys ----------------------------------------------------------------------------------------
    def _key(self, kind: str, path: str, frame, params: dict) -> str:
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(path, "file not found")
        blob = json.dumps([_VERSION, kind, path, st.st_size, st.st_mtime_ns, frame, params],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def image_key(self, domain: Domain, path: str, frame, image_size) -> str:
        return self._key("image", path, frame, dict(image_size=_size(image_size),
                                                      modality=domain.modality, norm=self.norm_mode))

    def label_key(self, domain: Domain, path: str, frame, image_size) -> str:
        return self._key("label", path, frame, dict(
            image_size=_size(image_size), num_classes=domain.num_classes,
            label_map=[list(kv) for kv in domain.label_map] if domain.label_map else None))

    # Reads ---------------------------------------------------------------------------------------
    def path(self, key: str, original: bool = False) -> str:
        return os.path.join(self.cache_dir, f"{key}{'.orig' if original else ''}.npy")

    def has(self, key: str) -> bool:
        return os.path.isfile(os.path.join(self.cache_dir, f"{key}.json"))

    def array(self, key: str, original: bool = False) -> np.ndarray:
        """The cached array, memory-mapped read-only; ``original`` = native-resolution labels."""
        return open_npy(self.path(key, original))

    def meta(self, key: str) -> dict:
        if key not in self._meta:
            path = os.path.join(self.cache_dir, f"{key}.json")
            try:
                with open(path) as f:
                    self._meta[key] = json.load(f)
            except (OSError, ValueError) as e:
                raise DataError(path, f"cache metadata missing or unreadable, rebuild the cache ({e})")
        return self._meta[key]

    # Build ---------------------------------------------------------------------------------------
    def _write(self, key: str, array: np.ndarray, meta: dict, original: np.ndarray | None) -> None:
        _atomic_write(self.path(key), lambda f: np.save(f, array))
        if original is not None:
            _atomic_write(self.path(key, original=True), lambda f: np.save(f, original))
        _atomic_write(os.path.join(self.cache_dir, f"{key}.json"),
                      lambda f: f.write(json.dumps(meta).encode()))

    def _build_one(self, job) -> None:
        kind, domain, path, frame, size, key = job
        if kind == "image":
            image, meta = preprocess.prepare_image(path, frame, domain.modality, self.norm_mode, size)
            self._write(key, image, dict(meta, kind="image", modality=domain.modality), None)
        else:
            dtype = _label_dtype(domain.num_classes)
            net, orig, meta = preprocess.prepare_label(path, frame, domain.num_classes,
                                                       domain.label_map_dict, size)
            self._write(key, net.astype(dtype), dict(meta, kind="label",
                                                     num_classes=domain.num_classes),
                        orig.astype(dtype))

    def build(self, pairs_by_domain: Mapping[Domain, Sequence[Pair]], image_size,
              num_workers: int = 2, progress: bool = True) -> int:
        """Preprocesses every volume the pairs name that is not cached yet; returns how many.

        Runs ``num_workers`` threads (0: inline) under a tqdm bar. Afterwards each label is
        checked to share its image's grid (DataError naming the label file otherwise).
        """
        size = _size(image_size)
        jobs, seen, grids = [], set(), set()
        for domain, pairs in pairs_by_domain.items():
            # Volumes, not pairs: an unpaired data set has ~n^2 pairs of n volumes.
            volumes = {(p.moving_image, p.moving_label, p.moving_frame) for p in pairs}
            volumes |= {(p.fixed_image, p.fixed_label, p.fixed_frame) for p in pairs}
            for image, label, frame in sorted(volumes, key=repr):
                ik = self.image_key(domain, image, frame, size)
                vols = [("image", image, ik)]
                if label is not None:
                    lk = self.label_key(domain, label, frame, size)
                    vols.append(("label", label, lk))
                    grids.add((image, ik, label, lk))
                for kind, path, key in vols:
                    if key not in seen and not self.has(key):
                        jobs.append((kind, domain, path, frame, size, key))
                    seen.add(key)
        # A bar on a terminal; where stderr is a file (cluster logs), one line when done.
        on_tty = sys.stderr.isatty()
        bar = tqdm.tqdm(total=len(jobs), desc="preprocessing volumes", unit="vol",
                        disable=not progress or not jobs or not on_tty)
        t0 = time.perf_counter()
        try:
            if num_workers <= 0:
                for job in jobs:
                    self._build_one(job)
                    bar.update()
            else:
                with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
                    futures = [pool.submit(self._build_one, job) for job in jobs]
                    try:
                        for fut in concurrent.futures.as_completed(futures):
                            fut.result()
                            bar.update()
                    except BaseException:
                        for fut in futures:
                            fut.cancel()
                        raise
        finally:
            bar.close()
        if progress and jobs and not on_tty:
            print(f"preprocessed {len(jobs)} volumes in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        for image, ik, label, lk in sorted(grids):
            preprocess.check_same_grid(image, self.meta(ik)["original_shape"], label,
                                       self.meta(lk)["original_shape"])
        return len(jobs)
