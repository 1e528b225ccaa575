"""What every command-line entry point shares: the compile cache and one-line errors."""

from __future__ import annotations

import argparse
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


class Interrupted(Exception):
    """A run stopped cleanly for a signal (after saving what it must); exit code 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def run_cli(run: Callable[[], object], extra_errors: tuple = (),
            log_level: int = logging.WARNING) -> int:
    """Runs an entry point: bad input becomes ``error: <one line>`` and exit code 2; a clean stop
    for a signal one line and 128 + the signal's number; Ctrl-C elsewhere one line and 130."""
    from promptreg_jax.checkpoint import CheckpointError
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on every file it touches
    enable_compilation_cache()
    try:
        run()
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, CheckpointError, *extra_errors) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line (``error: ...``) and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """``--workdir`` / ``--checkpoint`` / ``--allow-older-checkpoint``, as register and evaluate
    take them."""
    p.add_argument("--workdir", default="", help="training run folder (its newest checkpoint)")
    p.add_argument("--checkpoint", default="", help="checkpoint folder (a run, its checkpoints/ "
                                                    "or one step)")
    p.add_argument("--allow-older-checkpoint", action="store_true",
                   help="when the newest checkpoint is unreadable, use the newest readable one "
                        "(the step used is printed and recorded)")
