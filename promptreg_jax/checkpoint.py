"""Checkpoints: train state, grain iterator state and run metadata in one orbax step folder.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-write leaves the previous checkpoint intact. A checkpoint that still fails to read (truncated
or corrupted files) is skipped with a warning and the one before it is used when training resumes;
inference commands refuse it unless asked (``load_params(..., allow_fallback=True)``).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

try:  # grain's orbax handler saves the data iterator's position beside the state.
    import grain

    _GRAIN_SAVE, _GRAIN_RESTORE = grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore
except (ImportError, AttributeError):  # pragma: no cover - grain is a dependency
    _GRAIN_SAVE = _GRAIN_RESTORE = None

log = logging.getLogger(__name__)

# Model settings that must agree between a checkpoint and the config restoring it.
COMPAT_KEYS = ("name", "channels", "num_tasks", "use_prompt", "prompt_head", "image_size")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to an incompatible configuration."""


def _manager(directory, max_to_keep=None, items=("state", "data", "meta")):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=items)


class Checkpointer:
    """Saves and restores ``{"state", "data", "meta"}`` under ``workdir/checkpoints``."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoint folder {self.directory}: {e.strerror}")
        if not os.access(self.directory, os.W_OK):
            raise CheckpointError(f"checkpoint folder {self.directory} is not writable")
        self.manager = _manager(self.directory, max_to_keep)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, data_iterator=None) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None and _GRAIN_SAVE is not None:
            items["data"] = _GRAIN_SAVE(data_iterator)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, data_iterator=None, check=None):
        """Restores the newest readable checkpoint: ``(state, meta, step)`` or ``None``.

        ``check(meta)`` runs on each checkpoint's metadata before its state is read, so an
        incompatible checkpoint raises its own error instead of reading as "unreadable".
        """
        skipped = []
        for step in reversed(self.all_steps()):
            if check is not None:
                try:
                    meta = self.manager.restore(
                        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                except Exception:  # noqa: BLE001 - unreadable metadata: reported below
                    meta = None
                if meta is not None:
                    check(meta)
            items = {"state": ocp.args.StandardRestore(abstract_state),
                     "meta": ocp.args.JsonRestore()}
            if data_iterator is not None and _GRAIN_RESTORE is not None:
                items["data"] = _GRAIN_RESTORE(data_iterator)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any read failure means "try an older one"
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
                skipped.append(step)
                continue
            for bad in skipped:  # the resumed run saves these steps again
                log.warning("removing unreadable checkpoint step %d in %s", bad, self.directory)
                self.manager.delete(bad)
            return out["state"], out["meta"], step
        if skipped:  # starting over would collide with the unreadable steps' folders
            raise CheckpointError(
                f"every checkpoint in {self.directory} is unreadable (steps {sorted(skipped)}); "
                f"move that folder away to start over, or use a new --workdir")
        return None

    def close(self):
        self.manager.close()


def find_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """Accepts a workdir, its ``checkpoints`` folder, or one step folder."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


class _NoItemMetadataWarning(logging.Filter):
    """Orbax looks for step-level metadata inside an item folder read on its own and logs
    "Metadata file does not exist" (it lives one level up); harmless, so not shown to users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


def _restore_on_host(step_dir: pathlib.Path):
    """``(state, meta)`` of one step folder, every array restored as numpy on the host.

    Reading against the saved tree itself (not a sharded target) lets a checkpoint written on N
    devices load in a process with any number of devices.
    """
    quiet = _NoItemMetadataWarning()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return _restore_item_on_host(step_dir)
    finally:
        logging.getLogger("absl").removeFilter(quiet)


def _restore_item_on_host(step_dir: pathlib.Path):
    ck = ocp.PyTreeCheckpointer()
    tree = ck.metadata(step_dir / "state").item_metadata
    tree = dict(getattr(tree, "tree", tree))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ck.restore(step_dir / "state",
                       args=ocp.args.PyTreeRestore(item=None, restore_args=restore_args))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    return state, meta


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def load_params(path: str | os.PathLike, allow_fallback: bool = False):
    """Loads ``(params, meta, step)`` from the newest checkpoint under ``path``.

    ``path`` is a workdir, its ``checkpoints`` folder or one step folder. Parameters come back
    as numpy arrays whatever the device count of the run that wrote them; ``meta["model"]``
    holds the settings that rebuild the network. When the newest step is unreadable this raises
    :class:`CheckpointError` naming the newest readable one, unless ``allow_fallback`` (then it
    is used, with a warning naming both steps).
    """
    directory = find_checkpoint_dir(path)
    if (directory / "state").is_dir() and (directory / "meta").is_dir():
        try:
            state, meta = _restore_on_host(directory)
        except Exception as e:  # noqa: BLE001 - one named step: nothing older to try
            raise CheckpointError(f"checkpoint {directory} is unreadable ({_first_line(e)})")
        step = int(directory.name) if directory.name.isdigit() else 0
        return jax.tree.map(np.asarray, state["params"]), meta, step
    steps = sorted((d for d in directory.iterdir()
                    if d.name.isdigit() and (d / "state").is_dir() and (d / "meta").is_dir()),
                   key=lambda d: int(d.name), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint found under {directory}; train first with "
                              f"python -m promptreg_jax.train --config ... --workdir DIR")
    newest_error = None
    for step_dir in steps:
        try:
            state, meta = _restore_on_host(step_dir)
        except Exception as e:  # noqa: BLE001 - an unreadable step: look at an older one
            newest_error = newest_error or (step_dir, _first_line(e))
            continue
        if newest_error is not None:
            bad, why = newest_error
            if not allow_fallback:
                raise CheckpointError(
                    f"the newest checkpoint {bad} is unreadable ({why}); the newest readable "
                    f"one is step {step_dir.name}: pass --allow-older-checkpoint to use it, or "
                    f"--checkpoint {step_dir}")
            log.warning("checkpoint %s is unreadable (%s); using the older step %s", bad, why,
                        step_dir.name)
        return jax.tree.map(np.asarray, state["params"]), meta, int(step_dir.name)
    raise CheckpointError(f"no readable checkpoint under {directory} (newest: {newest_error[0]}: "
                          f"{newest_error[1]})")


def check_compatible(meta: dict, model_settings: dict, source: str) -> None:
    """Raises a clear error when a checkpoint's model settings differ from the config's."""
    saved = meta.get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {model_settings.get(k)!r}"
             for k in COMPAT_KEYS
             if k in saved and k in model_settings
             and json.dumps(saved[k]) != json.dumps(model_settings[k])]
    if diffs:
        raise CheckpointError(f"checkpoint {source} was trained with an incompatible model ("
                              + "; ".join(diffs) + "); use a matching config or another workdir")
