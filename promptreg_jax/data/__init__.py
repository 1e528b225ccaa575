"""Data pipeline: domains, readers, preprocessing, cache, synthetic data and the grain loader.

Typical use::

    domains = domains_from_config(config.data)
    splits = {d: read_pairs(d) for d in domains}            # (train pairs, eval pairs)
    cache = VolumeCache(config.data.cache_dir, norm_mode="paper")
    train = {d: s[0] for d, s in splits.items() if not d.held_out}
    it = iter(make_train_loader(train, cache, image_size, batch_size, seed, pairs_per_domain))
    batch = next(it)   # {"moving", "fixed": (b,X,Y,Z,1) f32, "task_id": (b,) i32}
"""

from promptreg_jax.data.cache import VolumeCache
from promptreg_jax.data.domains import (DATA_ROOT_ENV, Domain, data_root, domains_from_config,
                                        training_domains)
from promptreg_jax.data.errors import DataError
from promptreg_jax.data.loader import iterate_eval_pairs, loader_throughput, make_train_loader
from promptreg_jax.data.pipeline import (Pipeline, build_pipeline, prepare_data, resolve_data,
                                         synthetic_root)
from promptreg_jax.data.preprocess import (Volume, apply_label_map, load_image, load_label,
                                           load_volume, normalize, prepare_image, prepare_label)
from promptreg_jax.data.readers import Pair, read_pairs


def ensure_synthetic(out_dir: str, size: int = 48, subjects: int = 8, seed: int = 0,
                     domains=("brain", "abdomen", "hippocampus", "cardiac", "hip")) -> list[dict]:
    """Generates the synthetic data set on first use; see ``promptreg_jax.data.synthetic``.

    Imported lazily so that ``python -m promptreg_jax.data.synthetic`` runs the module fresh.
    """
    from promptreg_jax.data import synthetic
    return synthetic.ensure_synthetic(out_dir, size, subjects, seed, domains)

__all__ = [
    "DATA_ROOT_ENV", "DataError", "Domain", "Pair", "Pipeline", "build_pipeline", "prepare_data", "resolve_data", "synthetic_root", "Volume", "VolumeCache", "apply_label_map",
    "data_root", "domains_from_config", "ensure_synthetic", "iterate_eval_pairs", "load_image",
    "load_label", "load_volume", "loader_throughput", "make_train_loader", "normalize",
    "prepare_image", "prepare_label", "read_pairs", "training_domains",
]
