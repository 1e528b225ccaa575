"""The data side of a training run, from the config: domains, cache, train iterator, eval pairs.

``prepare_data`` (one process) writes what a run reads: with ``config.data.synthetic.enabled`` it
generates the offline synthetic domains (on first use) into ``config.data.root``, or into a
per-user cache folder when that is empty, and it fills the volume cache. ``build_pipeline`` (every
process) turns ``config.data`` into domains, pairs and a loader. Both take ``config.data`` only;
coordinating processes is the trainer's job.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from promptreg_jax.data.cache import VolumeCache
from promptreg_jax.data.domains import Domain, domains_from_config
from promptreg_jax.data.loader import iterate_eval_pairs, make_train_loader
from promptreg_jax.data.readers import Pair, read_pairs


def synthetic_root(syn) -> str:
    """Default folder of the synthetic data set: ``$XDG_CACHE_HOME/promptreg_jax/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "promptreg_jax",
                        f"synthetic_s{int(syn.size)}_n{int(syn.subjects)}_seed{int(syn.seed)}")


def resolve_data(data_cfg, generate: bool = True):
    """``config.data`` with its root resolved: for the synthetic data set, the folder it lives in
    (``data.root``, else ``synthetic_root``), generated there on first use when ``generate``
    (the one place that decides where synthetic data is read and written). Returns a copy."""
    import ml_collections
    data_cfg = ml_collections.ConfigDict(data_cfg.to_dict()) \
        if hasattr(data_cfg, "to_dict") else ml_collections.ConfigDict(dict(data_cfg))
    if data_cfg.synthetic.enabled:
        root = data_cfg.root or synthetic_root(data_cfg.synthetic)
        if generate:
            from promptreg_jax.data import synthetic
            syn = data_cfg.synthetic
            synthetic.ensure_synthetic(root, int(syn.size), int(syn.subjects), int(syn.seed))
        data_cfg.root = root
    return data_cfg


@dataclasses.dataclass
class Pipeline:
    """What the trainer needs: domains, a resumable train iterator, and evaluation items."""
    domains: list[Domain]
    train_pairs: dict[Domain, list[Pair]]
    eval_pairs: dict[Domain, list[Pair]]
    cache: VolumeCache
    image_size: tuple[int, int, int]
    train_iter: Any
    _eval_items: dict | None = None

    @property
    def train_domains(self) -> list[Domain]:
        return [d for d in self.domains if not d.held_out]

    def eval_items(self) -> dict[Domain, list[dict]]:
        """Evaluation items per domain (held-out domains included), loaded once and kept."""
        if self._eval_items is None:
            self._eval_items = {d: list(iterate_eval_pairs(d, pairs, self.cache, self.image_size))
                                for d, pairs in self.eval_pairs.items() if pairs}
        return self._eval_items


def prepare_data(data_cfg, workdir: str | os.PathLike, progress: bool = True):
    """Everything that writes files, done by one process before the others read: generates the
    synthetic data set on first use and fills the cache with every pair the run reads. Returns
    the resolved ``config.data``."""
    data_cfg = resolve_data(data_cfg, generate=True)
    domains, train_pairs, eval_pairs = _pairs(data_cfg)
    everything = {d: train_pairs.get(d, []) + eval_pairs[d] for d in domains}
    cache = VolumeCache(_cache_dir(data_cfg, workdir), norm_mode=data_cfg.norm_mode)
    cache.build(everything, tuple(int(n) for n in data_cfg.image_size),
                num_workers=max(int(data_cfg.num_workers), 2), progress=progress)
    return data_cfg


def _pairs(data_cfg):
    """``(domains, train pairs of the training domains, eval pairs of every domain)``."""
    domains = domains_from_config(data_cfg)
    splits = {d: read_pairs(d) for d in domains}
    train_pairs = {d: list(s[0]) for d, s in splits.items() if not d.held_out}
    n_eval = int(data_cfg.eval_pairs_per_domain)
    eval_pairs = {d: list(s[1])[:n_eval] if n_eval > 0 else [] for d, s in splits.items()}
    return domains, train_pairs, eval_pairs


def _cache_dir(data_cfg, workdir) -> str:
    return data_cfg.cache_dir or str(pathlib.Path(workdir) / "cache")


def build_pipeline(data_cfg, workdir: str | os.PathLike, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> Pipeline:
    """The :class:`Pipeline` of this process from ``config.data`` (after ``prepare_data`` ran in
    one process; in a multi-process run the trainer makes the others wait for it).

    ``batch_size`` is the per-process batch; each process reads only its slice of every global
    batch.
    """
    data_cfg = resolve_data(data_cfg, generate=False)
    domains, train_pairs, eval_pairs = _pairs(data_cfg)
    image_size = tuple(int(s) for s in data_cfg.image_size)
    cache = VolumeCache(_cache_dir(data_cfg, workdir), norm_mode=data_cfg.norm_mode)
    loader = make_train_loader(train_pairs, cache, image_size, batch_size, int(seed),
                               int(data_cfg.pairs_per_domain), process_index=process_index,
                               process_count=process_count, num_workers=int(data_cfg.num_workers),
                               progress=False)
    return Pipeline(domains, train_pairs, eval_pairs, cache, image_size, iter(loader))
