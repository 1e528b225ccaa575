"""Shared test setup: simulated CPU devices and the reference fixtures.

XLA_FLAGS must be set before jax is imported, so it is set here, at collection time: every test
process sees 4 CPU devices (sharding tests use them; other tests use device 0 as usual).
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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
