"""The data side of a training run, from the config: domains, cache, train iterator, eval pairs.

``build_pipeline`` is the one place where ``config.data`` turns into a loader. With
``config.data.synthetic.enabled`` it first generates the offline synthetic domains (on first use)
into ``config.data.root``, or into a per-user cache folder when that is empty.
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


def _barrier(name: str, process_count: int):
    if process_count > 1:
        from promptreg_jax.multihost import sync_processes
        sync_processes(name)


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


def build_pipeline(config, workdir: str | os.PathLike, batch_size: int, process_index: int = 0,
                   process_count: int = 1, progress: bool = True) -> Pipeline:
    """Reads ``config.data`` and returns a :class:`Pipeline` for this process.

    ``batch_size`` is the per-process batch; each process reads only its slice of every global
    batch. Process 0 generates data and fills the cache; the others wait for it.
    """
    data = config.data
    if data.synthetic.enabled:
        root = data.root or synthetic_root(data.synthetic)
        if process_index == 0:
            from promptreg_jax.data import synthetic
            synthetic.ensure_synthetic(root, int(data.synthetic.size), int(data.synthetic.subjects),
                                       int(data.synthetic.seed))
        _barrier("synthetic", process_count)
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.data.root = root
        data = config.data
    domains = domains_from_config(config)
    splits = {d: read_pairs(d) for d in domains}
    train_pairs = {d: list(s[0]) for d, s in splits.items() if not d.held_out}
    n_eval = int(data.eval_pairs_per_domain)
    eval_pairs = {d: list(s[1])[:n_eval] if n_eval > 0 else [] for d, s in splits.items()}
    image_size = tuple(int(s) for s in data.image_size)
    cache_dir = data.cache_dir or str(pathlib.Path(workdir) / "cache")
    cache = VolumeCache(cache_dir, norm_mode=data.norm_mode)
    if process_index == 0:
        everything = {d: train_pairs.get(d, []) + eval_pairs[d] for d in domains}
        cache.build(everything, image_size, num_workers=max(int(data.num_workers), 2),
                    progress=progress)
    _barrier("cache", process_count)
    loader = make_train_loader(train_pairs, cache, image_size, batch_size, int(config.seed),
                               int(data.pairs_per_domain), process_index=process_index,
                               process_count=process_count, num_workers=int(data.num_workers),
                               progress=False)
    return Pipeline(domains, train_pairs, eval_pairs, cache, image_size, iter(loader))
