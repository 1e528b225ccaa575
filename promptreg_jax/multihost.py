"""Multi-process helpers: a barrier that waits as long as a slow process needs."""

from __future__ import annotations

import jax

BARRIER_TIMEOUT_MS = 60 * 60 * 1000


def sync_processes(name: str) -> None:
    """Blocks until every process reaches ``name``; a no-op in a single-process run.

    Uses the coordination service's barrier rather than a device collective: XLA's CPU
    collectives (gloo) give processes only 30 s to meet, which a process still compiling or
    preparing data can miss.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the public API has no barrier with a timeout
    client = distributed.global_state.client
    if client is None:  # pragma: no cover - initialised by jax.distributed.initialize
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"promptreg_{name}", BARRIER_TIMEOUT_MS)
