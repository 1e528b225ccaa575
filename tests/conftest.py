"""Shared test setup: simulated CPU devices and the reference fixtures.

XLA_FLAGS must be set before jax is imported, so it is set here, at collection time: every test
process sees 4 CPU devices (sharding tests use them; other tests use device 0 as usual).
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Compiled programs are shared between tests and their subprocesses through JAX's persistent
# cache: the network takes tens of seconds to compile on CPU, and several tests run the same one.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".cache" / "jax_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def fixtures_dir() -> pathlib.Path:
    """``$PROMPTREG_FIXTURES`` or ``../shared/fixtures`` beside the repository."""
    return pathlib.Path(os.environ.get("PROMPTREG_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def load_fixture(name: str):
    """Loads a reference ``.npz``; skips where absent, fails where CI requires it."""
    path = fixtures_dir() / name
    if not path.exists():
        msg = (f"reference fixture {path} not found: put the shared fixtures beside the repository "
               f"or set PROMPTREG_FIXTURES")
        if os.environ.get("PROMPTREG_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return np.load(path)


def channels_last(x):
    """Reference arrays are (B, C, X, Y, Z); the port is (B, X, Y, Z, C)."""
    return np.moveaxis(np.asarray(x), 1, -1)


def tiny_config(root, image=16, **train):
    """``configs/demo.py:tiny`` shrunk for tests: 16^3, few pairs, synthetic data under ``root``.

    Tests that train keep ``total_steps=4`` (the schedule is part of the compiled step) and stop
    earlier with ``stop_at_step``, so they share one compiled program through the cache.
    """
    from promptreg_jax.recipes import load_config
    config = load_config(f"{REPO_ROOT / 'configs' / 'demo.py'}:tiny")
    config.data.root = str(pathlib.Path(root) / "synthetic")
    config.data.synthetic.size = 24
    config.data.synthetic.subjects = 4
    config.data.image_size = (image, image, image)
    config.data.pairs_per_domain = 4
    config.data.eval_pairs_per_domain = 1
    config.train.final_eval = False
    config.train.log_every_steps = 1
    config.train.total_steps = 4
    for k, v in train.items():
        config.train[k] = v
    return config
