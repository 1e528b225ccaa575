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


def min_over_processes(name: str, value: float) -> float:
    """The smallest of every process's ``value`` (through the coordination service's key-value
    store, no device collective); ``value`` itself in a single-process run. Used where processes
    must take the same decision from figures that may differ between hosts (memory budgets)."""
    if jax.process_count() == 1:
        return value
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:  # pragma: no cover - initialised by jax.distributed.initialize
        from jax.experimental import multihost_utils
        import numpy as np
        return float(np.min(multihost_utils.process_allgather(np.float64(value))))
    client.key_value_set(f"promptreg_{name}/{jax.process_index()}", repr(float(value)))
    return min(float(client.blocking_key_value_get(f"promptreg_{name}/{i}", BARRIER_TIMEOUT_MS))
               for i in range(jax.process_count()))
