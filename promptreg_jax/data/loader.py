"""The grain training loader, the evaluation iterator and a loader benchmark.

Training sampling (a fix of the reference's i.i.d. task draws, SPEC section 4 "Sampling"): an
epoch is ``pairs_per_domain * Z`` pairs with exactly ``pairs_per_domain`` from each of the Z
training domains, in an order shuffled anew each epoch. Domain ``d`` takes its pairs from its own
stream, a permutation of its pair list reshuffled each time the list is used up, so over epochs
every pair of a domain is drawn equally often. Everything is a pure function of the element index
and the seed (grain ``MapDataset`` s), hence deterministic, resumable from ``get_state()``, and
identical with or without worker processes.

Multi-host: the global batch ``t`` is global elements ``[t G, (t + 1) G)`` with
``G = batch_size * process_count``; process ``p`` reads only elements ``t G + p b .. + b``.
"""

from __future__ import annotations

import time
from typing import Iterator, Mapping, Sequence

import grain
import numpy as np

from promptreg_jax.data.cache import VolumeCache, open_npy
from promptreg_jax.data.domains import Domain
from promptreg_jax.data.errors import DataError
from promptreg_jax.data.readers import Pair

_INFINITE = 2 ** 62  # length of the (conceptually endless) element index range


def _seeds(seed: int, n: int) -> list[int]:
    """Independent 31-bit seeds for the epoch shuffle and each domain stream."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n) % (2 ** 31)]


class _Sample:
    """Process-local element index -> (task id, volume ids of the pair)."""

    def __init__(self, pair_ids: Sequence[np.ndarray], pairs_per_domain: int, seed: int,
                 batch_size: int, process_index: int, process_count: int):
        z = len(pair_ids)
        seeds = _seeds(seed, z + 1)
        self.per_domain = pairs_per_domain
        self.epoch = pairs_per_domain * z
        self.b, self.p, self.g = batch_size, process_index, batch_size * process_count
        # Slot permutation per epoch (grain reshuffles a repeated shuffle with seed + epoch).
        self.slots = grain.MapDataset.range(self.epoch).shuffle(seed=seeds[0]).repeat()
        self.streams = [grain.MapDataset.source(list(range(len(ids)))).shuffle(seed=s).repeat()
                        for ids, s in zip(pair_ids, seeds[1:])]
        self.pair_ids = pair_ids

    def global_index(self, k: int) -> int:
        step, i = divmod(k, self.b)
        return step * self.g + self.p * self.b + i

    def __call__(self, k: int):
        g = self.global_index(int(k))
        epoch = g // self.epoch
        domain, within = divmod(int(self.slots[g]), self.per_domain)
        pair = int(self.streams[domain][epoch * self.per_domain + within])
        return domain, self.pair_ids[domain][pair]


class _Load:
    """(task id, volume ids) -> one training example, read memory-mapped from the cache."""

    def __init__(self, files: Sequence[str], with_labels: bool):
        self.files = list(files)
        self.with_labels = with_labels

    def _read(self, vid: int, dtype) -> np.ndarray:
        path = self.files[vid]
        volume = open_npy(path)  # the header under a lock; the data read below runs in parallel
        try:
            return np.asarray(volume, dtype=dtype)
        except (OSError, ValueError) as e:
            raise DataError(path, f"cache entry unreadable, rebuild the cache ({e})")

    def __call__(self, item):
        task_id, ids = item
        out = {"moving": self._read(ids[0], np.float32)[..., None],
               "fixed": self._read(ids[1], np.float32)[..., None],
               "task_id": np.int32(task_id)}
        if self.with_labels:
            out["moving_label"] = self._read(ids[2], np.int32)
            out["fixed_label"] = self._read(ids[3], np.int32)
        return out


def _volume_table(pairs_by_domain, cache: VolumeCache, image_size, with_labels: bool):
    """Volume files and, per domain, an (N, 4) array of volume ids per pair (-1: no label)."""
    files, index, keys, pair_ids = [], {}, {}, []

    def vid(domain, kind, path, frame):
        if (domain, kind, path, frame) not in keys:  # one stat + hash per volume, not per pair
            key_fn = cache.image_key if kind == "image" else cache.label_key
            key = key_fn(domain, path, frame, image_size)
            keys[domain, kind, path, frame] = key
            if key not in index:
                index[key] = len(files)
                files.append(cache.path(key))
        return index[keys[domain, kind, path, frame]]

    for domain, pairs in pairs_by_domain:
        rows = []
        for p in pairs:
            row = [vid(domain, "image", p.moving_image, p.moving_frame),
                   vid(domain, "image", p.fixed_image, p.fixed_frame), -1, -1]
            if with_labels:
                if p.moving_label is None or p.fixed_label is None:
                    raise DataError(p.moving_image if p.moving_label is None else p.fixed_image,
                                    f"with_labels=True but this image of a {domain.name} training "
                                    f"pair has no label")
                row[2] = vid(domain, "label", p.moving_label, p.moving_frame)
                row[3] = vid(domain, "label", p.fixed_label, p.fixed_frame)
            rows.append(row)
        pair_ids.append(np.asarray(rows, np.int64).reshape(-1, 4))
    return files, pair_ids


def _training_domains(pairs_by_domain: Mapping[Domain, Sequence[Pair]]):
    items = sorted(pairs_by_domain.items(), key=lambda kv: kv[0].task_id)
    ids = [d.task_id for d, _ in items]
    if ids != list(range(len(items))):
        raise DataError("pairs_by_domain", f"training domains must have task ids 0..Z-1, got {ids} "
                                           f"(held-out domains are evaluated, not trained on)")
    for domain, pairs in items:
        if not pairs:
            raise DataError(domain.root, f"domain {domain.name} has no training pairs")
    return items


def _grain_flags_readable() -> None:
    """grain 0.2.18's ``mp_prefetch`` reads its own absl flags, which fail when the program never
    parsed flags (grain#1355, fixed after 0.2.18). Marks only grain's flags as given (their
    defaults), as grain itself does in its workers, and leaves every other flag alone."""
    from absl import flags
    if flags.FLAGS.is_parsed():
        return
    for name in list(flags.FLAGS):
        if name.startswith("grain_") and not flags.FLAGS[name].present:
            flags.FLAGS[name].present = True


def make_train_loader(pairs_by_domain: Mapping[Domain, Sequence[Pair]], cache: VolumeCache,
                      image_size: Sequence[int], batch_size: int, seed: int, pairs_per_domain: int,
                      process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                      with_labels: bool = False, build_workers: int = 2,
                      progress: bool = True) -> grain.IterDataset:
    """An endless grain dataset of training batches; ``iter()`` it for a checkpointable iterator.

    Preprocesses missing volumes into ``cache`` first. Each batch is a dict of numpy arrays:
    ``moving``, ``fixed`` ``(b, X, Y, Z, 1)`` float32 in [0, 1], ``task_id`` ``(b,)`` int32, and
    with ``with_labels`` ``moving_label``, ``fixed_label`` ``(b, X, Y, Z)`` int32, where ``b`` is
    the per-process ``batch_size``. ``num_workers > 0`` reads in that many spawned processes
    (``grain`` ``mp_prefetch``; scripts need an ``if __name__ == "__main__":`` guard).
    """
    if batch_size < 1 or pairs_per_domain < 1 or process_count < 1:
        raise ValueError(f"batch_size {batch_size}, pairs_per_domain {pairs_per_domain} and "
                         f"process_count {process_count} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    items = _training_domains(pairs_by_domain)
    cache.build(dict(items), image_size, num_workers=build_workers, progress=progress)
    files, pair_ids = _volume_table(items, cache, image_size, with_labels)
    sample = _Sample(pair_ids, pairs_per_domain, seed, batch_size, process_index, process_count)
    ds = (grain.MapDataset.range(_INFINITE).map(sample).map(_Load(files, with_labels))
          .batch(batch_size))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if num_workers > 0:
        _grain_flags_readable()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=2))
    return ids


def iterate_eval_pairs(domain: Domain, pairs: Sequence[Pair], cache: VolumeCache,
                       image_size: Sequence[int], build_workers: int = 2,
                       progress: bool = False) -> Iterator[dict]:
    """Yields one evaluation item per pair, after caching the pairs' volumes.

    Item keys: ``moving``, ``fixed`` ``(1, X, Y, Z, 1)`` float32; ``task_id`` ``(1,)`` int32
    (-1 for a held-out domain); ``moving_label``, ``fixed_label`` ``(1, X, Y, Z)`` int32 at network
    size; ``moving_label_orig``, ``fixed_label_orig`` int32 at each image's native resolution
    (canonical axes; the two shapes may differ); ``moving_meta``, ``fixed_meta`` dicts with
    ``original_shape``, ``spacing``, ``affine``, ``original_affine``, ``path``, ``frame``; ``pair``
    and ``domain`` (the name). Label entries are None for a pair without labels.
    """
    cache.build({domain: list(pairs)}, image_size, num_workers=build_workers, progress=progress)
    for p in pairs:
        item = {"pair": p, "domain": domain.name, "task_id": np.asarray([domain.task_id], np.int32)}
        for side, image, label, frame in (("moving", p.moving_image, p.moving_label, p.moving_frame),
                                          ("fixed", p.fixed_image, p.fixed_label, p.fixed_frame)):
            ik = cache.image_key(domain, image, frame, image_size)
            item[side] = np.array(cache.array(ik), np.float32)[None, ..., None]
            item[f"{side}_meta"] = cache.meta(ik)
            item[f"{side}_label"] = item[f"{side}_label_orig"] = None
            if label is not None:
                lk = cache.label_key(domain, label, frame, image_size)
                item[f"{side}_label"] = np.array(cache.array(lk), np.int32)[None]
                item[f"{side}_label_orig"] = np.array(cache.array(lk, original=True), np.int32)
        yield item


def loader_throughput(pairs_by_domain: Mapping[Domain, Sequence[Pair]], cache: VolumeCache,
                      image_size: Sequence[int], batch_size: int = 1, num_batches: int = 20,
                      num_workers: int = 0, with_labels: bool = False, seed: int = 0,
                      pairs_per_domain: int = 100, warmup_batches: int = 2) -> dict:
    """Training pairs per second read from the (already built or here built) cache.

    The first ``warmup_batches`` (worker start-up, first page faults) are not timed.
    """
    ds = make_train_loader(pairs_by_domain, cache, image_size, batch_size, seed, pairs_per_domain,
                           num_workers=num_workers, with_labels=with_labels, progress=False)
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    seconds = time.perf_counter() - start
    pairs = num_batches * batch_size
    return dict(pairs_per_s=pairs / seconds, pairs=pairs, seconds=seconds, batch_size=batch_size,
                num_workers=num_workers, image_size=[int(n) for n in image_size])
