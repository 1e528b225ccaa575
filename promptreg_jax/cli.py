"""What every command-line entry point shares: the compile cache and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable


def enable_compilation_cache() -> None:
    """Reuses compiled programs across runs (the network takes a while to compile on CPU).

    ``$JAX_COMPILATION_CACHE_DIR`` wins; otherwise ``$XDG_CACHE_HOME/promptreg_jax/xla``.
    """
    import jax
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "promptreg_jax", "xla")
        jax.config.update("jax_compilation_cache_dir", cache)


def run_cli(run: Callable[[], object], extra_errors: tuple = (),
            log_level: int = logging.WARNING) -> int:
    """Runs an entry point: bad input becomes ``error: <one line>`` and exit code 2."""
    from promptreg_jax.checkpoint import CheckpointError
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on every file it touches
    enable_compilation_cache()
    try:
        run()
    except (ValueError, CheckpointError, *extra_errors) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    return 0
